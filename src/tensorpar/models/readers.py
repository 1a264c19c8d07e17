"""The config readers (and writers) that registry rows name, torch-free, so that the planner can read
configs without importing torch.

A Hugging Face reader takes a ``config.json`` dictionary and returns ``ModelConfig``'s fields,
``architecture`` (the ``model_type``) among them; a missing key raises ``KeyError``, which
``ModelConfig.from_hf`` reports. A GGUF reader takes ``(meta, key, fields)``: the file's metadata,
``key(name, default)`` reading ``{general.architecture}.{name}``, and the fields read from the keys
every llama.cpp architecture shares; it returns them completed with what is particular to it,
``architecture`` included. A writer takes a ``ModelConfig`` and returns a ``config.json``
dictionary that its reader (and transformers) reads back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FULL, SLIDING = "full_attention", "sliding_attention"


# --- Hugging Face config.json -------------------------------------------------------------------


def eos_ids(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    return tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))


def rope(cfg: dict, params: dict | None = None) -> tuple[float, dict | None]:
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


def read_llama(cfg: dict, *, qk_norm: bool = False) -> dict:
    """Llama 2/3, Mistral, Phi-3, and any architecture of the same config keys (its ``model_type``
    becomes ``architecture``): RoPE, RMSNorm, gated MLP, GQA; ``qk_norm``: RMSNorm of each q and k head."""
    partial = cfg.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ValueError(f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported yet")
    heads, n = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    params = cfg.get("rope_parameters") or {}
    if FULL in params or SLIDING in params:  # transformers 5: one set of parameters per layer type
        params = params.get(FULL) or {}
    theta, scaling = rope(cfg, params or None)
    attention_bias = bool(cfg.get("attention_bias", False))
    types = cfg.get("layer_types")
    return dict(
        architecture=cfg["model_type"],
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
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_window=cfg.get("sliding_window"),
        layer_types=None if types is None else tuple(types),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg),
        hidden_act=cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu",
        qk_norm=qk_norm,
    )


def _qwen_window(cfg: dict, out: dict) -> dict:
    """Qwen's sliding window: only with ``use_sliding_window``, on the layers from
    ``max_window_layers`` up (those below it are full, as transformers reads it)."""
    if not cfg.get("use_sliding_window", False):
        return dict(out, sliding_window=None, layer_types=None)
    if out["layer_types"] is None:
        n = out["num_layers"]
        first_full = cfg.get("max_window_layers", n)
        out = dict(out, layer_types=tuple(SLIDING if i >= first_full else FULL for i in range(n)))
    return out


def read_qwen2(cfg: dict) -> dict:
    """Qwen2: the Llama layer with Q/K/V biases (always) and no output bias; Qwen's sliding window."""
    return dict(_qwen_window(cfg, read_llama(cfg)), qkv_bias=True, o_bias=False)


def read_qwen3(cfg: dict) -> dict:
    """Qwen3: the Llama layer with per-head q/k norms; Qwen's sliding window."""
    return _qwen_window(cfg, read_llama(cfg, qk_norm=True))


def read_gemma3(cfg: dict) -> dict:
    """Gemma 3 (text): q/k norms, norms after attention and MLP too, RMSNorm scaling by 1 + w,
    GeGLU, embeddings times sqrt(hidden), local layers on their own base beside global ones."""
    out = read_llama(cfg, qk_norm=True)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise ValueError(f"Gemma {key} is not supported yet")
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("Gemma bidirectional attention is not supported")
    n = out["num_layers"]
    local = (cfg.get("rope_parameters") or {}).get(SLIDING)
    local_theta = (local or {}).get("rope_theta") or cfg.get("rope_local_base_freq", 10000.0)
    if out["layer_types"] is None:  # older configs: every sliding_window_pattern-th layer is global
        pattern = cfg.get("sliding_window_pattern", 6)
        out["layer_types"] = tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n))
    return dict(
        out,
        hidden_act=cfg.get("hidden_activation") or "gelu_pytorch_tanh",
        norm_offset=1.0,
        sandwich_norms=True,
        attn_scale=float(cfg.get("query_pre_attn_scalar", out["head_dim"])) ** -0.5,
        embed_scale=math.sqrt(cfg["hidden_size"]),
        rope_local_theta=float(local_theta),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
    )


def _experts(cfg: dict, out: dict, experts: int, size: int, norm: bool, shared: int = 0,
             dense: tuple[int, ...] = ()) -> dict:
    """``out`` with a mixture of experts for MLP, but in the ``dense`` layers."""
    return dict(out, num_experts=int(experts), experts_per_token=int(cfg["num_experts_per_tok"]),
                moe_intermediate_size=int(size), shared_expert_size=shared, norm_topk_prob=norm, dense_layers=dense)


def _qwen_experts(cfg: dict, out: dict, norm_default: bool, shared: int) -> dict:
    """Qwen's experts: layers in ``mlp_only_layers`` (or off ``decoder_sparse_step``) keep a dense MLP."""
    experts = cfg["num_experts"] if "num_experts" in cfg else cfg["num_local_experts"]  # (transformers 5)
    size = cfg["moe_intermediate_size"]
    norm = bool(cfg.get("norm_topk_prob", norm_default))
    step, only = int(cfg.get("decoder_sparse_step", 1) or 1), set(cfg.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(out["num_layers"]) if i in only or (i + 1) % step != 0)
    return _experts(cfg, out, experts, size, norm, shared, dense)


