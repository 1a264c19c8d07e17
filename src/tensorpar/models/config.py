"""Architecture configuration shared by the models, the plans, the loader and the planner.

``ModelConfig`` is read from a Hugging Face ``config.json`` (``from_hf``) or a GGUF file's
metadata (``from_gguf``); ``architecture`` is the Hugging Face ``model_type``, which names the
architecture module (``tensorpar.models.registry``). Each architecture's reading of its config is
one function here (``_HF_READERS``, ``_GGUF_READERS``), so that this module stays torch-free for
the planner. What is not supported is refused here, in one line, before any rank starts.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from tensorpar.models.registry import MODEL_TYPES, for_gguf, for_model_type

ROPE_TYPES = ("default", "linear", "llama3", "longrope", "factors")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_new", "gelu")
FULL, SLIDING = "full_attention", "sliding_attention"
QWEN = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer: the shapes and the choices that tell the architectures apart.

    ``rope_scaling``: None, or a dict with ``rope_type`` in ROPE_TYPES and that type's parameters
    (``factors``: llama.cpp's per-frequency divisors, ``rope_freqs``). ``layer_types``: per layer
    ``full_attention`` or ``sliding_attention`` (None: every layer uses ``sliding_window``, which
    may itself be None). Sliding layers use ``rope_local_theta`` when it is set.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    hidden_act: str = "silu"
    gated_mlp: bool = True  # act(gate(x)) * up(x), else act(up(x))
    layer_norm: bool = False  # LayerNorm with bias, else RMSNorm
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w): Gemma's 1 + w
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE
    sandwich_norms: bool = False  # norms after attention and MLP too (Gemma 2/3)
    attn_scale: float | None = None  # None: 1 / sqrt(head_dim)
    embed_scale: float | None = None  # token embeddings times this (Gemma: sqrt(hidden))
    learned_positions: bool = False  # absolute position embeddings (GPT-2), no RoPE
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None
    num_experts: int = 0  # mixture of experts: experts per MoE layer (0: dense)
    experts_per_token: int = 0  # top-k
    moe_intermediate_size: int = 0  # each expert's intermediate size
    shared_expert_size: int = 0  # Qwen2-MoE's shared expert (sigmoid-gated); 0: none
    norm_topk_prob: bool = True  # renormalise the top-k softmax probabilities to sum to 1
    dense_layers: tuple[int, ...] = ()  # layers of an MoE model with a dense MLP instead
    hf_config: dict | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        for_model_type(self.architecture)  # an unsupported one fails here
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.hidden_act!r} (supported: {', '.join(ACTIVATIONS)})")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
        if self.num_experts and not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.experts_per_token}) must be from 1 to num_experts "
                             f"({self.num_experts})")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types lists {len(self.layer_types)} layers, the model has {self.num_layers}")

    def is_moe(self, layer: int) -> bool:
        """Whether layer ``layer``'s MLP is a mixture of experts."""
        return self.num_experts > 0 and layer not in self.dense_layers

    def window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (None: full attention)."""
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    @property
    def whole_prompts_from(self) -> int | None:
        """The prompt length from which a prompt must be prefilled in one piece, or None: LongRoPE
        rotates every token of a forward that reaches its pretrained length by the long factors,
        so a prompt that long, prefilled in chunks, would have its first chunks rotated otherwise."""
        scaling = self.rope_scaling or {}
        return scaling["original_max_position_embeddings"] if scaling.get("rope_type") == "longrope" else None

    def rope(self, layer: int) -> tuple[float, dict | None]:
        """(base, scaling) of layer ``layer``'s rotary embedding."""
        if self.rope_local_theta is not None and self.window(layer) is not None:
            return self.rope_local_theta, None
        return self.rope_theta, self.rope_scaling

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dictionary."""
        arch = cfg.get("model_type")
        if arch not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {arch!r} in config.json; supported: {', '.join(MODEL_TYPES)}")
        quant = cfg.get("quantization_config")
        if quant:
            method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
            raise ValueError(f"quantized checkpoints ({method}, from quantization_config) are not supported yet")
        try:
            fields = _HF_READERS[arch](cfg)
        except KeyError as e:
            raise ValueError(f"config.json of model_type {arch!r} lacks {e.args[0]!r}") from None
        return cls(**fields, hf_config=dict(cfg))

    @classmethod
    def from_gguf(cls, meta: Mapping[str, object], tensors: Collection[str],
                  rope_factors: Sequence[float] | None = None) -> "ModelConfig":
        """Build from a GGUF file's metadata, the names of its tensors (llama.cpp's names) and the
        values of its ``rope_freqs`` tensor, if it has one.

        Keys are llama.cpp's: ``{arch}.embedding_length``, ``{arch}.attention.head_count``, ...
        with ``arch`` = ``general.architecture``.
        """
        arch = meta.get("general.architecture")
        for_gguf(arch)
        a = lambda k, d=None: meta.get(f"{arch}.{k}", d)  # noqa: E731
        heads = int(a("attention.head_count"))
        hidden = int(a("embedding_length"))
        eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        scaling = None
        if a("rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
        if rope_factors is not None:
            if scaling is not None:
                raise ValueError("GGUF has both rope_freqs and rope.scaling.type; only one is supported")
            scaling = {"rope_type": "factors", "factors": tuple(float(f) for f in rope_factors)}
        experts = int(a("expert_count", 0) or 0)
        common = dict(
            architecture=("mixtral" if arch == "llama" and experts else
                          {"gemma3": "gemma3_text", "qwen3moe": "qwen3_moe"}.get(arch, arch)),
            vocab_size=int(a("vocab_size") or len(meta["tokenizer.ggml.tokens"])),
            hidden_size=hidden,
            intermediate_size=int(a("feed_forward_length")),
            num_layers=int(a("block_count")),
            num_heads=heads,
            num_kv_heads=int(a("attention.head_count_kv", heads)),
            head_dim=int(a("attention.key_length", hidden // heads)),
            rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(a("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(a("context_length", 4096)),
            tie_word_embeddings="output.weight" not in tensors,
            qkv_bias="blk.0.attn_q.bias" in tensors or "blk.0.attn_qkv.bias" in tensors,
            o_bias="blk.0.attn_output.bias" in tensors,
            mlp_bias="blk.0.ffn_down.bias" in tensors,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        )
        if experts:  # llama.cpp's Mixtral (``llama``) and Qwen3-MoE (``qwen3moe``)
            common.update(num_experts=experts, experts_per_token=int(a("expert_used_count")),
                          moe_intermediate_size=int(a("expert_feed_forward_length", 0) or common["intermediate_size"]),
                          norm_topk_prob=True)
        return cls(**_GGUF_READERS.get(arch, lambda m, a, c: c)(meta, a, common))

    def to_hf(self) -> dict:
        """A Hugging Face ``config.json`` dictionary that ``from_hf`` (and transformers) read back:
        the one the model came with, or for a Llama-family model read from GGUF, one written here."""
        if self.hf_config is not None:
            return dict(self.hf_config)
        arch = self.architecture
        if arch not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"cannot write a config.json for a {arch} model read from GGUF")
        cfg = {
            "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM"}[arch]],
            "model_type": arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                             else self.eos_token_ids[0] if self.eos_token_ids else None),
            "torch_dtype": "float32",
        }
        if self.rope_scaling is not None:
            if self.rope_scaling["rope_type"] == "factors":
                raise ValueError("cannot write a config.json for GGUF rope frequency factors (rope_freqs)")
            cfg["rope_scaling"] = dict(self.rope_scaling)
        if arch == "qwen2":
            cfg["use_sliding_window"] = self.sliding_window is not None
            cfg["sliding_window"] = self.sliding_window
        else:
            cfg["attention_bias"] = self.qkv_bias
            cfg["mlp_bias"] = self.mlp_bias
            if arch == "mistral":
                cfg["sliding_window"] = self.sliding_window
        return cfg


# --- Hugging Face config.json, one reader per architecture ------------------------------------


def _eos_ids(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    return tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))


def _rope(cfg: dict, params: dict | None = None) -> tuple[float, dict | None]:
    """(theta, scaling) from ``rope_parameters`` (transformers 5) or ``rope_scaling``."""
    rope = dict(params if params is not None else (cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}))
    theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind == "longrope":  # the pretrained length that decides between short and long factors
        original = rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
        rope["original_max_position_embeddings"] = original = original or cfg["max_position_embeddings"]
        if rope.get("factor") is None:
            rope["factor"] = cfg["max_position_embeddings"] / original
    return float(theta), None if kind == "default" else {**rope, "rope_type": kind}


def _refuse_partial_rotary(cfg: dict) -> None:
    partial = cfg.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ValueError(f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported yet")


def _layer_types(cfg: dict, n: int) -> tuple[str, ...] | None:
    types = cfg.get("layer_types")
    if types is not None:
        return tuple(types)
    if cfg.get("model_type") in QWEN and cfg.get("use_sliding_window"):
        first_full = cfg.get("max_window_layers", n)  # layers below it are full, as transformers reads it
        return tuple(SLIDING if i >= first_full else FULL for i in range(n))
    return None


def _read_llama_like(cfg: dict) -> dict:
    """Llama 2/3, Mistral, Qwen2, Qwen3, Phi-3 and Gemma 3: RoPE, RMSNorm, gated MLP, GQA."""
    arch = cfg["model_type"]
    _refuse_partial_rotary(cfg)
    heads, n = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    rope = cfg.get("rope_parameters") or {}
    local = None
    if FULL in rope or SLIDING in rope:  # transformers 5: one set of parameters per layer type
        local = rope.get(SLIDING)
        rope = rope.get(FULL) or {}
    theta, scaling = _rope(cfg, rope or None)
    attention_bias = bool(cfg.get("attention_bias", False))
    layer_types = _layer_types(cfg, n)
    window = cfg.get("sliding_window")
    if arch in QWEN and not cfg.get("use_sliding_window", False):
        window, layer_types = None, None
    out = dict(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=n,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=True if arch in ("qwen2", "qwen2_moe") else attention_bias,
        o_bias=False if arch in ("qwen2", "qwen2_moe") else attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_window=window,
        layer_types=layer_types,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg),
        hidden_act=cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu",
        qk_norm=arch in ("qwen3", "qwen3_moe", "gemma3_text"),
    )
    if arch == "gemma3_text":
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if cfg.get(key) is not None:
                raise ValueError(f"Gemma {key} is not supported yet")
        if cfg.get("use_bidirectional_attention"):
            raise ValueError("Gemma bidirectional attention is not supported")
        local_theta = (local or {}).get("rope_theta") or cfg.get("rope_local_base_freq", 10000.0)
        if layer_types is None:  # older configs: every sliding_window_pattern-th layer is global
            pattern = cfg.get("sliding_window_pattern", 6)
            out["layer_types"] = tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n))
        out.update(
            hidden_act=cfg.get("hidden_activation") or "gelu_pytorch_tanh",
            norm_offset=1.0,
            sandwich_norms=True,
            attn_scale=float(cfg.get("query_pre_attn_scalar", out["head_dim"])) ** -0.5,
            embed_scale=math.sqrt(cfg["hidden_size"]),
            rope_local_theta=float(local_theta),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        )
    return out


def _read_moe(cfg: dict) -> dict:
    """Mixtral, Qwen2-MoE and Qwen3-MoE: the Llama-like layer with a mixture of experts for MLP
    (softmax router, top-k; Qwen2-MoE adds a sigmoid-gated shared expert)."""
    arch = cfg["model_type"]
    out = _read_llama_like(cfg)
    n = out["num_layers"]
    if arch == "mixtral":
        experts, size, norm, shared, dense = cfg["num_local_experts"], cfg["intermediate_size"], True, 0, ()
    else:
        experts = cfg["num_experts"] if "num_experts" in cfg else cfg["num_local_experts"]  # (transformers 5)
        size = cfg["moe_intermediate_size"]
        norm = bool(cfg.get("norm_topk_prob", arch == "qwen3_moe"))
        shared = int(cfg.get("shared_expert_intermediate_size") or 0) if arch == "qwen2_moe" else 0
        step, only = int(cfg.get("decoder_sparse_step", 1) or 1), set(cfg.get("mlp_only_layers") or ())
        dense = tuple(i for i in range(n) if i in only or (i + 1) % step != 0)
    return dict(out, num_experts=int(experts), experts_per_token=int(cfg["num_experts_per_tok"]),
                moe_intermediate_size=int(size), shared_expert_size=shared, norm_topk_prob=norm, dense_layers=dense)


def _read_gpt2(cfg: dict) -> dict:
    """GPT-2: LayerNorm, learned positions, plain GELU MLP, biases everywhere, multi-head attention."""
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
        raise ValueError("GPT-2 scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
    if cfg.get("scale_attn_weights", True) is False:
        raise ValueError("GPT-2 without scale_attn_weights is not supported")
    h, heads = cfg["n_embd"], cfg["n_head"]
    return dict(
        architecture="gpt2",
        vocab_size=cfg["vocab_size"],
        hidden_size=h,
        intermediate_size=cfg.get("n_inner") or 4 * h,
        num_layers=cfg["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=h // heads,
        rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        max_position_embeddings=cfg.get("n_positions", 1024),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        qkv_bias=True, o_bias=True, mlp_bias=True,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg),
        hidden_act=cfg.get("activation_function", "gelu_new"),
        gated_mlp=False,
        layer_norm=True,
        learned_positions=True,
    )


_HF_READERS = {t: _read_llama_like for t in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text")}
_HF_READERS["gpt2"] = _read_gpt2
_HF_READERS.update({t: _read_moe for t in ("mixtral", "qwen2_moe", "qwen3_moe")})


# --- GGUF metadata: what differs from the Llama keys, per GGUF architecture --------------------


def _gguf_gemma3(meta, a, c: dict) -> dict:
    """llama.cpp's Gemma 3: every 6th layer global, local layers on base 10000, the query scaled
    by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B), as llama.cpp runs it."""
    n, window = c["num_layers"], a("attention.sliding_window")
    scalar = c["hidden_size"] / c["num_heads"] if n == 62 else c["head_dim"]
    return dict(
        c,
        hidden_act="gelu_pytorch_tanh", norm_offset=1.0, sandwich_norms=True, qk_norm=True,
        attn_scale=float(scalar) ** -0.5, embed_scale=math.sqrt(c["hidden_size"]),
        sliding_window=None if window is None else int(window), rope_local_theta=10000.0,
        layer_types=tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)),
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
    )


def _gguf_qwen3(meta, a, c: dict) -> dict:
    return dict(c, qk_norm=True)


def _gguf_gpt2(meta, a, c: dict) -> dict:
    return dict(
        c, num_kv_heads=c["num_heads"], rms_norm_eps=float(a("attention.layer_norm_epsilon", 1e-5)),
        hidden_act="gelu_new", gated_mlp=False, layer_norm=True, learned_positions=True,
        qkv_bias=True, o_bias=True, mlp_bias=True,
    )


_GGUF_READERS = {"gemma3": _gguf_gemma3, "qwen3": _gguf_qwen3, "qwen3moe": _gguf_qwen3, "gpt2": _gguf_gpt2}
