"""Architecture configuration shared by the models, the plans, the loader and the planner.

``ModelConfig`` is read from a Hugging Face ``config.json`` (``from_hf``) or a GGUF file's
metadata (``from_gguf``); ``architecture`` is the Hugging Face ``model_type``, which names the
architecture module (``tensorpar.models.registry``). Torch-free.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from tensorpar.models.registry import MODEL_TYPES, for_gguf, for_model_type


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only Llama-family transformer (Llama 2/3, Mistral, Qwen2, SmolLM)."""

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

    def __post_init__(self):
        for_model_type(self.architecture)  # an unsupported one fails here
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dictionary."""
        arch = cfg.get("model_type")
        if arch not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {arch!r} in config.json; supported: {', '.join(MODEL_TYPES)}")
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        window = cfg.get("sliding_window")
        if arch == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if arch == "qwen2" else attention_bias,
            o_bias=False if arch == "qwen2" else attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=window,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos,
        )

    @classmethod
    def from_gguf(cls, meta: Mapping[str, object], tensors: Collection[str]) -> "ModelConfig":
        """Build from a GGUF file's metadata and the names of its tensors (llama.cpp's names).

        Keys are llama.cpp's: ``{arch}.embedding_length``, ``{arch}.attention.head_count``, ...
        with ``arch`` = ``general.architecture``.
        """
        arch = meta.get("general.architecture")
        for_gguf(arch)
        if "rope_freqs.weight" in tensors:
            raise ValueError("GGUF rope frequency factors (rope_freqs) are not supported yet")
        a = lambda k, d=None: meta.get(f"{arch}.{k}", d)  # noqa: E731
        heads = int(a("attention.head_count"))
        hidden = int(a("embedding_length"))
        eos = meta.get("tokenizer.ggml.eos_token_id")
        scaling = None
        if a("rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
        return cls(
            architecture=arch,
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
            qkv_bias="blk.0.attn_q.bias" in tensors,
            o_bias="blk.0.attn_output.bias" in tensors,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
        )

    def to_hf(self) -> dict:
        """A Hugging Face ``config.json`` dictionary that ``from_hf`` (and transformers) read back."""
        arch = self.architecture
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
