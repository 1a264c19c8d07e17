"""Full tensors held in memory, read like a checkpoint (a model drawn at random, for one)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from tensorpar.loading.sources import CheckpointSource
from tensorpar.models.config import ModelConfig


class TensorSource(CheckpointSource):
    """``tensors`` by Hugging Face name; ``tokenizer`` is a function called on first use."""

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor], tokenizer: Callable, name: str):
        self.config, self._tensors, self._tokenizer = config, tensors, tokenizer
        self.path = Path(name)

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def file_of(self, name: str) -> str:
        return str(self.path)

    def _read(self, name, rows, cols) -> torch.Tensor:
        t = self._tensors[name]
        if rows is not None:
            t = t[rows.start : rows.stop]
        if cols is not None:
            t = t[:, cols.start : cols.stop]
        return t

    def tokenizer(self, cache: bool = True):
        return self._tokenizer()
