"""A base model with LoRA adapters merged in, read like any checkpoint.

Every adapted projection reads W + (alpha / r) B A (``tensorpar.train.lora``): a slice
W[rows, cols] reads B[rows] and A[:, cols] only, so each rank merges just its own shard, at any
degree, and nothing else changes: the loader, the engine and ``export`` see plain weights.
The adapters are a LoRA training checkpoint of ``tensorpar train --lora-rank``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tensorpar.errors import TensorparError
from tensorpar.loading.sources import CheckpointSource
from tensorpar.loading.tensorpar_checkpoint import ShardedCheckpointSource


def lora_meta(adapter: ShardedCheckpointSource) -> dict:
    """The checkpoint's LoRA settings ({rank, alpha, targets, base}); refuses a whole-model checkpoint."""
    meta = adapter.meta.get("lora")
    if meta is None:
        raise TensorparError(f"{adapter.path} is a whole-model checkpoint, not LoRA adapters: give it as --model")
    return meta


class LoraMergedSource(CheckpointSource):
    """``base`` with the adapters of the checkpoint at ``adapter`` merged (module docstring)."""

    def __init__(self, base: CheckpointSource, adapter: str | Path):
        self.base = base
        self.adapter = ShardedCheckpointSource(adapter)
        meta = lora_meta(self.adapter)
        self.scale = float(meta["alpha"]) / int(meta["rank"])
        self.config, self.path = base.config, base.path
        self.sampling_defaults = base.sampling_defaults
        if self.adapter.config.to_hf() != base.config.to_hf():
            raise TensorparError(f"the adapters at {self.adapter.path} were trained on {meta['base']}, whose config "
                                 f"differs from {base.path}'s: give that model as --model")
        self.adapted = {n.removesuffix(".lora_A.weight") + ".weight" for n in self.adapter.names()
                        if n.endswith(".lora_A.weight")}

    def __getattr__(self, name: str):  # anything else a source may say (a GGUF file's architecture, ...)
        if name in ("base", "__setstate__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def names(self) -> set[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def file_of(self, name: str) -> str:
        return self.base.file_of(name)

    def describe(self, name: str) -> str:
        return self.base.describe(name)

    def _open_files(self) -> None:
        self.base._open_files()
        self.adapter._open_files()

    def _read(self, name: str, rows: range | None, cols: range | None) -> torch.Tensor:
        w = self.base.read(name, rows, cols)
        if name not in self.adapted:
            return w
        head = name.removesuffix(".weight")
        b = self.adapter.read(f"{head}.lora_B.weight", rows, None).float()  # [rows, r]
        a = self.adapter.read(f"{head}.lora_A.weight", None, cols).float()  # [r, cols]
        return w.float() + self.scale * (b @ a)

    def _read_codes(self, name: str, rows: range | None, cols: range | None):
        return None if name in self.adapted else self.base._read_codes(name, rows, cols)

    def tokenizer(self, cache: bool = True):
        return self.base.tokenizer(cache)
