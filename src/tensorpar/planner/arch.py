"""What the planner needs to know about a model: its shapes, from the same config objects the
engine builds models from.

Every architecture the engine runs (Llama 2/3, Mistral, Qwen2/3, Gemma 3, Phi-3, GPT-2/GPT-3)
goes through ``ModelConfig`` — the class ``models/`` and ``plans/`` are built from — so the
planner's parameter counts, FLOPs and bytes cannot drift from the engine's shapes. One family the
engine does not run yet is described here only for planning: Mixtral-style mixture-of-experts
(``model_type: mixtral``: the Llama block with the MLP replaced by ``E`` SwiGLU experts of which
each token uses ``k``).

Built-in models are written as the Hugging Face ``config.json`` dictionaries of the published
checkpoints and go through exactly the same path as a user's ``config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tensorpar.models.config import ModelConfig
from tensorpar.models.registry import model_types
from tensorpar.planner.jsonfile import read_json_object

LLAMA2 = dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
              tie_word_embeddings=False)
LLAMA3 = dict(model_type="llama", vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
              rope_theta=500000.0, tie_word_embeddings=False)

# Hugging Face config.json values of the published checkpoints.
BUILTIN_MODELS: dict[str, dict] = {
    "llama-2-7b": dict(LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "llama-2-13b": dict(LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40),
    "llama-2-70b": dict(LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8),
    "llama-3-8b": dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8),
    "llama-3-70b": dict(LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8),
    "llama-3.1-405b": dict(LLAMA3, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                           num_attention_heads=128, num_key_value_heads=8, max_position_embeddings=131072,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False),
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
                         rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2.5-72b": dict(model_type="qwen2", vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                        tie_word_embeddings=False, use_sliding_window=False),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    "qwen3-32b": dict(model_type="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=25600,
                      num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                      max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "gemma-3-27b": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=5376, intermediate_size=21504,
                        num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                        query_pre_attn_scalar=168, sliding_window=1024, max_position_embeddings=131072,
                        rope_theta=1e6, rope_local_base_freq=1e4, rms_norm_eps=1e-6,
                        rope_scaling={"rope_type": "linear", "factor": 8.0}),
    # GPT-3 175B (Brown et al. 2020, table 2.1): the GPT-2 architecture at 96 layers of width 12288.
    "gpt3-175b": dict(model_type="gpt2", vocab_size=50257, n_embd=12288, n_layer=96, n_head=96,
                      n_positions=2048, n_inner=4 * 12288, tie_word_embeddings=True),
}


@dataclass(frozen=True)
class ArchSpec:
    """The shapes of a decoder-only transformer, as the cost model sees them.

    ``ffn`` is the MLP width (of one expert for MoE). ``gated_mlp``: SwiGLU (gate, up, down: three
    matrices) rather than a 2-matrix MLP. ``experts`` / ``experts_per_token``: 1 / 1 for a dense
    model. ``learned_positions``: rows of a learned position table (0 with RoPE). ``layer_norm``:
    LayerNorm with a bias (2h parameters) rather than RMSNorm (h). ``linear_bias``: every linear
    has a bias; ``qkv_bias``: only the fused QKV projection has one (Qwen2).
    """

    name: str
    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    max_context: int
    gated_mlp: bool = True
    experts: int = 1
    experts_per_token: int = 1
    tied_embeddings: bool = False
    qkv_bias: bool = False
    linear_bias: bool = False
    layer_norm: bool = False
    learned_positions: int = 0
    sliding_window: int | None = None
    norms_per_layer: int = 2  # Gemma's sandwich: 4
    head_norms: bool = False  # RMSNorm of each q and k head (Qwen3, Gemma 3): 2 head_dim weights

    @property
    def moe(self) -> bool:
        return self.experts > 1

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.gated_mlp else 2

    # --- parameter counts (each checkpoint tensor once) ---------------------------------------

    def attention_params(self) -> int:
        """W_qkv [h, q + 2kv], W_o [q, h], plus biases where the architecture has them."""
        h = self.hidden
        n = h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h
        if self.qkv_bias or self.linear_bias:
            n += self.q_dim + 2 * self.kv_dim
        if self.linear_bias:
            n += h
        return n

    def expert_params(self) -> int:
        """One MLP (one expert): ``mlp_matrices`` matrices of h x ffn, plus biases if any."""
        n = self.mlp_matrices * self.hidden * self.ffn
        if self.linear_bias:
            n += (self.mlp_matrices - 1) * self.ffn + self.hidden
        return n

    def norm_params(self) -> int:
        """One norm: weight (and bias for LayerNorm)."""
        return self.hidden * (2 if self.layer_norm else 1)

    def layer_norm_params(self) -> int:
        """A layer's norms: ``norms_per_layer`` over the hidden state, and the q/k head norms."""
        return self.norms_per_layer * self.norm_params() + (2 * self.head_dim if self.head_norms else 0)

    def layer_params(self) -> int:
        """One decoder layer: attention, every expert (and the router), its norms."""
        router = self.hidden * self.experts if self.moe else 0
        return self.attention_params() + self.experts * self.expert_params() + router + self.layer_norm_params()

    def embedding_params(self) -> int:
        """Token embedding (and learned positions); the LM head counts again only if untied."""
        return self.vocab * self.hidden + self.learned_positions * self.hidden

    def head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def total_params(self) -> int:
        return self.layers * self.layer_params() + self.embedding_params() + self.head_params() + self.norm_params()

    def active_params_per_token(self) -> int:
        """Parameters a token's forward pass multiplies by: ``k`` experts of ``E`` for MoE; the
        embedding is a lookup, the LM head a matmul."""
        router = self.hidden * self.experts if self.moe else 0
        per_layer = (self.attention_params() + self.experts_per_token * self.expert_params() + router
                     + self.layer_norm_params())
        return self.layers * per_layer + self.vocab * self.hidden + self.norm_params()

    def kv_elements_per_token(self) -> int:
        """K and V of one token in every layer: 2 * layers * kv_heads * head_dim."""
        return 2 * self.layers * self.kv_dim


