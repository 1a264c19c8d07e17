"""GGUF files (llama.cpp's format).

The header (metadata and tensor index) is read once, by ``GGUFFile``, in the process that opens
the model; the source pickles without it having to be read again, so ranks only memory-map the
file and read their slices. Tensor names are mapped to Hugging Face names, and tensors back to
Hugging Face's layout, by the architecture module (``gguf_tensor_name``, ``from_gguf_layout``),
imported where tensors are read. Quantized tensors are dequantized on load, and only the blocks
that hold the requested slice.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

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
            self.config = ModelConfig.from_gguf(self.file.metadata, set(self.file.tensors))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: unsupported or incomplete GGUF metadata: {e}") from e

    @cached_property
    def _names(self) -> dict[str, str]:
        """Hugging Face name -> GGUF name, for the tensors the model uses."""
        module = self._arch.load()
        return {hf: name for name in self.file.tensors if (hf := module.gguf_tensor_name(name)) is not None}

    def names(self) -> set[str]:
        return set(self._names)

    def file_of(self, name: str) -> str:
        return str(self.path)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.tensors[self._names[name]].shape

    def _read(self, name, rows, cols):
        import torch

        out = torch.from_numpy(self.file.read(self._names[name], rows, cols))
        return self._arch.load().from_gguf_layout(name, out, self.config, self.gguf_architecture)

    def tokenizer(self, cache: bool = True):
        from tensorpar.loading.tokenizer_cache import load_tokenizer

        return load_tokenizer(self.path, gguf_file=self.path.name, cache=cache, header_sha256=self.file.header_sha256())
