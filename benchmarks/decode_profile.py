"""Where a batch-1 decode step's time goes, per rank: matrix products (GEMV), collectives,
attention, and everything else (Python, small ops, the sampling on the leader).

    python benchmarks/decode_profile.py [--model smollm2-135m] [--tp 1,2] [--quantization none]
                                        [--new-tokens 32] [--json FILE]

For each TP degree, the ranks generate ``--new-tokens`` tokens from a 16-token prompt twice: once
plainly (the step time as ``tensorpar bench`` reports it) and once under ``torch.profiler`` on
every rank, with the shared-memory collectives marked by ``record_function``. Each rank's
profile is split by operator into:

- ``gemv``: ``aten::mm`` / ``addmm`` / ``bmm``, the packed int8 / int4 kernels and the fused products
  (``tensorpar::dense_linear`` / ``codes_linear``) (self time);
- ``collectives``: the shared-memory all-reduce, gather, all-gather and broadcast (including the
  wait for the slowest rank), and gloo's;
- ``attention``: ``scaled_dot_product_attention``, or the fused ``tensorpar::decode_attention``
  (total: its own small ops included);
- ``other``: the profiled step time less the above.

All in ms per decode step (the profiled run's decode steps, warm-up excluded). The profiler adds
a few microseconds per operator, which lands in ``other``; the plain step time is beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tensorpar.runtime.worker import Worker

GEMV = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu",
        "tensorpar::dense_linear", "tensorpar::codes_linear")
ATTENTION = ("aten::scaled_dot_product_attention", "tensorpar::decode_attention")
COLLECTIVE_PREFIXES = ("tensorpar::shm.", "gloo:", "c10d::")


def _mark_collectives() -> None:
    """Wrap the shared-memory communicator's collectives in profiler ranges."""
    import functools

    import torch

    from tensorpar.distributed.shm import ShmCommunicator

    for name in ("all_reduce", "gather", "all_gather", "broadcast"):
        method = getattr(ShmCommunicator, name)
        if getattr(method, "_marked", False):
            continue

        @functools.wraps(method)
        def marked(self, *args, _method=method, _name=name, **kw):
            with torch.profiler.record_function(f"tensorpar::shm.{_name}"):
                return _method(self, *args, **kw)

        marked._marked = True
        setattr(ShmCommunicator, name, marked)


class ProfiledWorker(Worker):
    def profile(self, prompt: list[int], new_tokens: int) -> list[dict]:
        """Every rank: a plain run, then a profiled one; each rank's split (ms per decode step)."""
        import torch

        from tensorpar.distributed.collectives import all_gather_object
        from tensorpar.runtime.sampling import SamplingParams

        _mark_collectives()
        params = [SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)]
        self.generate([prompt], params)  # warm-up
        plain = self.generate([prompt], params).timings
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            timed = self.generate([prompt], params).timings
            wall = time.perf_counter() - t
        steps = timed["decode_steps"]
        # the whole call's operators, scaled to the decode steps' share of the call's time
        decode_share = timed["decode_s_per_token"] * steps / wall if self.ctx.is_leader else None
        totals = {"gemv": 0.0, "collectives": 0.0, "attention": 0.0}
        for ev in prof.key_averages():
            if ev.key in GEMV:
                totals["gemv"] += ev.self_cpu_time_total
            elif ev.key.startswith(COLLECTIVE_PREFIXES):
                totals["collectives"] += ev.cpu_time_total
            elif ev.key in ATTENTION:
                totals["attention"] += ev.cpu_time_total
        row = {"rank": self.ctx.rank, "wall_s": wall, "totals_us": totals}
        if self.ctx.is_leader:
            row.update(plain_ms=plain["decode_s_per_token"] * 1e3, profiled_ms=timed["decode_s_per_token"] * 1e3,
                       steps=steps, decode_share=decode_share)
        return all_gather_object(row, self.ctx)


def split(rows: list[dict]) -> list[dict]:
    """Each rank's ms per decode step in each part, the call's totals scaled to the decode steps."""
    lead = rows[0]
    out = []
    for r in rows:
        scale = lead["decode_share"] / lead["steps"] / 1e3  # us over the call -> ms per decode step
        parts = {k: v * scale for k, v in r["totals_us"].items()}
        parts["other"] = lead["profiled_ms"] - sum(parts.values())
        out.append({"rank": r["rank"], **{k: round(v, 2) for k, v in parts.items()}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from tensorpar.bench.prompts import batch_prompts
    from tensorpar.distributed.launch import launch
    from tensorpar.runtime.spec import EngineArgs

    results = []
    for tp in [int(t) for t in args.tp.split(",")]:
        spec = EngineArgs(args.model, tp=tp, quantization=args.quantization, progress=False).resolve()
        ranks = launch(spec.dims.world_size, ProfiledWorker, (spec, 1), spec.device, spec.timeout_s,
                       spec.use_shm)
        try:
            rows = ranks.call("profile", batch_prompts(spec.config.vocab_size, 1)[0], args.new_tokens)
        finally:
            ranks.close()
        lead = rows[0]
        result = {"tp": tp, "quantization": args.quantization, "plain_ms": round(lead["plain_ms"], 2),
                  "profiled_ms": round(lead["profiled_ms"], 2), "per_rank": split(rows)}
        results.append(result)
        print(f"tp={tp} {args.quantization}: {result['plain_ms']} ms/step plain, {result['profiled_ms']} profiled")
        for r in result["per_rank"]:
            print(f"  rank {r['rank']}: gemv {r['gemv']:.2f}  collectives {r['collectives']:.2f}  "
                  f"attention {r['attention']:.2f}  other {r['other']:.2f}  (ms per step)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
