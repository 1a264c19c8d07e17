"""PNG figures of a benchmark result (matplotlib, Agg backend: no display needed).

- ``latency_vs_tp.png``: decode ms/token against TP degree, one line per batch size for
  tensorpar, the transformers peers (one process: horizontal lines; ``tp_plan="auto"``: points,
  failures marked), llama.cpp at batch 1 (each build's rows at its most threads: horizontal lines in
  batch 1's colour), and the weight-streaming roofline.
- ``collectives.png``: latency against message size, log-log, one line per
  backend x collective x world size.
- ``experts.png`` (a mixture of experts): tokens per expert, per layer and phase.
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_vs_tp(result: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    rows = [r for r in result["tensorpar"] if r.get("status") == "ok"]
    batches = [str(b) for b in result["settings"]["batch"]]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    degrees = sorted({r["tp"] for r in result["tensorpar"]})
    for i, b in enumerate(batches):
        c = colors[i % len(colors)]
        pts = [(r["tp"], r["decode_ms_per_token"][b]) for r in rows if b in r["decode_ms_per_token"]]
        if pts:
            ax.plot(*zip(*pts), "o-", color=c, label=f"tensorpar, batch {b}")
        peers = result.get("peers") or {}
        single = peers.get("transformers") or {}
        if single.get("status") == "ok" and b in single["decode_ms_per_token"]:
            ax.axhline(single["decode_ms_per_token"][b], color=c, ls="--", lw=1,
                       label=f"transformers (1 process), batch {b}")
        tp_ok = [(p["tp"], p["decode_ms_per_token"][b]) for p in peers.get("transformers_tp_plan", [])
                 if p.get("status") == "ok" and b in p["decode_ms_per_token"]]
        if tp_ok:
            ax.plot(*zip(*tp_ok), "s", color=c, mfc="none", ms=9, label=f"transformers tp_plan=auto, batch {b}")
    failed = [p for p in (result.get("peers") or {}).get("transformers_tp_plan", []) if p.get("status") != "ok"]
    for p in failed:
        ax.axvline(p["tp"], color="0.6", ls=":", lw=1)
        ax.annotate(f"transformers tp_plan=auto failed at TP={p['tp']}", (p["tp"], 0.03),
                    xycoords=("data", "axes fraction"), xytext=(3, 0), textcoords="offset points",
                    rotation=90, ha="left", va="bottom", fontsize=7, color="0.4")
    for style, r in _llama_cpp_lines(result):
        kind = f"{r['type']} ({r['file_type']})" if r["type"] == "native" and r.get("file_type") else r["type"]
        ax.axhline(r["decode_ms_per_token"]["1"], color=colors[0], lw=1, ls=style,
                   label=f"{r['peer']}, {kind}, {r['threads']} threads, batch 1")
    roof = result.get("roofline") or {}
    if roof.get("per_tp"):
        pts = [(r["tp"], r["roofline_ms"]) for r in roof["per_tp"]]
        ax.plot(*zip(*pts), "k:", marker=".", label="roofline (weights / read bandwidth)")
    ax.set_xlabel("TP degree")
    ax.set_ylabel("decode ms / token (per step)")
    ax.set_xticks(degrees or [1])
    if degrees:
        ax.set_xlim(min(degrees) - 0.3, max(degrees) + 0.3)
    ax.set_ylim(bottom=0)
    ax.set_title(f"{result['settings']['model']}: decode latency vs TP", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _llama_cpp_lines(result: dict) -> list[tuple[object, dict]]:
    """The llama.cpp rows drawn (batch 1, at each build's most threads) with a line style each."""
    peers = result.get("peers") or {}
    styles = [(0, (6, 2, 1, 2)), (0, (1, 1.5)), (0, (8, 3)), (0, (3, 1, 1, 1, 1, 1))]
    out = []
    for key in ("llama_cpp_current", "llama_cpp"):
        ok = [r for r in peers.get(key) or [] if r.get("status") == "ok" and "1" in r.get("decode_ms_per_token", {})]
        most = max((r["threads"] for r in ok), default=None)
        out += [r for r in ok if r["threads"] == most]
    return [(styles[i % len(styles)], r) for i, r in enumerate(out)]


def plot_collectives(result: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    rows = result.get("collectives") or []
    keys = sorted({(r["backend"], r["world_size"], r["collective"]) for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = sorted({k[:2] for k in keys})  # one color per backend x world size
    for backend, n, coll in keys:
        pts = sorted((r["bytes"], r["latency_us"]) for r in rows
                     if (r["backend"], r["world_size"], r["collective"]) == (backend, n, coll))
        ax.plot(*zip(*pts), "o-" if coll == "all_reduce" else "s--", ms=3,
                color=colors[lines.index((backend, n)) % len(colors)],
                label=f"{backend} {coll.replace('_', '-')}, {n} ranks")
    if not keys:
        ax.text(0.5, 0.5, "collective sweep skipped", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("latency (us, median)")
    ax.set_title("collectives on this host", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_experts(result: dict, path: Path) -> Path | None:
    """Tokens routed to each expert, one panel per MoE layer and phase, of the first layout that
    reports them (the routing is the same math at every layout); bars coloured by expert set."""
    from tensorpar.partition import even_split

    row = next((r for r in result["tensorpar"] if r.get("experts")), None)
    if row is None:
        return None
    plt = _pyplot()
    phases = list(row["experts"])
    layers = list(row["experts"][phases[0]]["tokens"])
    fig, axes = plt.subplots(len(layers), len(phases), figsize=(4.5 * len(phases), 2.2 * len(layers)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ep = row.get("ep", 1)
    for j, phase in enumerate(phases):
        load = row["experts"][phase]
        for i, layer in enumerate(layers):
            ax, counts = axes[i][j], load["tokens"].get(layer, [])
            if not counts:
                ax.axis("off")
                continue
            setof = {e: g for g in range(ep) for e in even_split(len(counts), ep, g)}
            ax.bar(range(len(counts)), counts, width=1.0, color=[colors[setof[e] % len(colors)] for e in range(len(counts))])
            ax.axhline(sum(counts) / len(counts), color="k", lw=0.8, ls="--")
            ax.set_title(f"layer {layer}, {phase}: set imbalance {load['imbalance'][layer]:.2f}", fontsize=8)
            ax.tick_params(labelsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("expert (colour: expert set)", fontsize=7)
    fig.suptitle(f"{result['settings']['model']}: tokens per expert, tp {row['tp']} ep {ep} (dashed: even)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(result: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    paths = [plot_latency_vs_tp(result, out_dir / "latency_vs_tp.png"),
             plot_collectives(result, out_dir / "collectives.png"), plot_experts(result, out_dir / "experts.png")]
    return [p for p in paths if p is not None]
