"""Saving sharded, reshardable training checkpoints (the format: ``tensorpar.loading.tensorpar_checkpoint``).

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

import torch.distributed as dist
from safetensors.torch import save_file

from tensorpar.distributed.collectives import all_gather_object
from tensorpar.distributed.mesh import Mesh
from tensorpar.layers.pieces import model_pieces
from tensorpar.loading.tensorpar_checkpoint import FORMAT, KINDS
from tensorpar.models.config import ModelConfig
from tensorpar.models.registry import checkpoint_shapes
from tensorpar.train.pipeline import tied_copy


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
    stages = 1 if mesh.pp is None else mesh.pp.world_size
    entries = []
    if mesh.dp.rank == 0:
        file = f"rank-{tp_rank:05d}-of-{tp:05d}.safetensors"
        if stages > 1:
            file = f"stage-{mesh.pp.rank:03d}-{file}"
        tensors = {}
        for pp in model_pieces(model):
            if tied_copy(model, pp.param):  # the first stage writes the tied embedding
                continue
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
            "pp": stages,
            "dp": mesh.dp.world_size,
            "config": config.to_hf(),
            "tensors": {n: list(s) for n, s in sorted(checkpoint_shapes(config).items())},
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


