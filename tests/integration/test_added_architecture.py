"""An architecture added from outside the package by one module (``tests/archs/postnorm.py``: a
Llama with post-norm layers), one registry row (``ROW``, registered at test time) and one test
config (``CONFIG``, a new ``model_type``): read from its ``config.json``, loaded from a
safetensors checkpoint written here through the normal loader, at TP=1 and TP=2 (real ranks),
its logits equal a plain-torch implementation of the same math."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tensorpar.models import readers, registry
from tensorpar.models.registry import Architecture

pytestmark = pytest.mark.timeout(180)

ROW = Architecture("postnorm", "archs.postnorm", ("postnorm_llama",), read_hf=readers.read_llama)
CONFIG = dict(
    model_type="postnorm_llama", vocab_size=250, hidden_size=48, intermediate_size=88, num_hidden_layers=2,
    num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
)
LAYER_TENSORS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "post_attention_layernorm",
                 "post_feedforward_layernorm")


def random_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a ``CONFIG`` model by its checkpoint name: norms 1 + N(0, 0.1^2), the rest N(0, 0.2^2)."""
    c = CONFIG
    h, i, d, v = c["hidden_size"], c["intermediate_size"], c["head_dim"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i),
              "post_attention_layernorm": (h,), "post_feedforward_layernorm": (h,)}
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(v, h, generator=g) * 0.2}
    for layer in range(c["num_hidden_layers"]):
        for name in LAYER_TENSORS:
            shape = shapes[name]
            w = 1 + 0.1 * torch.randn(shape, generator=g) if "norm" in name else 0.2 * torch.randn(shape, generator=g)
            out[f"model.layers.{layer}.{name}.weight"] = w
    out["model.norm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    out["lm_head.weight"] = torch.randn(v, h, generator=g) * 0.2
    return out


def reference_logits(w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Plain torch: post-norm layers, causal grouped-query attention with rotary positions (the
    halves of each head rotated), SwiGLU MLP, RMSNorm; ids [B, S] -> logits [B, S, vocab]."""
    c = CONFIG
    heads, kv_heads, d, eps = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["rms_norm_eps"]
    B, S = ids.shape

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    inv_freq = 1.0 / c["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.arange(S, dtype=torch.float32)[:, None] * inv_freq  # [S, d/2]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rotate(x):  # [B, n, S, d]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    causal = torch.ones(S, S, dtype=torch.bool).tril()
    x = w["model.embed_tokens.weight"][ids]
    for layer in range(c["num_hidden_layers"]):
        p = lambda name: w[f"model.layers.{layer}.{name}.weight"]  # noqa: E731
        q = (x @ p("self_attn.q_proj").T).view(B, S, heads, d).transpose(1, 2)
        k = (x @ p("self_attn.k_proj").T).view(B, S, kv_heads, d).transpose(1, 2)
        v = (x @ p("self_attn.v_proj").T).view(B, S, kv_heads, d).transpose(1, 2)
        q, k = rotate(q), rotate(k)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        scores = (q @ k.transpose(-1, -2)) / d**0.5
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # [B, heads, S, d]
        attn = attn.transpose(1, 2).reshape(B, S, heads * d) @ p("self_attn.o_proj").T
        x = rms_norm(x + attn, p("post_attention_layernorm"))
        mlp = (torch.nn.functional.silu(x @ p("mlp.gate_proj").T) * (x @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
        x = rms_norm(x + mlp, p("post_feedforward_layernorm"))
    return rms_norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, CONFIG["vocab_size"], (2, 19), generator=g)


class LogitsProbe:
    """A rank of the added architecture: registers its row in this process, builds the model
    through the normal loader, and gives the (gathered) logits of token ids."""

    def __init__(self, ctx, path: str):
        from tensorpar.loading import build_model
        from tensorpar.loading.safetensors_source import SafetensorsSource

        registry.register(ROW)
        self.model = build_model(SafetensorsSource(Path(path)), ctx)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.logits(self.model(ids))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The row registered here, and a safetensors checkpoint of ``CONFIG`` with random weights."""
    registry.register(ROW)
    path = tmp_path_factory.mktemp("postnorm")
    (path / "config.json").write_text(json.dumps(CONFIG))
    save_file(random_weights(), str(path / "model.safetensors"))
    yield path
    registry.unregister(ROW.name)


def test_the_new_model_type_is_read_through_its_row(checkpoint):
    from tensorpar.loading.safetensors_source import SafetensorsSource
    from tensorpar.models.config import ModelConfig
    from tensorpar.models.registry import checkpoint_shapes, for_model_type, model_module

    config = SafetensorsSource(checkpoint).config
    assert config == ModelConfig.from_hf(CONFIG) and config.architecture == "postnorm_llama"
    assert for_model_type("postnorm_llama") is ROW and "postnorm_llama" in registry.model_types()
    assert "postnorm_llama" not in registry.MODEL_TYPES and ROW not in registry.ARCHITECTURES
    assert model_module(config).__name__ == "archs.postnorm"
    assert set(checkpoint_shapes(config)) == set(random_weights())  # the module tree names every tensor written
    assert not ROW.trainable and not ROW.writes_hf_config


def test_tp1_logits_match_the_plain_torch_reference(checkpoint):
    ids = tokens()
    want = reference_logits(random_weights(), ids)
    from tensorpar.distributed.groups import single_process_context

    got = LogitsProbe(single_process_context(), str(checkpoint)).logits(ids)
    assert got.shape == (2, 19, CONFIG["vocab_size"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tp2_logits_match_the_plain_torch_reference(checkpoint):
    from tensorpar.distributed.launch import SpawnedRanks

    ids = tokens()
    want = reference_logits(random_weights(), ids)
    ranks = SpawnedRanks(2, LogitsProbe, (str(checkpoint),), timeout_s=120)
    try:
        got = ranks.call("logits", ids)
    finally:
        ranks.close()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