def read_mixtral(cfg: dict) -> dict:
    """Mixtral: the Llama layer with a mixture of experts (softmax router, top-k renormalised)."""
    out = read_llama(cfg)
    return _experts(cfg, out, cfg["num_local_experts"], cfg["intermediate_size"], True)


def read_qwen2_moe(cfg: dict) -> dict:
    """Qwen2-MoE: the Qwen2 layer with experts and a sigmoid-gated shared expert; the top-k is not
    renormalised unless ``norm_topk_prob``."""
    out = read_qwen2(cfg)
    return _qwen_experts(cfg, out, False, int(cfg.get("shared_expert_intermediate_size") or 0))


def read_qwen3_moe(cfg: dict) -> dict:
    """Qwen3-MoE: the Qwen3 layer with experts, no shared expert; the top-k renormalised by default."""
    return _qwen_experts(cfg, read_qwen3(cfg), True, 0)


def read_gpt2(cfg: dict) -> dict:
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
        eos_token_ids=eos_ids(cfg),
        hidden_act=cfg.get("activation_function", "gelu_new"),
        gated_mlp=False,
        layer_norm=True,
        learned_positions=True,
    )


# --- GGUF metadata: what differs from the keys every llama.cpp architecture shares ------------


def gguf_llama(meta, key, fields: dict) -> dict:
    """llama.cpp's ``llama``: Llama 2/3 and Mistral, or Mixtral when the file has experts."""
    return dict(fields, architecture="mixtral" if fields.get("num_experts") else "llama")


@dataclass(frozen=True)
class SharedKeysReader:
    """The GGUF reader of an architecture that the shared keys describe: they, with ``model_type``
    for ``architecture`` and ``choices`` (``ModelConfig`` fields and values) set. A value, so that
    a row holding it pickles (checkpoint sources travel to the ranks with their row)."""

    model_type: str
    choices: tuple[tuple[str, object], ...] = ()

    def __call__(self, meta, key, fields: dict) -> dict:
        return dict(fields, architecture=self.model_type, **dict(self.choices))


def gguf_as(model_type: str, **choices) -> SharedKeysReader:
    """``SharedKeysReader`` of ``model_type`` with ``choices`` (``qk_norm=True``)."""
    return SharedKeysReader(model_type, tuple(sorted(choices.items())))


def gguf_gemma3(meta, key, fields: dict) -> dict:
    """llama.cpp's Gemma 3: every 6th layer global, local layers on base 10000, the query scaled
    by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B), as llama.cpp runs it."""
    c = fields
    n, window = c["num_layers"], key("attention.sliding_window")
    scalar = c["hidden_size"] / c["num_heads"] if n == 62 else c["head_dim"]
    return dict(
        c,
        architecture="gemma3_text",
        hidden_act="gelu_pytorch_tanh", norm_offset=1.0, sandwich_norms=True, qk_norm=True,
        attn_scale=float(scalar) ** -0.5, embed_scale=math.sqrt(c["hidden_size"]),
        sliding_window=None if window is None else int(window), rope_local_theta=10000.0,
        layer_types=tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
    )


def gguf_gpt2(meta, key, fields: dict) -> dict:
    return dict(
        fields, architecture="gpt2",
        num_kv_heads=fields["num_heads"], rms_norm_eps=float(key("attention.layer_norm_epsilon", 1e-5)),
        hidden_act="gelu_new", gated_mlp=False, layer_norm=True, learned_positions=True,
        qkv_bias=True, o_bias=True, mlp_bias=True,
    )


# --- config.json written back, for a model read from GGUF ---------------------------------------


def _llama_keys(config, hf_class: str) -> dict:
    """The keys a Llama-family ``config.json`` shares."""
    cfg = {
        "architectures": [hf_class],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": (list(config.eos_token_ids) if len(config.eos_token_ids) > 1
                         else config.eos_token_ids[0] if config.eos_token_ids else None),
        "torch_dtype": "float32",
    }
    if config.rope_scaling is not None:
        if config.rope_scaling["rope_type"] == "factors":
            raise ValueError("cannot write a config.json for GGUF rope frequency factors (rope_freqs)")
        cfg["rope_scaling"] = dict(config.rope_scaling)
    return cfg


def write_llama(config) -> dict:
    """Llama (``LlamaForCausalLM``) or Mistral (``MistralForCausalLM``, with its sliding window)."""
    mistral = config.architecture == "mistral"
    cfg = _llama_keys(config, "MistralForCausalLM" if mistral else "LlamaForCausalLM")
    cfg["attention_bias"] = config.qkv_bias
    cfg["mlp_bias"] = config.mlp_bias
    if mistral:
        cfg["sliding_window"] = config.sliding_window
    return cfg


def write_qwen2(config) -> dict:
    cfg = _llama_keys(config, "Qwen2ForCausalLM")
    cfg["use_sliding_window"] = config.sliding_window is not None
    cfg["sliding_window"] = config.sliding_window
    return cfg
