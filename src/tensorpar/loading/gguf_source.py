"""GGUF files (llama.cpp's format).

The header (metadata and tensor index) is read once, by ``GGUFFile``, in the process that opens
the model; the source pickles without it having to be read again, so ranks only memory-map the
file and read their slices. Tensor names are mapped to Hugging Face names, and tensors back to
Hugging Face's layout, by the architecture module (``gguf_tensor_name``, ``from_gguf_layout``).
Quantized tensors are dequantized on load, and only the blocks that hold the requested slice.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tensorpar.errors import CheckpointError
from tensorpar.loading.gguf_file import GGUFFile
from tensorpar.loading.sources import CheckpointSource
from tensorpar.models.config import ModelConfig
from tensorpar.models.registry import for_gguf


class GGUFSource(CheckpointSource):
    def __init__(self, path: Path):
        self.path = path
        self.file = GGUFFile(path)
        self.gguf_architecture = self.file.metadata.get("general.architecture")
        try:
            self._arch = for_gguf(self.gguf_architecture)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        module = self._arch.load()
        self._names = {}  # Hugging Face name -> GGUF name
        for name in self.file.tensors:
            hf = module.gguf_tensor_name(name)
            if hf is not None:
                self._names[hf] = name
        try:
            self.config = ModelConfig.from_gguf(self.file.metadata, {*self._names, *self.file.tensors})
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: incomplete or unsupported GGUF metadata: {e}") from e

    def names(self) -> set[str]:
        return set(self._names)

    def file_of(self, name: str) -> str:
        return str(self.path)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.tensors[self._names[name]].shape

    def _read(self, name, rows, cols) -> torch.Tensor:
        out = torch.from_numpy(self.file.read(self._names[name], rows, cols))
        return self._arch.load().from_gguf_layout(name, out, self.config, self.gguf_architecture)

    def tokenizer(self, cache: bool = True):
        from tensorpar.loading.tokenizer_cache import load_tokenizer

        return load_tokenizer(self.path, gguf_file=self.path.name, cache=cache, header_sha256=self.file.header_sha256())
