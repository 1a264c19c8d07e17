"""tensorpar's own training checkpoints, read as slices of full tensors at any degree.

A checkpoint is a directory ``step-NNNNNNNN`` (written by ``tensorpar.train.checkpoint``) holding

- ``rank-TTTTT-of-PPPPP.safetensors``, one per tensor-parallel rank of data-parallel replica 0:
  that rank's local parameters (``model/<name>``) and AdamW moments (``exp_avg/<name>``,
  ``exp_avg_sq/<name>``) exactly as they sat in memory;
- ``metadata.json``: the step, the degrees, the model config, every full tensor's global shape,
  and for every piece of every local tensor the full tensor, axis and span it holds (the layers'
  own ``pieces()``, see ``tensorpar.layers.pieces``);
- ``config.json`` and the tokenizer, so the directory describes its model on its own.

``ShardedCheckpointSource`` assembles any requested slice from the saved pieces that overlap it,
so the normal loader reshards to any degree: ``tensorpar generate --model RUN/step-20 --tp 3``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from tensorpar.errors import CheckpointError
from tensorpar.loading.sources import CheckpointSource, read_json, safetensors_trouble
from tensorpar.models.config import ModelConfig

FORMAT = "tensorpar-sharded-checkpoint-v1"
KINDS = ("model", "exp_avg", "exp_avg_sq")


def is_checkpoint(path: Path) -> bool:
    """``path`` is a checkpoint, or a run directory holding some."""
    return (path / "metadata.json").is_file() or any(path.glob("step-*/metadata.json"))


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a checkpoint, else its latest complete ``step-*`` directory."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {str(path)!r}: not a directory")
    steps = sorted(p for p in path.glob("step-*") if (p / "metadata.json").is_file())
    if not steps:
        raise CheckpointError(f"no complete checkpoint (step-*/metadata.json) under {path}")
    return steps[-1]


class ShardedCheckpointSource(CheckpointSource):
    """One kind of tensor (``model``, ``exp_avg`` or ``exp_avg_sq``) of a sharded checkpoint, read
    as slices of full tensors: each slice is assembled from the pieces that overlap it."""

    def __init__(self, path: str | Path, kind: str = "model"):
        self.path = find_checkpoint(path)
        self.meta = read_json(self.path / "metadata.json")
        if self.meta.get("format") != FORMAT:
            raise CheckpointError(f"{self.path}: not a tensorpar checkpoint (format {self.meta.get('format')!r})")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.config = ModelConfig.from_hf(self.meta["config"])
        self.step = int(self.meta["step"])
        self._pieces: dict[str, list[dict]] = {}
        for e in self.meta["pieces"]:
            self._pieces.setdefault(e["name"], []).append(e)

    def _open_files(self) -> None:
        for entries in self._pieces.values():
            for entry in entries:
                self._slice(entry)

    def _slice(self, entry: dict):
        file = entry["file"]
        handles = self.__dict__.setdefault("_handles", {})  # reopened after unpickling
        if file not in handles:
            try:
                handles[file] = safe_open(str(self.path / file), framework="pt")
            except Exception as e:
                raise CheckpointError(
                    f"{self.path / file}: unreadable checkpoint shard ({safetensors_trouble(e)}): {e}") from e
        key = f"{self.kind}/{entry['key']}"
        if key not in handles[file].keys():
            raise CheckpointError(f"{self.path / file}: has no {key!r} (saved without optimizer state?)")
        return handles[file].get_slice(key)

    def names(self) -> set[str]:
        return set(self.meta["tensors"])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.meta["tensors"][name])

    def file_of(self, name: str) -> str:
        return str(self.path)

    def _read(self, name, rows, cols) -> torch.Tensor:
        shape = self.shape(name)
        want = [range(shape[0]) if rows is None else rows]
        if len(shape) == 2:
            want.append(range(shape[1]) if cols is None else cols)
        out = covered = None
        for e in self._pieces.get(name, []):
            sl = self._slice(e)
            if e["axis"] is None:  # the whole tensor
                index = tuple(slice(w.start, w.stop) for w in want)
                return sl[index]
            axis = e["axis"]
            span, local = range(*e["span"]), range(*e["local"])
            lo, hi = max(span.start, want[axis].start), min(span.stop, want[axis].stop)
            if lo >= hi:
                continue
            index = [slice(w.start, w.stop) for w in want]
            index[axis] = slice(local.start + lo - span.start, local.start + hi - span.start)
            dst = [slice(None)] * len(want)
            dst[axis] = slice(lo - want[axis].start, hi - want[axis].start)
            piece = sl[tuple(index)]
            if out is None:
                out = torch.empty([len(w) for w in want], dtype=piece.dtype)
                covered = torch.zeros(len(want[axis]), dtype=torch.bool)
            out[tuple(dst)] = piece
            covered[lo - want[axis].start : hi - want[axis].start] = True
        if covered is None or not bool(covered.all()):
            raise CheckpointError(f"{self.path}: the saved pieces of {name!r} do not cover the requested slice")
        return out

    def tokenizer(self, cache: bool = True):
        from tensorpar.loading.tokenizer_cache import load_tokenizer

        return load_tokenizer(self.path, cache=cache)
