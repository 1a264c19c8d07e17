"""``--plot FILE.png``: time per output token, time to first token and throughput against TP degree,
one line per pipeline degree, feasible configurations only; the recommendation is starred.
matplotlib is imported only here."""

from __future__ import annotations


def plot(result, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    feasible = [c for c in result.configs if c.feasible and c.tpot_ms is not None]
    training = result.request.mode == "training"
    fig, axes = plt.subplots(1, 3 if not training else 2, figsize=(15 if not training else 10, 4.2))
    panels = ([("tpot_ms", "time per output token (ms)"), ("ttft_ms", "time to first token (ms)")]
              if not training else []) + [("throughput_tok_s", "tokens/s over all GPUs")]
    if training:
        panels = [("step_s", "step time (s)"), ("throughput_tok_s", "tokens/s over all GPUs")]
        feasible = [c for c in result.configs if c.feasible and c.training is not None]
    for ax, (key, label) in zip(axes, panels):
        for pp in sorted({c.pp for c in feasible}):
            for ep in sorted({c.ep for c in feasible}):
                pts = sorted((c.tp, _value(c, key)) for c in feasible if c.pp == pp and c.ep == ep)
                if not pts:
                    continue
                name = f"PP={pp}" + (f" EP={ep}" if ep > 1 else "")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if key == "tpot_ms":
            base = sorted((c.tp, c.tpot_ms) for c in feasible if c.pp == 1 and c.ep == 1)
            if len(base) > 1:
                tp0, t0 = base[0]
                ax.plot([p[0] for p in base], [t0 * tp0 / p[0] for p in base], linestyle=":", color="grey",
                        label=f"perfect scaling from TP={tp0}")
        best = result.recommended
        if best is not None and _value(best, key) is not None:
            ax.plot([best.tp], [_value(best, key)], marker="*", markersize=16, color="black", linestyle="none",
                    label=f"recommended ({best.label})")
        ax.set_xscale("log", base=2)
        tps = sorted({c.tp for c in result.configs})
        ax.set_xticks(tps)
        ax.set_xticklabels([str(t) for t in tps])
        ax.set_xlabel("TP degree (DP = GPUs / (TP x PP))")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    r = result.request
    fig.suptitle(f"{result.arch.name} on {r.gpus} x {result.device.name}, {r.dtype}"
                 + (f", batch {r.batch}, prompt {r.prompt_len}, output {r.output_len}" if not training else
                    f", training, global batch {r.global_batch} x {r.seq_len}"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _value(c, key: str):
    if key == "step_s":
        return c.training.step if c.training else None
    return getattr(c, key)
