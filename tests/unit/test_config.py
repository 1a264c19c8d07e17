"""``ModelConfig.from_hf`` for the supported families and RoPE inverse frequencies."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TINY_CONFIGS

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


@pytest.mark.parametrize("model_type", ["deepseek_v3", "bert", None, "Llama", "gemma3"])
def test_unsupported_model_type(model_type):
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf(hf(model_type))
    msg = str(e.value)
    assert repr(model_type) in msg
    for arch in MODEL_TYPES:
        assert arch in msg
    assert set(MODEL_TYPES) == {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "gpt2", "mixtral",
                                "qwen2_moe", "qwen3_moe"}


def test_moe_configs_are_read_as_transformers_reads_them():
    mixtral = ModelConfig.from_hf(TINY_CONFIGS["mixtral"])
    assert (mixtral.num_experts, mixtral.experts_per_token, mixtral.moe_intermediate_size) == (8, 2, 40)
    assert mixtral.norm_topk_prob and not mixtral.shared_expert_size and mixtral.is_moe(0) and mixtral.is_moe(1)
    q2 = ModelConfig.from_hf(TINY_CONFIGS["qwen2_moe"])
    assert (q2.num_experts, q2.moe_intermediate_size, q2.shared_expert_size, q2.norm_topk_prob) == (6, 24, 40, False)
    assert q2.qkv_bias
    q3 = ModelConfig.from_hf({**TINY_CONFIGS["qwen3_moe"], "num_local_experts": 6})  # transformers 5's key
    assert q3.qk_norm and q3.norm_topk_prob and q3.is_moe(0) and not q3.is_moe(1) and q3.dense_layers == (1,)
    sparse = ModelConfig.from_hf({**TINY_CONFIGS["qwen2_moe"], "num_hidden_layers": 4, "decoder_sparse_step": 2})
    assert sparse.dense_layers == (0, 2)  # every second layer is sparse, counting from 1
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig.from_hf({**TINY_CONFIGS["mixtral"], "num_experts_per_tok": 9})


def test_missing_key_names_it():
    with pytest.raises(ValueError, match="lacks 'n_embd'"):
        ModelConfig.from_hf(hf("gpt2"))


@pytest.mark.parametrize("method", ["fp8", "awq", "gptq", "bitsandbytes"])
def test_quantized_checkpoints_are_refused_naming_the_method(method):
    with pytest.raises(ValueError, match=f"{method}.*not supported yet"):
        ModelConfig.from_hf(hf("llama", quantization_config={"quant_method": method, "bits": 4}))


def test_partial_rotary_and_softcapping_are_refused():
    with pytest.raises(ValueError, match="partial_rotary_factor=0.75"):
        ModelConfig.from_hf(hf("phi3", partial_rotary_factor=0.75))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        ModelConfig.from_hf(hf("gemma3_text", head_dim=16, final_logit_softcapping=30.0))


def test_qwen3_gemma3_phi3_gpt2_choices():
    q = ModelConfig.from_hf(hf("qwen3", head_dim=32, attention_bias=False))
    assert q.qk_norm and q.head_dim == 32 and not q.qkv_bias and q.window(0) is None
    g = ModelConfig.from_hf(hf("gemma3_text", head_dim=16, num_hidden_layers=7, sliding_window=512,
                               query_pre_attn_scalar=24, rope_theta=1e6, rope_local_base_freq=1e4))
    assert g.qk_norm and g.sandwich_norms and g.norm_offset == 1.0 and g.hidden_act == "gelu_pytorch_tanh"
    assert g.tie_word_embeddings and g.embed_scale == 8.0 and g.attn_scale == 24 ** -0.5
    assert [g.window(i) for i in range(7)] == [512] * 5 + [None, 512]  # every 6th layer global
    assert g.rope(0) == (1e4, None) and g.rope(5) == (1e6, None)
    p = ModelConfig.from_hf(hf("phi3", original_max_position_embeddings=1024,
                               rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}))
    assert p.rope_scaling["rope_type"] == "longrope" and p.rope_scaling["original_max_position_embeddings"] == 1024
    assert p.rope_scaling["factor"] == 4.0
    gpt = ModelConfig.from_hf({"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12,
                               "n_positions": 1024, "eos_token_id": 50256})
    assert gpt.layer_norm and gpt.learned_positions and not gpt.gated_mlp and gpt.intermediate_size == 3072
    assert gpt.qkv_bias and gpt.o_bias and gpt.mlp_bias and gpt.num_kv_heads == 12 and gpt.tie_word_embeddings


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


def test_unsupported_rope_scaling_is_refused_with_the_config():
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf(hf("llama", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}))


def test_longrope_matches_transformers():
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tensorpar.models.rope import Rotary, inverse_frequencies

    scaling = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
               "long_factor": [2.0 + 0.5 * i for i in range(8)]}
    kw = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=4096, original_max_position_embeddings=1024)
    ours = ModelConfig.from_hf(hf("phi3", **kw, rope_scaling=dict(scaling)))
    theirs = Phi3Config(**kw, rope_scaling=dict(scaling))
    short, long = inverse_frequencies(ours.head_dim, ours.rope_theta, ours.rope_scaling)
    want_short, factor = ROPE_INIT_FUNCTIONS["longrope"](theirs, "cpu")
    want_long, _ = ROPE_INIT_FUNCTIONS["longrope"](theirs, "cpu", seq_len=1025)
    torch.testing.assert_close(short, want_short, rtol=1e-6, atol=0)
    torch.testing.assert_close(long, want_long, rtol=1e-6, atol=0)
    assert Rotary(ours.head_dim, ours.rope_theta, ours.rope_scaling).factor == pytest.approx(factor)
    assert factor > 1


def test_chat_template_and_generation_config_options(tmp_path):
    import json

    from tensorpar.errors import TensorparError
    from tensorpar.runtime.spec import read_chat_template, sampling_defaults

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    assert read_chat_template(str(tmp_path / "t.jinja")) == template
    assert read_chat_template(template) == template and read_chat_template(None) is None
    with pytest.raises(TensorparError, match="--chat-template nope.jinja: no such file"):
        read_chat_template("nope.jinja")

    class Source:
        sampling_defaults = {"temperature": 0.7}

    assert sampling_defaults("auto", Source()) == {"temperature": 0.7} and sampling_defaults("vllm", Source()) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.3, "top_p": 0.8, "min_p": 0.05, "repetition_penalty": 1.2,
         "max_new_tokens": 64, "eos_token_id": 2}))
    assert sampling_defaults(str(tmp_path), Source()) == {"temperature": 0.3, "top_p": 0.8, "min_p": 0.05,
                                                         "repetition_penalty": 1.2, "max_new_tokens": 64}
    (tmp_path / "greedy").mkdir()
    (tmp_path / "greedy" / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.3}))
    assert sampling_defaults(str(tmp_path / "greedy"), Source()) == {}  # a greedy config's temperature means nothing
    with pytest.raises(TensorparError, match="--generation-config .*missing: no such file"):
        sampling_defaults(str(tmp_path / "missing"), Source())
