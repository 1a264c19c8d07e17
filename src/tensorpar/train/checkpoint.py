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

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from tensorpar.distributed.collectives import all_gather_object
from tensorpar.distributed.mesh import Mesh
from tensorpar.errors import TensorparError
from tensorpar.layers.pieces import trainable_pieces
from tensorpar.loading.loader import fill_parameter
from tensorpar.loading.tensorpar_checkpoint import FORMAT, KINDS, ShardedCheckpointSource
from tensorpar.models.config import ModelConfig
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


def save_checkpoint(root: str | Path, step: int, mesh: Mesh, model, optimizer, extra: dict, tokenizer,
                    shapes: dict) -> Path:
    """Write step ``step`` of a run under ``root``: the trained parameters (all, or a LoRA
    adapter's), full shapes ``shapes``; collective over the whole mesh. Returns its path."""
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
        for pp in trainable_pieces(model):
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
            "tensors": {n: list(s) for n, s in sorted(shapes.items())},
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


def resumed_seed(meta: dict, seed: int | None) -> int:
    """The seed a resumed run continues with: the checkpoint's (batch order and dropout masks
    depend on it); a different ``--seed`` is refused rather than silently changing the data."""
    saved = meta.get("seed", 0)
    if seed is not None and seed != saved:
        raise TensorparError(f"the checkpoint was trained with --seed {saved}; resume it with that seed "
                             f"(or leave --seed out), not --seed {seed}")
    return saved


def resumed_lora(meta: dict, cfg) -> "LoraConfig | None":
    """The adapters a resumed run trains: the checkpoint's (given again, the LoRA flags must match)."""
    from tensorpar.train.lora import LoraConfig

    saved = meta.get("lora")
    if saved is None:
        if cfg.lora_rank:
            raise TensorparError("the checkpoint holds a whole model, not LoRA adapters: `tensorpar export` it and "
                                 "give the export as --model to train adapters on it")
        return None
    lora = LoraConfig.from_json(saved)
    if cfg.lora_rank and LoraConfig.parse(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) != lora:
        raise TensorparError(f"the checkpoint's adapters are rank {lora.rank}, alpha {lora.alpha:g} on "
                             f"{','.join(lora.targets)}: resume with those (or leave the --lora flags out)")
    return lora


def load_optimizer_state(optimizer, model, path, step: int, expected) -> None:
    """AdamW moments from a checkpoint, resharded to this rank's pieces like the weights."""
    sources = {kind: ShardedCheckpointSource(path, kind) for kind in ("exp_avg", "exp_avg_sq")}
    for pp in trainable_pieces(model):
        state = {"step": torch.tensor(float(step))}
        for kind, source in sources.items():
            state[kind] = torch.zeros_like(pp.param)
            fill_parameter(pp, state[kind], source, expected)
        optimizer.state[pp.param] = state


def gather_full_tensors(model, optimizer, mesh: Mesh, kind: str, shapes: dict) -> dict[str, torch.Tensor] | None:
    """The trained tensors in full (checkpoint names, ``shapes``) on rank 0, assembled from every
    rank's pieces: ``model`` (weights), ``grad``, ``exp_avg`` or ``exp_avg_sq``. None on other ranks."""
    mine = []
    if mesh.dp.rank == 0:
        for pp in trainable_pieces(model):
            if kind == "model":
                t = pp.param.detach()
            elif kind == "grad":
                t = pp.param.grad
            else:
                t = optimizer.state[pp.param][kind]
            for pc in pp.pieces:
                if pc.part is not None:
                    mine.append((pp.full_name(pc), pc.axis, pc.span, pc.local_view(t).clone()))
    everyone = all_gather_object(mine, mesh.world)
    if mesh.world.rank != 0:
        return None
    out = {}
    for rank_pieces in everyone:
        for name, axis, span, t in rank_pieces:
            full = out.setdefault(name, torch.zeros(shapes[name]))
            (full if axis is None else full.narrow(axis, span.start, len(span))).copy_(t)
    return out