def from_model_config(cfg: ModelConfig, name: str = "") -> ArchSpec:
    """The engine's config -> planner shapes (one source of truth for both). A window counts only
    when every layer has it (Gemma's global layers keep the whole context). A mixture of experts
    is modelled by its routed experts (``ffn`` one expert's width); a shared expert and dense
    layers beside them are not counted."""
    windows = {cfg.window(i) for i in range(cfg.num_layers)}
    moe = cfg.num_experts > 0
    return ArchSpec(
        name=name or cfg.architecture,
        family=cfg.architecture,
        hidden=cfg.hidden_size,
        layers=cfg.num_layers,
        heads=cfg.num_heads,
        kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        ffn=cfg.moe_intermediate_size if moe else cfg.intermediate_size,
        experts=cfg.num_experts if moe else 1,
        experts_per_token=cfg.experts_per_token if moe else 1,
        vocab=cfg.vocab_size,
        max_context=cfg.max_position_embeddings,
        gated_mlp=cfg.gated_mlp,
        tied_embeddings=cfg.tie_word_embeddings,
        qkv_bias=cfg.qkv_bias,
        linear_bias=cfg.o_bias and cfg.mlp_bias,
        layer_norm=cfg.layer_norm,
        learned_positions=cfg.max_position_embeddings if cfg.learned_positions else 0,
        sliding_window=windows.pop() if len(windows) == 1 else None,
        norms_per_layer=4 if cfg.sandwich_norms else 2,
        head_norms=cfg.qk_norm,
    )


def from_hf_config(cfg: dict, name: str = "") -> ArchSpec:
    """A Hugging Face ``config.json`` dictionary -> ArchSpec.

    Every type the engine reads goes through ``ModelConfig.from_hf``.
    """
    kind = cfg.get("model_type")
    if kind in model_types():
        return from_model_config(ModelConfig.from_hf(cfg), name=name)
    raise ValueError(
        f"unsupported model_type {kind!r} in config.json; the planner reads "
        f"{', '.join(model_types())}"
    )


def resolve_model(spec: str) -> ArchSpec:
    """A built-in name, a ``config.json`` file, or a directory holding one -> ArchSpec."""
    key = spec.strip().lower()
    if key in BUILTIN_MODELS:
        return from_hf_config(BUILTIN_MODELS[key], name=key)
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        cfg = read_json_object(path, "model config")
        name = path.parent.name if path.name == "config.json" else path.stem
        return from_hf_config(cfg, name=name or "model")
    raise ValueError(
        f"unknown model {spec!r}: give a built-in name ({', '.join(BUILTIN_MODELS)}), "
        f"a Hugging Face config.json file, or a directory that holds one"
    )
