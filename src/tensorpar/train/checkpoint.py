"""Sharded, reshardable training checkpoints.

A checkpoint is a directory ``step-NNNNNNNN`` holding

- ``rank-TTTTT-of-PPPPP.safetensors``, one per tensor-parallel rank of data-parallel replica 0:
  that rank's local parameters (``model/<name>``) and AdamW moments (``exp_avg/<name>``,
  ``exp_avg_sq/<name>``) exactly as they sit in memory;
- ``metadata.json``: the step, the degrees, the model config, every full tensor's global shape,
  and for every piece of every local tensor the full tensor, axis and span it holds (the layers'
  own ``pieces()``, see ``tensorpar.layers.pieces``);
- ``config.json`` and the tokenizer, so the directory describes its model on its own.

Every rank writes into ``.step-NNNNNNNN.tmp``, which rank 0 renames into place only after all
writes are complete and flushed: a process killed mid-save leaves the previous checkpoint intact
and the half-written one invisible. Loading reads the pieces back as slices of full tensors
(``ShardedCheckpointSource``), so the normal loader reshards to any other degree.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from tensorpar.distributed.collectives import all_gather_object
from tensorpar.distributed.mesh import Mesh
from tensorpar.errors import CheckpointError
from tensorpar.layers.pieces import model_pieces
from tensorpar.loading.loader import expected_shapes
from tensorpar.loading.sources import CheckpointSource, read_json
from tensorpar.models.config import ModelConfig

FORMAT = "tensorpar-sharded-checkpoint-v1"
KINDS = ("model", "exp_avg", "exp_avg_sq")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier(mesh: Mesh) -> None:
    if mesh.world.world_size > 1:
        dist.barrier(group=mesh.world.group)


def save_checkpoint(root: str | Path, step: int, mesh: Mesh, model, optimizer, extra: dict, tokenizer) -> Path:
    """Write step ``step`` of a run under ``root``; collective over the whole mesh. Returns its path."""
    root = Path(root)
    final, tmp = step_dir(root, step), root / f".step-{step:08d}.tmp"
    if mesh.world.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier(mesh)
    tp, tp_rank = mesh.tp.world_size, mesh.tp.rank
    entries = []
    if mesh.dp.rank == 0:
        file = f"rank-{tp_rank:05d}-of-{tp:05d}.safetensors"
        tensors = {}
        for pp in model_pieces(model):
            state = optimizer.state.get(pp.param, {})
            for kind in KINDS:
                t = pp.param if kind == "model" else state.get(kind)
                if t is not None:
                    tensors[f"{kind}/{pp.name}"] = t.detach().cpu().contiguous()
            for pc in pp.pieces:
                if pc.part is None or (pc.axis is None and tp_rank != 0):
                    continue  # padding is not data; a replicated tensor is written once
                entries.append({
                    "name": pp.full_name(pc), "file": file, "key": pp.name, "axis": pc.axis,
                    "span": None if pc.span is None else [pc.span.start, pc.span.stop],
                    "local": None if pc.local is None else [pc.local.start, pc.local.stop],
                })
        save_file(tensors, str(tmp / file))
        _fsync(tmp / file)
    everyone = all_gather_object(entries, mesh.world)
    if mesh.world.rank == 0:
        config: ModelConfig = model.config
        meta = {
            "format": FORMAT,
            "step": step,
            "tp": tp,
            "dp": mesh.dp.world_size,
            "config": config.to_hf(),
            "tensors": {n: list(s) for n, s in sorted(expected_shapes(config).items())},
            "pieces": [e for rank_entries in everyone for e in rank_entries],
            "optimizer_step": step,
            **extra,
        }
        (tmp / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=1) + "\n")
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
    _barrier(mesh)
    if mesh.world.rank == 0:
        old = root / f".step-{step:08d}.old"
        if final.exists():  # a step saved again: the old copy stays until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        commit(tmp, final)
        _fsync(root)
        shutil.rmtree(old, ignore_errors=True)
    _barrier(mesh)
    return final


def commit(tmp: Path, final: Path) -> None:
    """Make a complete checkpoint visible: one atomic rename."""
    os.rename(tmp, final)


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
        self._handles: dict[str, object] = {}

    def _slice(self, entry: dict):
        file = entry["file"]
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.path / file), framework="pt")
            except Exception as e:
                raise CheckpointError(f"{self.path / file}: unreadable checkpoint shard: {e}") from e
        key = f"{self.kind}/{entry['key']}"
        if key not in self._handles[file].keys():
            raise CheckpointError(f"{self.path / file}: has no {key!r} (saved without optimizer state?)")
        return self._handles[file].get_slice(key)

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

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path))
