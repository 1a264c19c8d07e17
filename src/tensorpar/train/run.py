"""Drive a training run: bring up ``tp x dp`` ranks, step them with a progress bar, save, report.

Ranks are spawned on this host (supervised: a dead rank ends the run with its name), joined from
``torchrun``, or, for one rank, this very process. Rank 0's results are the run's results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from tensorpar.distributed.groups import destroy_group, single_process_context
from tensorpar.distributed.launch import SpawnedRanks, configure_rank_process, join_torchrun, torchrun_env
from tensorpar.errors import TensorparError
from tensorpar.partition import check_degree
from tensorpar.train.checkpoint import ShardedCheckpointSource
from tensorpar.train.init import training_config
from tensorpar.train.trainer import TrainConfig, Trainer, resumed_seed


class _Local:
    """The one-process stand-in for ``SpawnedRanks``: calls go straight to this process's Trainer."""

    def __init__(self, trainer: Trainer, ctx=None):
        self.trainer, self.ctx = trainer, ctx

    def call(self, method: str, *args, **kwargs):
        return getattr(self.trainer, method)(*args, **kwargs)

    def close(self) -> None:
        self.trainer.close()
        if self.ctx is not None:
            destroy_group(self.ctx)


def _start(cfg: TrainConfig):
    """(ranks, is_rank_0) for this launch."""
    device_type = cfg.device.split(":")[0]
    env = torchrun_env()
    if env is not None:
        if cfg.tp * cfg.dp != env.world_size:
            raise TensorparError(f"--tp {cfg.tp} x --dp {cfg.dp} must equal torchrun's world size {env.world_size}")
        ctx = join_torchrun(env, device_type, cfg.timeout_s)
        return _Local(Trainer(ctx, cfg), ctx), env.rank == 0
    if cfg.tp * cfg.dp == 1:
        configure_rank_process(0, 1, spawned=False)
        return _Local(Trainer(single_process_context(cfg.device), cfg)), True
    return SpawnedRanks(cfg.tp * cfg.dp, Trainer, (cfg,), device_type, cfg.timeout_s), True


def write_loss_curve(out: Path, result: dict) -> tuple[Path, Path]:
    """``losses.json`` (the whole result) and ``losses.png`` (loss against step) under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "losses.json", out / "losses.png"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(result["steps"], result["losses"], marker="." if len(result["steps"]) < 50 else None)
    sp = " +SP" if result["sp"] else ""
    ax.set(xlabel="optimizer step", ylabel="training loss (mean token cross-entropy)",
           title=f"{result['model']}: TP={result['tp']} x DP={result['dp']}{sp}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path


def run_training(cfg: TrainConfig, out: str | Path = "train-out", progress: bool = True) -> dict | None:
    """Train to step ``cfg.steps``; returns the result on rank 0 (None on other torchrun ranks)."""
    cfg.validate()
    if not Path(cfg.data).is_file():
        raise TensorparError(f"training data {cfg.data!r} is not a file")
    # everything that can be checked before any rank starts
    if cfg.resume:
        checkpoint = ShardedCheckpointSource(cfg.resume)
        config, start, model = checkpoint.config, checkpoint.step, checkpoint.meta.get("model", cfg.resume)
        resumed_seed(checkpoint.meta, cfg.seed)
        if start >= cfg.steps:
            raise TensorparError(
                f"the checkpoint is at step {start}: --steps {cfg.steps} (the total) leaves nothing to run"
            )
    else:
        config, start, model = training_config(cfg.model), 0, cfg.model
        if cfg.save and any(Path(cfg.save).glob("step-*")):
            raise TensorparError(f"{cfg.save} already holds checkpoints of another run: continue it with "
                                 f"--resume {cfg.save}, or save a new run elsewhere")
    check_degree(cfg.tp, config.num_heads)
    sp = cfg.sequence_parallel
    if progress and torchrun_env() is None:
        what = f"{model} from step {start} of {cfg.resume}" if cfg.resume else model
        print(f"tensorpar: training {what} at TP={cfg.tp} x DP={cfg.dp}{' with sequence parallelism' if sp else ''} "
              f"on {cfg.tp * cfg.dp} rank(s); loading", file=sys.stderr, flush=True)
    ranks, leader = _start(cfg)
    try:
        losses, steps, tokens, seconds = [], [], 0, 0.0
        bar = tqdm(total=cfg.steps, initial=start, unit="step", desc="training", disable=not (progress and leader))
        for _ in range(start, cfg.steps):
            r = ranks.call("train_step")
            losses.append(r["loss"])
            steps.append(r["step"])
            tokens += r["tokens"]
            seconds += r["seconds"]
            bar.set_postfix(loss=f"{r['loss']:.4f}", tok_s=f"{tokens / seconds:,.0f}")
            bar.update()
        bar.close()
        checkpoint = ranks.call("save", cfg.save) if cfg.save else None
        rss = ranks.call("peak_rss_mb")
    finally:
        ranks.close()
    if not leader:
        return None
    result = {
        "model": model, "resumed_from": cfg.resume,
        "tp": cfg.tp, "dp": cfg.dp, "sp": sp, "seq_len": cfg.seq_len, "batch": cfg.batch,
        "lr": cfg.lr, "first_step": start + 1, "steps": steps, "losses": losses,
        "tokens": tokens, "train_seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0,
        "peak_rss_mb": rss, "checkpoint": checkpoint,
    }
    json_path, png_path = write_loss_curve(Path(out), result)
    result["loss_curve"] = {"json": str(json_path), "png": str(png_path)}
    return result
