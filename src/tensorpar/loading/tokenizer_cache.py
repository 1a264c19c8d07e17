"""Tokenizers of checkpoints; a GGUF file's is converted once and cached.

transformers builds a Hugging Face tokenizer from a GGUF vocabulary (tokens, merges or scores,
special ids, chat template) on every load, which takes seconds. The converted tokenizer is saved
under ``<cache>/tokenizers/<key>/`` and later loads read that directory back. The key is the
sha256 of the file's size, its mtime in nanoseconds, its header sha256 and the transformers
version, so a replaced or edited file, or a converter that changed, gets a new entry.

An entry is saved into a temporary directory beside its final place and renamed into it. The
rename is atomic, so an entry that exists is complete: a crash leaves at most a temporary
directory, which is never read. Of processes that race, the first rename wins; the others fail
to rename onto the existing entry, discard their copy and return what they converted.

The cache is ``$TENSORPAR_CACHE_DIR``, else ``$XDG_CACHE_HOME/tensorpar``, else
``~/.cache/tensorpar``. When it cannot be written the tokenizer is converted without caching,
with a one-line warning on stderr.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from tensorpar.errors import CheckpointError

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def default_cache_dir() -> Path:
    """``$TENSORPAR_CACHE_DIR``, else ``$XDG_CACHE_HOME/tensorpar``, else ``~/.cache/tensorpar``."""
    if os.environ.get("TENSORPAR_CACHE_DIR"):
        return Path(os.environ["TENSORPAR_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "tensorpar"
    return Path.home() / ".cache" / "tensorpar"


def cache_key(path: Path, header_sha256: str) -> str:
    """The cache entry name of the GGUF file ``path`` whose header hashes to ``header_sha256``."""
    import transformers

    st = path.stat()
    fields = f"{st.st_size}\n{st.st_mtime_ns}\n{header_sha256}\n{transformers.__version__}"
    return hashlib.sha256(fields.encode()).hexdigest()[:32]


def load_tokenizer(
    path: Path,
    gguf_file: str | None = None,
    cache: bool = True,
    cache_dir: Path | None = None,
    header_sha256: str | None = None,
) -> Any:
    """The Hugging Face tokenizer of a checkpoint, or None for a directory that ships none.

    ``path`` is a Hugging Face directory or a GGUF file; a directory with ``gguf_file`` names the
    GGUF file in it, as transformers takes it. ``header_sha256`` saves re-reading the header of a
    GGUF file already parsed (``GGUFFile.header_sha256()``). ``cache=False`` converts a GGUF
    tokenizer and writes nothing.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    gguf = path if path.is_file() else path / gguf_file if gguf_file is not None else None
    if gguf is None:
        if not any((path / f).exists() for f in HF_TOKENIZER_FILES):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    if not gguf.is_file():
        raise CheckpointError(f"{gguf}: no such GGUF file")
    if not cache:
        return _convert(gguf)
    if header_sha256 is None:
        from tensorpar.loading.gguf_file import GGUFFile

        header_sha256 = GGUFFile(gguf).header_sha256()
    root = (cache_dir if cache_dir is not None else default_cache_dir()) / "tokenizers"
    entry = root / cache_key(gguf, header_sha256)
    if entry.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(entry))
    tokenizer = _convert(gguf)
    try:
        _store(tokenizer, root, entry)
    except OSError as e:
        print(f"tensorpar: warning: tokenizer cache {root} is not writable ({e}); not caching", file=sys.stderr)
    return tokenizer


def _convert(gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _store(tokenizer: Any, root: Path, entry: Path) -> None:
    """Save ``tokenizer`` as ``entry`` atomically; an entry that another process made stays."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
    try:
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
