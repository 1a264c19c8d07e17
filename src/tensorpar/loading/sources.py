"""Where weights come from: a checkpoint source reads any slice of any tensor by its name in the
model (``tensorpar.models.names``), touching only that slice's bytes (safetensors are
memory-mapped and sliced lazily; GGUF rows and quantization blocks are cut out of the memory map
before dequantization).

A source is opened once, in the process that resolves the model, and sent to the ranks: it
pickles without its open file handles, which each rank reopens on first read.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Collection
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from tensorpar.errors import CheckpointError
from tensorpar.models.config import ModelConfig

if TYPE_CHECKING:
    import torch

    from tensorpar.models.names import TensorRef


GENERATION_SAMPLING = ("temperature", "top_p", "top_k", "min_p")  # meaningful only where do_sample is set


def generation_defaults(gen: dict) -> dict:
    """The ``SamplingParams`` fields a ``generation_config.json`` recommends: its sampling
    settings where it samples (``do_sample``), its repetition penalty and ``max_new_tokens``."""
    out = {k: gen[k] for k in GENERATION_SAMPLING if gen.get("do_sample") and gen.get(k) is not None}
    out.update({k: gen[k] for k in ("repetition_penalty", "max_new_tokens") if gen.get(k) is not None})
    return out


class CheckpointSource(ABC):
    """A checkpoint that reads slices of tensors by their names in the model."""

    path: Path
    config: ModelConfig
    sampling_defaults: dict = {}  # SamplingParams fields the checkpoint recommends (generation_config.json)
    _handles: dict  # open files, dropped when pickled

    @abstractmethod
    def names(self) -> set[str]: ...

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def file_of(self, name: str) -> str: ...

    @abstractmethod
    def _read(self, name: str, rows: range | None, cols: range | None) -> "torch.Tensor": ...

    @abstractmethod
    def tokenizer(self, cache: bool = True):
        """The model's Hugging Face tokenizer, or None when the checkpoint ships none (token ids
        only). ``cache``: a converted tokenizer may be kept in the user's cache directory."""

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_handles"}

    def _read_codes(self, name: str, rows: range | None, cols: range | None):
        """``tensor[rows, cols]`` as the file's own quantization codes: (``BlockCodes``, lead
        column), or None where the tensor is not stored so (every float format)."""
        return None

    def read_codes(self, name: str, rows: range | None = None, cols: range | None = None,
                   expect: tuple[int, ...] | None = None):
        """``_read_codes`` of checkpoint tensor ``name``, with ``read``'s checks."""
        self._check(name, expect)
        try:
            return self._read_codes(name, rows, cols)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.file_of(name)}: cannot read tensor {name!r}: {e}") from e

    def _check(self, name: str, expect: tuple[int, ...] | None) -> None:
        if name not in self.names():
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        shape = self.shape(name)
        if expect is not None and tuple(shape) != tuple(expect):
            raise CheckpointError(
                f"{self.file_of(name)}: tensor {self.describe(name)} has shape {list(shape)}, "
                f"but the model's config implies {list(expect)}"
            )

    def describe(self, name: str) -> str:
        """Model tensor ``name`` as the file calls it."""
        return repr(name)

    def _open_files(self) -> None:
        """Open every file of the checkpoint (a header that cannot be read fails here)."""

    def verify(self) -> None:
        """Refuse, before any rank reads a weight, a file whose header cannot be read and a tensor
        whose shape is not the one the config implies, naming the file and the tensor."""
        from tensorpar.models.registry import checkpoint_shapes

        self._open_files()
        names = self.names()
        for name, expect in checkpoint_shapes(self.config).items():
            if name in names:
                self._check(name, expect)

    def read(
        self,
        name: str,
        rows: range | None = None,
        cols: range | None = None,
        expect: tuple[int, ...] | None = None,
    ) -> "torch.Tensor":
        """``tensor[rows, cols]`` of checkpoint tensor ``name``; checks its full shape is ``expect``."""
        self._check(name, expect)
        try:
            return self._read(name, rows, cols)
        except CheckpointError:
            raise
        except Exception as e:  # truncated files surface here as OS or decoding errors
            raise CheckpointError(f"{self.file_of(name)}: cannot read tensor {name!r}: {e}") from e


class StoredTensorsSource(CheckpointSource):
    """A file format whose stored tensors the architecture module locates (``hf_tensor``,
    ``gguf_tensor``): a model tensor is a stored one, a run of its rows, or its transpose."""

    @abstractmethod
    def _stored_names(self) -> Collection[str]: ...

    @abstractmethod
    def _stored_shape(self, stored: str) -> tuple[int, ...]: ...

    @abstractmethod
    def _read_stored(self, stored: str, rows: range | None, cols: range | None) -> "torch.Tensor": ...

    @abstractmethod
    def _locate(self, name: str) -> "TensorRef | None": ...

    @cached_property
    def _refs(self) -> dict[str, "TensorRef"]:
        """Model tensor name -> where it is stored, for the tensors this checkpoint has."""
        from tensorpar.models.registry import checkpoint_shapes

        stored = set(self._stored_names())
        wanted = [*checkpoint_shapes(self.config), "lm_head.weight"]  # a tied head may be stored too
        return {n: ref for n in dict.fromkeys(wanted) if (ref := self._locate(n)) is not None and ref.name in stored}

    def names(self) -> set[str]:
        return set(self._refs)

    def describe(self, name: str) -> str:
        stored = self._refs[name].name if name in self._refs else name
        return repr(stored) if stored == name else f"{stored!r} (the model's {name})"

    def shape(self, name: str) -> tuple[int, ...]:
        ref = self._refs[name]
        shape = tuple(self._stored_shape(ref.name))
        if ref.transposed:
            shape = shape[::-1]
        if ref.rows is None:
            return shape
        return (len(ref.rows), *shape[1:]) if len(shape) <= 2 else (len(ref.rows), shape[-1])  # (rows of a 2-D view)

    def _stored_rows(self, ref: "TensorRef", rows: range | None) -> range | None:
        if ref.rows is None:
            return rows
        start = ref.rows.start
        return ref.rows if rows is None else range(start + rows.start, start + rows.stop)

    def _read(self, name, rows, cols):
        ref = self._refs[name]
        rows = self._stored_rows(ref, rows)
        if ref.transposed:
            return self._read_stored(ref.name, cols, rows).T
        return self._read_stored(ref.name, rows, cols)


def safetensors_trouble(e: Exception) -> str:
    """What an error from opening a safetensors file most likely means."""
    return "truncated?" if "not fully covered" in str(e) or "too small" in str(e) else "corrupt header?"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON: {e}") from e
