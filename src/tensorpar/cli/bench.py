"""``tensorpar bench``: decode latency, prefill throughput and peak memory at several TP degrees,
against Hugging Face transformers and llama.cpp peers (llama-cpp-python, and the current build's
llama-bench that `make peers` builds), a weight-streaming roofline, and a collective sweep.
Prints tables; writes DIR/bench.json, DIR/latency_vs_tp.png and DIR/collectives.png."""

from __future__ import annotations

import argparse
import sys

from tensorpar.cli.common import add_model, add_pp, add_speculative


def _ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark latency, throughput, memory and collectives", description=__doc__)
    add_model(p)
    p.add_argument("--tp", type=_ints, default=[1, 2, 3], help="comma-separated TP degrees (default: 1,2,3)")
    add_pp(p)
    p.add_argument("--dp", type=int, default=1, help="serving replicas of each layout, measured through the "
                   "engines `tensorpar serve --dp` runs (requests to the least busy replica)")
    p.add_argument("--ep", type=int, default=1, help="expert sets of a mixture of experts over each layout's ranks "
                   "(with --tp 1: one rank per set, attention replicated)")
    p.add_argument("--moe-dispatch", type=_names, default=["auto"],
                   help="comma-separated token dispatches of a mixture of experts, each measured in turn: auto, "
                        "reduce, all_to_all (default: auto)")
    p.add_argument("--quantization", type=_names, default=["none"],
                   help="comma-separated weight quantizations, each measured in turn: none, int8, int4, gguf (default: none)")
    p.add_argument("--quant-group", type=int, default=32, help="inputs per int4 group (default: %(default)s)")
    p.add_argument("--deterministic", "--enable-deterministic-inference", dest="deterministic", action="store_true",
                   help="measure every layout in deterministic mode (logits bitwise equal at every degree)")
    add_speculative(p)
    p.add_argument("--batch", type=_ints, default=[1, 8], help="comma-separated decode batch sizes (default: 1,8)")
    p.add_argument("--prompt-len", type=int, default=None, help="prefill prompt length in tokens (default: 512; --quick: 64)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per decode run (default: 32; --quick: 4)")
    p.add_argument("--out", default="bench-out", help="output directory (default: %(default)s)")
    p.add_argument("--no-peers", dest="peers", action="store_false", help="skip the peers (transformers and llama.cpp)")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the collective sweep")
    p.add_argument("--sweep-max-bytes", type=int, default=None,
                   help="largest collective message in bytes (default: 67108864; --quick: 65536)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds allowed to each subprocess or group of ranks (default: 600; --quick: 180)")
    p.add_argument("--quick", action="store_true", help="small everything (for tests): 4 new tokens, 64-token "
                   "prompt, sweep to 64 KB, 2 iterations")
    p.set_defaults(run=run)


def run(args) -> int:
    from tensorpar.bench import BenchConfig, run_bench
    from tensorpar.bench.report import render
    from tensorpar.bench.run import QUICK

    kw = dict(QUICK) if args.quick else {}
    for name in ("prompt_len", "new_tokens", "sweep_max_bytes"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.timeout is not None:
        kw["timeout_s"] = args.timeout
    cfg = BenchConfig(model=args.model, tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep, moe_dispatch=args.moe_dispatch,
                      quantization=args.quantization, quant_group=args.quant_group, deterministic=args.deterministic,
                      speculative_config=args.speculative_config, batch=args.batch, out=args.out, peers=args.peers,
                      sweep=args.sweep, quick=args.quick, command=["tensorpar", *sys.argv[1:]], **kw)
    result = run_bench(cfg)
    print(render(result))
    print(f"\nwrote {result['json']}, " + ", ".join(result["plots"]))
    return 0
