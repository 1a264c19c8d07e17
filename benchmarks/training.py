"""Training throughput, peak memory and activation memory per rank at TP=1 and TP=2, with and
without sequence parallelism, against transformers training the same model in one process.

    python benchmarks/training.py [--model smollm2-135m] [--seq-len 256] [--batch 4] [--steps 4]
                                  [--out bench-out]

For each configuration the ranks are spawned, one warm-up optimizer step runs, then ``--steps``
timed ones (tokens/s = tokens / summed step time on rank 0, AdamW included). Activation memory is
measured on each rank during one forward pass: every tensor autograd saves for backward inside a
decoder layer (``torch.autograd.graph.saved_tensors_hooks``), counted once per storage, weights
excluded, averaged over layers. It is compared with Korthikanti et al. 2022's per-layer formula
(``tensorpar.planner.memory.activation_bytes_per_layer``, 2-byte activations and 1-byte dropout
masks) converted to this run: 4-byte activations, no dropout, and no stored attention scores
(scaled_dot_product_attention keeps only its log-sum-exp, as selective recomputation would).
Writes training.json and training.png under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tensorpar.distributed.collectives import all_gather_object
from tensorpar.distributed.ranks import SpawnedRanks
from tensorpar.models.llama import DecoderLayer
from tensorpar.planner.arch import from_model_config
from tensorpar.planner.memory import activation_bytes_per_layer
from tensorpar.train.trainer import TrainConfig, Trainer, TrainSpec

CONFIGS = [(1, False), (2, False), (2, True)]
ROOT = Path(__file__).resolve().parents[1]

PEER = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM
from tensorpar.process import peak_rss_mb
from tensorpar.loading import resolve_model
from tensorpar.train.data import batch_for_step
torch.set_num_threads(int(sys.argv[5]))
path = resolve_model(sys.argv[1])
kw = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
model = AutoModelForCausalLM.from_pretrained(path.parent if kw else path, dtype=torch.float32, **kw).train()
tokens = torch.load(sys.argv[2])
seq_len, batch, steps = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[6])
opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
seconds = 0.0
for step in range(1, steps + 2):
    x, y = batch_for_step(tokens, 0, step, batch, seq_len)
    t0 = time.perf_counter()
    logits = model(x).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    opt.zero_grad(); loss.backward(); opt.step()
    if step > 1:
        seconds += time.perf_counter() - t0
print(json.dumps({"tokens_per_s": steps * batch * seq_len / seconds, "peak_rss_mb": [peak_rss_mb()]}))
"""


class ActivationProbe(Trainer):
    """A training rank that can also report the activations its decoder layers store."""

    def activation_bytes_per_layer(self) -> list[float]:
        layers = [m for m in self.model.modules() if isinstance(m, DecoderLayer)]
        weights = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        current: list[int | None] = [None]
        stored: dict[int, dict[int, int]] = {i: {} for i in range(len(layers))}

        def pack(t):
            if current[0] is not None:
                storage = t.untyped_storage()
                if storage.data_ptr() not in weights:
                    stored[current[0]][storage.data_ptr()] = storage.nbytes()
            return t

        hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
                 for i, layer in enumerate(layers)]
        hooks += [layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)) for layer in layers]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, _ = self._loss(*self.batch(1))
        finally:
            for h in hooks:
                h.remove()
        del loss
        mean = statistics.mean(sum(d.values()) for d in stored.values())
        return all_gather_object(mean, self.mesh.world)


def formula_bytes(config, seq_len: int, batch: int, tp: int, sp: bool) -> dict:
    """Korthikanti per layer as published, and converted to this run (see the module docstring)."""
    arch = from_model_config(config)
    published = activation_bytes_per_layer(arch, seq_len, batch, tp, sp, recompute="selective")
    masks = 2 * seq_len * batch * config.hidden_size / (tp if sp else 1)  # two 1-byte dropout masks
    return {"published_fp16": published, "this_run_fp32": 2 * (published - masks)}


