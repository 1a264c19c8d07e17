"""Drive a training run: bring up ``tp x pp x dp`` ranks (``launch``: spawned and supervised, joined
from ``torchrun``, or this very process), step them with a progress bar, save, report. Rank 0's
results are the run's results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from tensorpar.distributed.launch import launch, torchrun_env
from tensorpar.train.trainer import TrainConfig, Trainer, TrainSpec


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
    pp = f" x PP={result['pp']}" if result.get("pp", 1) > 1 else ""
    ax.set(xlabel="optimizer step", ylabel="training loss (mean token cross-entropy)",
           title=f"{result['model']}: TP={result['tp']}{pp} x DP={result['dp']}{sp}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path


def run_training(cfg: TrainConfig, out: str | Path = "train-out", progress: bool = True) -> dict | None:
    """Train to step ``cfg.steps``; returns the result on rank 0 (None on other torchrun ranks)."""
    env = torchrun_env()
    spec = TrainSpec.resolve(cfg, env.world_size if env else None)  # everything checked before any rank starts
    cfg, dims, start, sp = spec.cfg, spec.dims, spec.start_step, spec.sequence_parallel
    if progress and env is None:
        what = f"{spec.model_name} from step {start} of {cfg.resume}" if cfg.resume else spec.model_name
        if spec.lora:
            what = f"LoRA adapters (rank {spec.lora.rank} on {','.join(spec.lora.targets)}) of {what}"
        pp = f" x PP={dims.pp}" + (f" ({cfg.virtual_stages} stages per rank, interleaved)" if cfg.virtual_stages > 1
                                   else "") if dims.pp > 1 else ""
        print(f"tensorpar: training {what} at TP={dims.tp}{pp} x DP={dims.dp}{' with sequence parallelism' if sp else ''} "
              f"on {dims.world_size} rank(s); loading", file=sys.stderr, flush=True)
    ranks = launch(dims.world_size, Trainer, (spec,), cfg.device, cfg.timeout_s)
    try:
        losses, steps, norms, lrs, evals, tokens, seconds = [], [], [], [], [], 0, 0.0
        bar = tqdm(total=cfg.steps, initial=start, unit="step", desc="training",
                   disable=not (progress and ranks.is_leader))
        for _ in range(start, cfg.steps):
            r = ranks.call("train_step")
            losses.append(r["loss"])
            steps.append(r["step"])
            norms.append(r["grad_norm"])
            lrs.append(r["lr"])
            tokens += r["tokens"]
            seconds += r["seconds"]
            shown = {"loss": f"{r['loss']:.4f}", "tok_s": f"{tokens / seconds:,.0f}"}
            if cfg.eval_every and (r["step"] % cfg.eval_every == 0 or r["step"] == cfg.steps):
                evals.append(ranks.call("evaluate"))
                shown["eval_loss"] = f"{evals[-1]['loss']:.4f}"
            bar.set_postfix(shown)
            bar.update()
        bar.close()
        checkpoint = ranks.call("save", cfg.save) if cfg.save else None
        rss = ranks.call("peak_rss_mb")
        leader = ranks.is_leader
    finally:
        ranks.close()
    if not leader:
        return None
    result = {
        "model": spec.model_name, "resumed_from": cfg.resume,
        "tp": dims.tp, "pp": dims.pp, "virtual_stages": cfg.virtual_stages, "micro_batches": cfg.grad_accum,
        "dp": dims.dp, "sp": sp, "seq_len": cfg.seq_len, "batch": cfg.batch,
        "lr": cfg.lr, "first_step": start + 1, "steps": steps, "losses": losses, "grad_norms": norms, "lrs": lrs, "eval": evals,
        "tokens": tokens, "train_seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0,
        "peak_rss_mb": rss, "checkpoint": checkpoint, "lora": spec.lora.to_json() if spec.lora else None,
    }
    json_path, png_path = write_loss_curve(Path(out), result)
    result["loss_curve"] = {"json": str(json_path), "png": str(png_path)}
    return result
