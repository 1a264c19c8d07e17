"""The architectures tensorpar runs: one row each (``Architecture``), naming its module, the config
types it reads, the readers that read them and what it can do. Several rows may share a module.

An architecture module (``tensorpar.models.llama`` is the example) holds everything that is
particular to the architecture's model:

- ``MODEL``: the plain single-device ``nn.Module`` class, built as ``MODEL(config)`` on the
  ``meta`` device (most assemble ``tensorpar.models.blocks.CausalLM``, which the config's
  choices shape). ``forward(input_ids, batch=None, cache=None)`` returns final hidden states
  [B, S, hidden]; ``logits`` maps them to the vocabulary; ``kv_cache_shape()`` gives the
  (local KV heads, head dim) each layer caches. Fused linears list their parts in ``fused_parts``.
- ``PLAN``: module path pattern -> sharding style (``tensorpar.plans``); a mixture-of-experts
  model also ``EXPERT_PLAN``: its MoE layers, which the ``experts`` style replaces by
  ``layers.experts.ExpertParallelMoE``, placed by the expert-parallel degree (``apply_plan(ep=)``).
- ``hf_tensor(name, config, stored)``: where the model's tensor ``name`` (a parameter path, fused
  linears split into their parts) is stored in a safetensors checkpoint whose tensor names are
  ``stored``: a ``tensorpar.models.names.TensorRef`` (stored name, rows of a fused tensor,
  transposed), or None.
- for a row that reads GGUF files, ``gguf_tensor(name, config, stored)`` (the same in llama.cpp's
  names) and ``from_gguf_layout(name, tensor, config, gguf_architecture)``: undo what llama.cpp's
  converter did to a tensor (given a slice whose rows hold whole attention heads).
- optionally ``CHAT_TEMPLATE`` and ``EOS_TOKENS``: for tokenizers (GGUF files) that lack them.

The row says which Hugging Face ``model_type`` values and GGUF ``general.architecture`` values
the module reads and names the torch-free function that reads each kind of config
(``tensorpar.models.readers``; a Llama-like config is ``read_llama``'s, whatever its model_type);
``ModelConfig.from_hf`` / ``from_gguf`` dispatch through it, and ``to_hf`` through its writer.
Its capabilities (``trainable``, ``writes_hf_config``) are what training and the planner ask.

``ARCHITECTURES`` are the built-in rows; ``register`` adds one whose module lives elsewhere (a
plugin, a test). Nothing in ``loading/``, ``train/`` or ``runtime/`` branches on an architecture. This
module imports no torch; the architecture module is imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from types import ModuleType

from tensorpar.models import readers


@dataclass(frozen=True)
class Architecture:
    """One architecture: its module, the config types it reads, how it reads them, what it can do.

    ``name``: the row's name. ``module``: the architecture module's dotted name, imported on first
    use. ``hf_model_types``: the Hugging Face ``model_type`` values it reads, all with ``read_hf``
    (a function of ``tensorpar.models.readers``' kind: config.json -> ``ModelConfig`` fields).
    ``gguf_architectures``: the GGUF ``general.architecture`` values it reads, with ``read_gguf``.
    ``trainable``: ``tensorpar train`` runs it. ``write_hf``: ``ModelConfig`` -> config.json, for a
    model read from GGUF whose checkpoint is written back (training, export); None where there is none.
    A row travels to the ranks with a checkpoint source: its readers must pickle (module-level
    functions, or values such as ``readers.gguf_as(...)``).
    """

    name: str
    module: str
    hf_model_types: tuple[str, ...]
    _: KW_ONLY
    read_hf: Callable[[dict], dict]
    gguf_architectures: tuple[str, ...] = ()
    read_gguf: Callable[..., dict] | None = None
    trainable: bool = False
    write_hf: Callable[..., dict] | None = None

    def __post_init__(self):
        if not self.hf_model_types:
            raise ValueError(f"architecture {self.name!r} names no model_type")
        if not callable(self.read_hf):
            raise ValueError(f"architecture {self.name!r}: read_hf must be a config.json reader, got {self.read_hf!r}")
        if bool(self.gguf_architectures) != callable(self.read_gguf):
            raise ValueError(f"architecture {self.name!r}: GGUF architectures {self.gguf_architectures} need a "
                             f"read_gguf reader and a reader needs them (read_gguf={self.read_gguf!r})")
        if self.write_hf is not None and not callable(self.write_hf):
            raise ValueError(f"architecture {self.name!r}: write_hf must be a config.json writer or None")

    @property
    def writes_hf_config(self) -> bool:
        """Whether a model of this architecture read from GGUF can be saved as a Hugging Face checkpoint."""
        return self.write_hf is not None

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


_LLAMA = "tensorpar.models.llama"
_QWEN_MOE = "tensorpar.models.qwen_moe"

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", _LLAMA, ("llama", "mistral"), read_hf=readers.read_llama,
                 gguf_architectures=("llama",), read_gguf=readers.gguf_llama,
                 trainable=True, write_hf=readers.write_llama),
    Architecture("qwen2", _LLAMA, ("qwen2",), read_hf=readers.read_qwen2,
                 gguf_architectures=("qwen2",), read_gguf=readers.gguf_as("qwen2"),
                 trainable=True, write_hf=readers.write_qwen2),
    Architecture("qwen3", "tensorpar.models.qwen3", ("qwen3",), read_hf=readers.read_qwen3,
                 gguf_architectures=("qwen3",), read_gguf=readers.gguf_as("qwen3", qk_norm=True)),
    Architecture("gemma3", "tensorpar.models.gemma3", ("gemma3_text",), read_hf=readers.read_gemma3,
                 gguf_architectures=("gemma3",), read_gguf=readers.gguf_gemma3),
    Architecture("phi3", "tensorpar.models.phi3", ("phi3",), read_hf=readers.read_llama),
    Architecture("gpt2", "tensorpar.models.gpt2", ("gpt2",), read_hf=readers.read_gpt2,
                 gguf_architectures=("gpt2",), read_gguf=readers.gguf_gpt2),
    # (GGUF: llama.cpp writes Mixtral as a ``llama`` file with experts, which ``gguf_llama`` reads)
    Architecture("mixtral", "tensorpar.models.mixtral", ("mixtral",), read_hf=readers.read_mixtral),
    Architecture("qwen2_moe", _QWEN_MOE, ("qwen2_moe",), read_hf=readers.read_qwen2_moe),
    Architecture("qwen3_moe", _QWEN_MOE, ("qwen3_moe",), read_hf=readers.read_qwen3_moe,
                 gguf_architectures=("qwen3moe",), read_gguf=readers.gguf_as("qwen3_moe", qk_norm=True)),
)

MODEL_TYPES: tuple[str, ...] = tuple(t for a in ARCHITECTURES for t in a.hf_model_types)
GGUF_ARCHITECTURES: tuple[str, ...] = tuple(g for a in ARCHITECTURES for g in a.gguf_architectures)

_registered: list[Architecture] = []


def architectures() -> tuple[Architecture, ...]:
    """The built-in ``ARCHITECTURES``, then those added by ``register``."""
    return (*ARCHITECTURES, *_registered)


def model_types() -> tuple[str, ...]:
    """Every Hugging Face ``model_type`` read: the built-in ``MODEL_TYPES``, then the registered ones'."""
    return tuple(t for a in architectures() for t in a.hf_model_types)


def gguf_architectures() -> tuple[str, ...]:
    """Every GGUF ``general.architecture`` read, built-in and registered."""
    return tuple(g for a in architectures() for g in a.gguf_architectures)


def register(arch: Architecture) -> Architecture:
    """Add ``arch`` (an architecture whose module lives outside this package) beside the built-in
    ones; registering the same row again changes nothing. ``ValueError`` if another row has its
    name or reads one of its model_types or GGUF architectures. In a process of its own (a spawned
    rank), the row must be registered there too."""
    if arch in architectures():
        return arch
    for other in architectures():
        clash = (other.name == arch.name or set(other.hf_model_types) & set(arch.hf_model_types)
                 or set(other.gguf_architectures) & set(arch.gguf_architectures))
        if clash:
            raise ValueError(f"architecture {arch.name!r} clashes with the registered {other.name!r} "
                             f"(names, model_types {other.hf_model_types}, GGUF {other.gguf_architectures})")
    _registered.append(arch)
    return arch


def unregister(name: str) -> None:
    """Remove the architecture ``name`` that ``register`` added (the built-in ones stay)."""
    _registered[:] = [a for a in _registered if a.name != name]


def for_model_type(model_type: str) -> Architecture:
    """The architecture that reads Hugging Face ``model_type``; ``ValueError`` naming the supported ones."""
    for arch in architectures():
        if model_type in arch.hf_model_types:
            return arch
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(model_types())}")


def for_gguf(gguf_architecture: str) -> Architecture:
    """The architecture that reads GGUF files of ``general.architecture`` = ``gguf_architecture``."""
    for arch in architectures():
        if gguf_architecture in arch.gguf_architectures:
            return arch
    raise ValueError(f"unsupported GGUF architecture {gguf_architecture!r} "
                     f"(supported: {', '.join(gguf_architectures())})")


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
