"""Hugging Face directories: ``config.json`` plus ``model.safetensors`` or a sharded index."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from tensorpar.errors import CheckpointError
from tensorpar.loading.sources import CheckpointSource, read_json
from tensorpar.models.config import ModelConfig


class SafetensorsSource(CheckpointSource):
    def __init__(self, path: Path):
        self.path = path
        try:
            self.config = ModelConfig.from_hf(read_json(path / "config.json"))
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path / 'config.json'}: {e}") from e
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.exists():
            self._files = {k: path / v for k, v in read_json(index)["weight_map"].items()}
        elif single.exists():
            self._files = {k: single for k in self._handle(single).keys()}
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")

    def _handle(self, file: Path):
        handles = self.__dict__.setdefault("_handles", {})  # reopened after unpickling
        if file not in handles:
            if not file.exists():
                raise CheckpointError(f"{file}: checkpoint file is missing (named by the index)")
            try:
                handles[file] = safe_open(str(file), framework="pt")
            except Exception as e:
                raise CheckpointError(f"{file}: not a readable safetensors file (truncated?): {e}") from e
        return handles[file]

    def names(self) -> set[str]:
        return set(self._files)

    def file_of(self, name: str) -> str:
        return str(self._files.get(name, self.path))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._files[name]).get_slice(name).get_shape())

    def _read(self, name, rows, cols) -> torch.Tensor:
        sl = self._handle(self._files[name]).get_slice(name)
        r = slice(None) if rows is None else slice(rows.start, rows.stop)
        if cols is None:
            return sl[r]
        return sl[r, cols.start : cols.stop]

    def tokenizer(self, cache: bool = True):
        from tensorpar.loading.tokenizer_cache import load_tokenizer

        return load_tokenizer(self.path, cache=cache)