def corpus(path: Path) -> Path:
    """The project's own documentation as training text."""
    text = "\n\n".join(p.read_text() for p in sorted([*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")]))
    path.write_text(text)
    return path


def measure(args, tp: int, sp: bool, data: Path) -> dict:
    cfg = TrainConfig(data=str(data), model=args.model, tp=tp, sp=sp, seq_len=args.seq_len, batch=args.batch,
                      lr=1e-5, steps=args.steps + 1, timeout_s=600)
    ranks = SpawnedRanks(tp, ActivationProbe, (TrainSpec.resolve(cfg),), timeout_s=600)
    try:
        activations = ranks.call("activation_bytes_per_layer")
        ranks.call("train_step")  # warm-up
        steps = [ranks.call("train_step") for _ in range(args.steps)]
        rss = ranks.call("peak_rss_mb")
    finally:
        ranks.close()
    from tensorpar.loading import open_source

    config = open_source(args.model).config
    tokens, seconds = sum(s["tokens"] for s in steps), sum(s["seconds"] for s in steps)
    return {"tp": tp, "sp": sp, "tokens_per_s": tokens / seconds, "step_s": seconds / len(steps),
            "losses": [s["loss"] for s in steps], "peak_rss_mb": rss,
            "activation_mib_per_layer": [a / 2**20 for a in activations],
            "formula_mib_per_layer": {k: v / 2**20 for k, v in formula_bytes(config, args.seq_len, args.batch,
                                                                             tp, sp).items()}}


def run_peer(args, data: Path, out: Path) -> dict:
    from tensorpar.loading import open_source
    from tensorpar.train.data import tokenize_file

    tokens_file = out / "peer-tokens.pt"
    torch.save(tokenize_file(data, open_source(args.model).tokenizer()), tokens_file)
    r = subprocess.run([sys.executable, "-c", PEER, args.model, str(tokens_file), str(args.seq_len),
                        str(args.batch), "2", str(args.steps)], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"transformers peer failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], peer: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"TP={r['tp']}" + (" +SP" if r["sp"] else "") for r in rows] + ["transformers"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].bar(labels, [r["tokens_per_s"] for r in rows] + [peer["tokens_per_s"]], color="C0")
    axes[0].set(title="training tokens/s", ylabel="tokens/s")
    axes[1].bar(labels, [max(r["peak_rss_mb"]) for r in rows] + [peer["peak_rss_mb"][0]], color="C1")
    axes[1].set(title="peak RSS, largest rank", ylabel="MiB")
    x = range(len(rows))
    axes[2].bar([i - 0.2 for i in x], [max(r["activation_mib_per_layer"]) for r in rows], 0.4, label="measured")
    axes[2].bar([i + 0.2 for i in x], [r["formula_mib_per_layer"]["this_run_fp32"] for r in rows], 0.4,
                label="Korthikanti (fp32, no dropout)")
    axes[2].set_xticks(list(x), labels[:-1])
    axes[2].set(title="activations per layer per rank", ylabel="MiB")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after one warm-up)")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="tensorpar-training-bench-"))
    data = corpus(scratch / "corpus.txt")
    rows = []
    for tp, sp in CONFIGS:
        rows.append(measure(args, tp, sp, data))
        r = rows[-1]
        print(f"TP={tp}{' +SP' if sp else '':4} {r['tokens_per_s']:7.1f} tokens/s  step {r['step_s']:.2f} s  "
              f"peak RSS {', '.join(f'{m:.0f}' for m in r['peak_rss_mb'])} MiB  activations/layer "
              f"{', '.join(f'{a:.1f}' for a in r['activation_mib_per_layer'])} MiB "
              f"(formula {r['formula_mib_per_layer']['this_run_fp32']:.1f})", flush=True)
    peer = run_peer(args, data, scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"transformers, one process: {peer['tokens_per_s']:.1f} tokens/s, peak RSS {peer['peak_rss_mb'][0]:.0f} MiB")
    print("\n| config | tokens/s | vs transformers | peak RSS per rank (MiB) | activations/layer/rank (MiB) "
          "| Korthikanti fp32 (MiB) | measured / formula |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        f = r["formula_mib_per_layer"]["this_run_fp32"]
        a = max(r["activation_mib_per_layer"])
        print(f"| TP={r['tp']}{' +SP' if r['sp'] else ''} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x | {', '.join(f'{m:.0f}' for m in r['peak_rss_mb'])} | "
              f"{a:.1f} | {f:.1f} | {a / f:.2f} |")
    result = {
        "benchmark": "benchmarks/training.py", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": " ".join(["python", *sys.argv]), "machine": {"platform": platform.platform(),
                                                               "cpu_count": torch.get_num_threads()},
        "settings": vars(args), "configs": rows, "transformers": peer,
    }
    (out / "training.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, peer, out / "training.png")
    print(f"\nwrote {out / 'training.json'}, {out / 'training.png'}")


if __name__ == "__main__":
    main()
