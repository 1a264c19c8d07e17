"""GGUF files (llama.cpp's format).

The header (metadata and tensor index) is read once, by ``GGUFFile``, in the process that opens
the model; the source pickles without it having to be read again, so ranks only memory-map the
file and read their slices. Where each model tensor is stored, and how to undo what llama.cpp's
converter did to it, is the architecture module's to say (``gguf_tensor``, ``from_gguf_layout``),
imported where tensors are read. Quantized tensors are dequantized on load, and only the blocks
that hold the requested slice; or (``read_codes``, for ``--quantization gguf``) kept as the
blocks' own codes.
"""

from __future__ import annotations

from pathlib import Path

from tensorpar.errors import CheckpointError
from gguf import GGMLQuantizationType

from tensorpar.loading.gguf_file import GGUFFile, can_read
from tensorpar.loading.sources import StoredTensorsSource
from tensorpar.models.config import ModelConfig
from tensorpar.models.registry import for_gguf, for_model_type

ROPE_FACTORS = "rope_freqs.weight"  # llama.cpp's per-frequency divisors (Llama 3.x's rope scaling)


class GGUFSource(StoredTensorsSource):
    def __init__(self, path: Path):
        self.path = path
        self.file = GGUFFile(path)
        self.gguf_architecture = self.file.metadata.get("general.architecture")
        try:
            self._arch = for_gguf(self.gguf_architecture)
            factors = None
            if ROPE_FACTORS in self.file.tensors:
                factors = self.file.read(ROPE_FACTORS).tolist()
            self.config = ModelConfig.from_gguf(self.file.metadata, set(self.file.tensors), factors)
            self._arch = for_model_type(self.config.architecture)  # (a llama file with experts is Mixtral)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: unsupported or incomplete GGUF metadata: {e}") from e
        for ref in self._refs.values():  # refused here, before any rank starts
            info = self.file.tensors[ref.name]
            if not can_read(info.ggml_type):
                raise CheckpointError(
                    f"{path}: tensor {ref.name!r} is stored as {GGMLQuantizationType(info.ggml_type).name}, "
                    f"which the gguf package cannot dequantize")

    def _stored_names(self):
        return self.file.tensors.keys()

    def _locate(self, name: str):
        return self._arch.load().gguf_tensor(name, self.config, self.gguf_architecture)

    def file_of(self, name: str) -> str:
        return str(self.path)

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        return self.file.tensors[name].shape

    def _read_stored(self, name, rows, cols):
        import torch

        return torch.from_numpy(self.file.read(name, rows, cols))

    def _read(self, name, rows, cols):
        return self._arch.load().from_gguf_layout(name, super()._read(name, rows, cols), self.config,
                                                  self.gguf_architecture)

    def _read_codes(self, name, rows, cols):
        ref = self._refs[name]
        got = None if ref.transposed else self.file.read_codes(ref.name, self._stored_rows(ref, rows), cols)
        if got is None:
            return None
        codes, lead = got
        fix = self._arch.load().from_gguf_layout  # (for a linear weight: a reordering of whole heads' rows)
        return codes.map_rows(lambda t: fix(name, t, self.config, self.gguf_architecture)), lead

    def tokenizer(self, cache: bool = True):
        from tensorpar.loading.tokenizer_cache import load_tokenizer

        if "tokenizer.ggml.tokens" not in self.file.metadata:
            return None
        return load_tokenizer(self.path, gguf_file=self.path.name, cache=cache, header_sha256=self.file.header_sha256())
