"""``ModelConfig.from_hf`` for the supported families and RoPE inverse frequencies."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_CONFIGS

from tensorpar.models.config import ModelConfig
from tensorpar.models.llama import rope_inverse_frequencies
from tensorpar.models.registry import MODEL_TYPES

BASE = dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def hf(model_type, **kw):
    return {"model_type": model_type, **BASE, **kw}


def test_llama_transformers5_style():
    c = ModelConfig.from_hf(hf("llama", head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=True,
                               bos_token_id=128000, eos_token_id=[128001, 128009],
                               rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0}))
    assert c.architecture == "llama"
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (1000, 64, 160, 3)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (8, 2, 16)
    assert c.rms_norm_eps == 1e-5
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == LLAMA3_SCALING  # rope_theta moved out of the scaling dict
    assert c.tie_word_embeddings is True
    assert not c.qkv_bias and not c.o_bias and not c.mlp_bias
    assert c.bos_token_id == 128000 and c.eos_token_ids == (128001, 128009)
    assert c.max_position_embeddings == 4096
    assert c.sliding_window is None


def test_llama_old_style_rope_keys():
    c = ModelConfig.from_hf(hf("llama", rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING), eos_token_id=2))
    assert c.rope_theta == 500000.0
    assert c.rope_scaling["rope_type"] == "llama3"
    assert c.rope_scaling["factor"] == 8.0
    assert c.rope_scaling["original_max_position_embeddings"] == 8192
    assert c.head_dim == 64 // 8  # derived when the config has none
    assert c.eos_token_ids == (2,)

    old_linear = ModelConfig.from_hf(hf("llama", rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0}))
    assert old_linear.rope_scaling["rope_type"] == "linear" and old_linear.rope_scaling["factor"] == 2.0

    plain = ModelConfig.from_hf(hf("llama", rope_theta=123456.0, rope_scaling=None))
    assert plain.rope_theta == 123456.0 and plain.rope_scaling is None

    default = ModelConfig.from_hf(hf("llama"))
    assert default.rope_theta == 10000.0 and default.rope_scaling is None and default.eos_token_ids == ()


def test_default_rope_parameters_mean_no_scaling():
    c = ModelConfig.from_hf(hf("llama", rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert c.rope_theta == 1e6 and c.rope_scaling is None


def test_llama_attention_and_mlp_bias():
    c = ModelConfig.from_hf(hf("llama", attention_bias=True, mlp_bias=True))
    assert c.qkv_bias and c.o_bias and c.mlp_bias


def test_mistral():
    c = ModelConfig.from_hf(hf("mistral", head_dim=None, sliding_window=4096, num_key_value_heads=None,
                               rope_theta=1e6))
    assert c.architecture == "mistral"
    assert c.head_dim == 8  # head_dim: null -> hidden / heads
    assert c.num_kv_heads == 8  # num_key_value_heads: null -> heads
    assert c.sliding_window == 4096
    assert c.rope_theta == 1e6
    assert not c.qkv_bias and not c.o_bias


def test_qwen2():
    c = ModelConfig.from_hf(hf("qwen2", sliding_window=32768, use_sliding_window=False, rope_theta=1e6))
    assert c.architecture == "qwen2"
    assert c.qkv_bias is True and c.o_bias is False
    assert c.sliding_window is None  # use_sliding_window=False disables it
    windowed = ModelConfig.from_hf(hf("qwen2", sliding_window=64, use_sliding_window=True))
    assert windowed.sliding_window == 64


def test_tiny_configs():
    llama = ModelConfig.from_hf(TINY_CONFIGS["llama"])
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.rope_theta == 10000.0 and llama.head_dim == 8
    mistral = ModelConfig.from_hf(TINY_CONFIGS["mistral"])
    assert mistral.sliding_window == 8 and mistral.tie_word_embeddings and mistral.num_kv_heads == 1
    qwen = ModelConfig.from_hf(TINY_CONFIGS["qwen2"])
    assert qwen.qkv_bias and not qwen.o_bias and qwen.head_dim == 8 and qwen.sliding_window is None


@pytest.mark.parametrize("model_type", ["gpt2", "phi3", None, "Llama"])
def test_unsupported_model_type(model_type):
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf(hf(model_type))
    msg = str(e.value)
    assert repr(model_type) in msg
    for arch in MODEL_TYPES:
        assert arch in msg
    assert set(MODEL_TYPES) == {"llama", "mistral", "qwen2"}


def test_heads_not_a_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig.from_hf(hf("llama", num_key_value_heads=3))


# ---------------------------------------------------------------- RoPE


def transformers_inv_freq(rope_type: str, head_dim: int, rope_parameters: dict) -> torch.Tensor:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=131072, rope_parameters=rope_parameters)
    inv, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    return inv


@pytest.mark.parametrize(
    "head_dim, theta, scaling",
    [
        (128, 500000.0, LLAMA3_SCALING),  # Llama 3.1
        (64, 500000.0, {**LLAMA3_SCALING, "factor": 32.0, "original_max_position_embeddings": 8192}),  # Llama 3.2
        (8, 10000.0, {k: v for k, v in TINY_CONFIGS["llama"]["rope_parameters"].items() if k != "rope_theta"}),
        (32, 10000.0, {**LLAMA3_SCALING, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                       "original_max_position_embeddings": 256}),
    ],
)
def test_llama3_rope_matches_transformers(head_dim, theta, scaling):
    cfg = ModelConfig.from_hf(hf("llama", hidden_size=head_dim * 8, head_dim=head_dim,
                                 rope_parameters={**scaling, "rope_theta": theta}))
    ours = rope_inverse_frequencies(cfg)
    theirs = transformers_inv_freq("llama3", head_dim, {**scaling, "rope_theta": theta})
    assert ours.shape == theirs.shape == (head_dim // 2,)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    # The case is not degenerate: some frequencies are scaled, some smoothed, some untouched.
    plain = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ratio = (ours.double() / plain)
    assert (ratio - 1).abs().min() < 1e-6  # untouched high frequencies
    assert (ratio - 1 / scaling["factor"]).abs().min() < 1e-6  # fully scaled low frequencies
    if head_dim >= 32:  # and smoothly interpolated ones in between
        assert ((ratio > 1 / scaling["factor"] + 1e-3) & (ratio < 1 - 1e-3)).any()


def test_linear_and_default_rope_match_transformers():
    head_dim = 32
    cfg = ModelConfig.from_hf(hf("llama", hidden_size=256, head_dim=head_dim,
                                 rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0}))
    theirs = transformers_inv_freq("linear", head_dim, {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0})
    torch.testing.assert_close(rope_inverse_frequencies(cfg), theirs, rtol=1e-6, atol=0)
    plain = ModelConfig.from_hf(hf("llama", hidden_size=256, head_dim=head_dim, rope_theta=50000.0))
    want = 1.0 / (50000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    torch.testing.assert_close(rope_inverse_frequencies(plain), want.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(rope_inverse_frequencies(cfg), (want / 4).float(), rtol=1e-6, atol=0)
    assert rope_inverse_frequencies(plain)[0] == 1.0
    assert math.isclose(float(rope_inverse_frequencies(plain)[1]), 50000.0 ** (-2 / 32), rel_tol=1e-6)


def test_unsupported_rope_scaling_raises():
    cfg = ModelConfig.from_hf(hf("llama", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}))
    with pytest.raises(ValueError, match="yarn"):
        rope_inverse_frequencies(cfg)
