"""Architecture configuration shared by the models, the plans, the loader and the planner.

``ModelConfig`` is read from a Hugging Face ``config.json`` (``from_hf``) or a GGUF file's
metadata (``from_gguf``); ``architecture`` is the Hugging Face ``model_type``, which names the
architecture's row (``tensorpar.models.registry``). Both dispatch through that row to its reader
(``tensorpar.models.readers``); like them, this module imports no torch, for the planner. What is
not supported is refused here, in one line, before any rank starts.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from tensorpar.models.readers import FULL, SLIDING
from tensorpar.models.registry import for_gguf, for_model_type, model_types

__all__ = ["ACTIVATIONS", "FULL", "ROPE_TYPES", "SLIDING", "ModelConfig"]

ROPE_TYPES = ("default", "linear", "llama3", "longrope", "factors")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_new", "gelu")


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

    def differences(self, other: "ModelConfig") -> list[str]:
        """What tells ``other`` apart as a model to compute (``name: mine != other's``); empty when
        its weights can replace these (its context length and special tokens may differ)."""
        kept = ("max_position_embeddings", "bos_token_id", "eos_token_ids", "hf_config")
        return [f"{f}: {getattr(self, f)!r} != {getattr(other, f)!r}" for f in self.__dataclass_fields__
                if f not in kept and getattr(self, f) != getattr(other, f)]

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
        """Build from a Hugging Face ``config.json`` dictionary, with the reader of its
        ``model_type``'s registry row."""
        arch = cfg.get("model_type")
        if arch not in model_types():
            raise ValueError(f"unsupported model_type {arch!r} in config.json; supported: {', '.join(model_types())}")
        row = for_model_type(arch)
        quant = cfg.get("quantization_config")
        if quant:
            method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
            raise ValueError(f"quantized checkpoints ({method}, from quantization_config) are not supported yet")
        try:
            fields = row.read_hf(cfg)
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
        row = for_gguf(arch)
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
        common = dict(  # the keys every llama.cpp architecture shares; the row's reader adds its own
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
        return cls(**row.read_gguf(meta, a, common))

    def to_hf(self) -> dict:
        """A Hugging Face ``config.json`` dictionary that ``from_hf`` (and transformers) read back:
        the one the model came with, or for a model read from GGUF, one written by its registry
        row's ``write_hf`` (the Llama family's)."""
        if self.hf_config is not None:
            return dict(self.hf_config)
        row = for_model_type(self.architecture)
        if not row.writes_hf_config:
            raise ValueError(f"cannot write a config.json for a {self.architecture} model read from GGUF")
        return row.write_hf(self)
