"""The architectures tensorpar runs: one row each, naming one module.

An architecture module (``tensorpar.models.llama`` is the example) holds everything that is
particular to the architecture:

- ``MODEL``: the plain single-device ``nn.Module`` class, built as ``MODEL(config)`` on the
  ``meta`` device (most assemble ``tensorpar.models.blocks.CausalLM``, which the config's
  choices shape). ``forward(input_ids, batch=None, cache=None)`` returns final hidden states
  [B, S, hidden]; ``logits`` maps them to the vocabulary; ``kv_cache_shape()`` gives the
  (local KV heads, head dim) each layer caches. Fused linears list their parts in ``fused_parts``.
- ``PLAN``: module path pattern -> sharding style (``tensorpar.plans``); a mixture-of-experts
  model also ``EXPERT_PLAN``: its MoE layers, which the ``experts`` style replaces by
  ``layers.experts.ExpertParallelMoE``, placed by the expert-parallel degree (``apply_plan(ep=)``).
- ``hf_tensor(name, config, stored)`` and ``gguf_tensor(name, config, stored)``: where the
  model's tensor ``name`` (a parameter path, fused linears split into their parts) is stored in
  a safetensors checkpoint or a GGUF file whose tensor names are ``stored``: a
  ``tensorpar.models.names.TensorRef`` (stored name, rows of a fused tensor, transposed), or None.
- ``from_gguf_layout(name, tensor, config, gguf_architecture)``: undo what llama.cpp's converter
  did to a tensor (given a slice whose rows hold whole attention heads).
- optionally ``CHAT_TEMPLATE`` and ``EOS_TOKENS``: for tokenizers (GGUF files) that lack them.

The row says which Hugging Face ``model_type`` values and GGUF ``general.architecture`` values
the module reads. Reading their configs is ``ModelConfig.from_hf`` / ``from_gguf``. Nothing in
``loading/`` or ``runtime/`` names an architecture. This module imports no torch; the
architecture module is imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Architecture:
    name: str
    module: str
    hf_model_types: tuple[str, ...]
    gguf_architectures: tuple[str, ...] = ()

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", "tensorpar.models.llama", ("llama", "mistral", "qwen2"), ("llama", "qwen2")),
    Architecture("qwen3", "tensorpar.models.qwen3", ("qwen3",), ("qwen3",)),
    Architecture("gemma3", "tensorpar.models.gemma3", ("gemma3_text",), ("gemma3",)),
    Architecture("phi3", "tensorpar.models.phi3", ("phi3",)),
    Architecture("gpt2", "tensorpar.models.gpt2", ("gpt2",), ("gpt2",)),
    Architecture("mixtral", "tensorpar.models.mixtral", ("mixtral",)),  # (GGUF: a ``llama`` file with experts)
    Architecture("qwen_moe", "tensorpar.models.qwen_moe", ("qwen2_moe", "qwen3_moe"), ("qwen3moe",)),
)

MODEL_TYPES: tuple[str, ...] = tuple(t for a in ARCHITECTURES for t in a.hf_model_types)
GGUF_ARCHITECTURES: tuple[str, ...] = tuple(g for a in ARCHITECTURES for g in a.gguf_architectures)


def for_model_type(model_type: str) -> Architecture:
    """The architecture that reads Hugging Face ``model_type``; ``ValueError`` naming the supported ones."""
    for arch in ARCHITECTURES:
        if model_type in arch.hf_model_types:
            return arch
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}")


def for_gguf(gguf_architecture: str) -> Architecture:
    """The architecture that reads GGUF files of ``general.architecture`` = ``gguf_architecture``."""
    for arch in ARCHITECTURES:
        if gguf_architecture in arch.gguf_architectures:
            return arch
    raise ValueError(f"unsupported GGUF architecture {gguf_architecture!r} (supported: {', '.join(GGUF_ARCHITECTURES)})")


def model_module(config) -> ModuleType:
    """The architecture module of a ``ModelConfig``."""
    return for_model_type(config.architecture).load()


def build_model(config):
    """The plain model of ``config`` (on the current default device; use ``torch.device("meta")``)."""
    return model_module(config).MODEL(config)


def checkpoint_shapes(config) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> full shape, as the config implies: every parameter of the plain
    model, fused linears split into their ``fused_parts``, a tied LM head left out."""
    import torch

    with torch.device("meta"):
        model = build_model(config)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0]
        parts = getattr(module, "fused_parts", None)
        if parts:
            for part, n in parts:
                shapes[f"{parent}.{part}.weight"] = (n, module.in_features)
                if module.bias is not None:
                    shapes[f"{parent}.{part}.bias"] = (n,)
            continue
        for pname, p in module.named_parameters(recurse=False):
            shapes[f"{name}.{pname}"] = tuple(p.shape)
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes
