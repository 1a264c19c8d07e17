"""``tensorpar.models.registry``: each row names its readers and capabilities; ``register`` adds rows
beside the built-in ones."""

from __future__ import annotations

import pickle

import pytest

from tensorpar.models import readers, registry
from tensorpar.models.config import ModelConfig
from tensorpar.models.registry import ARCHITECTURES, Architecture, for_gguf, for_model_type


def test_every_built_in_row_names_a_reader_for_what_it_reads():
    for arch in ARCHITECTURES:
        assert pickle.loads(pickle.dumps(arch)) == arch  # a checkpoint source carries its row to the ranks
        assert callable(arch.read_hf) and arch.hf_model_types
        assert callable(arch.read_gguf) == bool(arch.gguf_architectures)
        for gguf in arch.gguf_architectures:
            assert for_gguf(gguf) is arch
        for model_type in arch.hf_model_types:
            assert for_model_type(model_type) is arch


def test_capabilities_are_the_rows():
    trainable = {t for a in ARCHITECTURES if a.trainable for t in a.hf_model_types}
    writes = {t for a in ARCHITECTURES if a.writes_hf_config for t in a.hf_model_types}
    assert trainable == writes == {"llama", "mistral", "qwen2"}


def test_a_row_without_its_readers_cannot_exist():
    with pytest.raises(TypeError, match="read_hf"):
        Architecture("x", "x", ("x",))
    with pytest.raises(ValueError, match="read_hf must be"):
        Architecture("x", "x", ("x",), read_hf="tensorpar.models.readers.read_llama")
    with pytest.raises(ValueError, match="read_gguf"):
        Architecture("x", "x", ("x",), read_hf=readers.read_llama, gguf_architectures=("x",))
    with pytest.raises(ValueError, match="read_gguf"):
        Architecture("x", "x", ("x",), read_hf=readers.read_llama, read_gguf=readers.gguf_llama)
    with pytest.raises(ValueError, match="no model_type"):
        Architecture("x", "x", (), read_hf=readers.read_llama)


def test_register_adds_a_row_beside_the_built_in_ones():
    row = Architecture("mine", "tensorpar.models.llama", ("my_llama",), read_hf=readers.read_llama)
    cfg = {"model_type": "my_llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4}
    with pytest.raises(ValueError, match="unsupported model_type 'my_llama'.*supported: llama, mistral"):
        ModelConfig.from_hf(cfg)
    registry.register(row)
    try:
        assert registry.register(row) is row  # again: unchanged
        assert registry.architectures()[-1] is row and registry.architectures()[:-1] == ARCHITECTURES
        config = ModelConfig.from_hf(cfg)
        assert config.architecture == "my_llama" and config.num_kv_heads == 4
        with pytest.raises(ValueError, match=r"unsupported model_type 'bert'.*qwen3_moe, my_llama"):
            ModelConfig.from_hf({**cfg, "model_type": "bert"})
        with pytest.raises(ValueError, match="clashes with the registered 'llama'"):
            registry.register(Architecture("other", "m", ("mistral",), read_hf=readers.read_llama))
        with pytest.raises(ValueError, match="clashes with the registered 'mine'"):
            registry.register(Architecture("mine", "m", ("yet_another",), read_hf=readers.read_llama))
    finally:
        registry.unregister("mine")
    assert registry.architectures() == ARCHITECTURES
    with pytest.raises(ValueError, match="unsupported model_type 'my_llama'"):
        for_model_type("my_llama")


def test_to_hf_writes_through_the_rows_writer():
    gemma = ModelConfig(architecture="gemma3_text", vocab_size=10, hidden_size=8, intermediate_size=16,
                        num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)
    with pytest.raises(ValueError, match="cannot write a config.json for a gemma3_text model read from GGUF"):
        gemma.to_hf()
    llama = ModelConfig(**{**gemma.__dict__, "architecture": "llama", "eos_token_ids": (2, 3)})
    assert llama.to_hf()["architectures"] == ["LlamaForCausalLM"]
    assert ModelConfig.from_hf(llama.to_hf()) == llama
    qwen = ModelConfig(**{**gemma.__dict__, "architecture": "qwen2", "sliding_window": 16})
    assert qwen.to_hf()["architectures"] == ["Qwen2ForCausalLM"] and qwen.to_hf()["use_sliding_window"] is True
