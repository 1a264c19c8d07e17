"""Where training starts: a checkpoint, or a random model drawn in full from the seed.

A random model is initialized identically at every degree: each full tensor is drawn from one
generator seeded with ``--seed`` (in sorted name order), then every rank keeps its own slices, as
it would from a checkpoint on disk.
"""

from __future__ import annotations

import torch

from tensorpar.loading import CheckpointSource, TensorSource, open_source
from tensorpar.models.config import ModelConfig
from tensorpar.models.registry import checkpoint_shapes

DEFAULT_TOKENIZER_MODEL = "smollm2-135m"
INIT_STD = 0.02

# a few layers, 6 query heads sharing 2 KV heads (so TP=3 and TP=4 replicate KV heads), tied
# embeddings like the default model, whose tokenizer (and vocabulary) it uses
RANDOM_MODELS: dict[str, dict] = {
    "random-llama-tiny": dict(
        model_type="llama", hidden_size=96, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
    ),
}
# the same with 6 layers: enough for 3 pipeline stages of 2 runs each (interleaved)
RANDOM_MODELS["random-llama-tiny-6l"] = dict(RANDOM_MODELS["random-llama-tiny"], num_hidden_layers=6)


def random_init(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Full tensors: norm weights 1, biases 0, every other weight N(0, 0.02^2), drawn in name order."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(checkpoint_shapes(config).items()):
        if "norm" in name:
            out[name] = torch.ones(shape)
        elif name.endswith(".bias"):
            out[name] = torch.zeros(shape)
        else:
            out[name] = torch.randn(shape, generator=g) * INIT_STD
    return out


def random_config(name: str, default: CheckpointSource) -> ModelConfig:
    """The config of random model ``name``, with the vocabulary of the default model."""
    vocab = default.config
    hf = dict(RANDOM_MODELS[name], vocab_size=vocab.vocab_size, bos_token_id=vocab.bos_token_id,
              eos_token_id=list(vocab.eos_token_ids) or None)
    return ModelConfig.from_hf(hf)


def random_source(name: str, seed: int) -> TensorSource:
    """The random model ``name`` (see ``RANDOM_MODELS``) with the default model's tokenizer."""
    default = open_source(DEFAULT_TOKENIZER_MODEL)  # reads the header only
    config = random_config(name, default)
    return TensorSource(config, random_init(config, seed), default.tokenizer, name)


def training_config(model: str) -> ModelConfig:
    """The config ``training_source(model, ...)`` will have, without drawing or reading weights."""
    if model in RANDOM_MODELS:
        return random_config(model, open_source(DEFAULT_TOKENIZER_MODEL))
    return open_source(model).config


def training_source(model: str, seed: int) -> CheckpointSource:
    """A random model by name, or any checkpoint ``open_source`` accepts."""
    if model in RANDOM_MODELS:
        return random_source(model, seed)
    return open_source(model)
