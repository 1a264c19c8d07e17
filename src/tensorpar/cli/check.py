"""``tensorpar check``: run the same prompts at a layout and at one rank and compare them: logit
error, the first greedy divergence and whether it is a near-tie, a verdict per prompt. Exits 1
on a real mismatch."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from tensorpar.cli.common import add_engine, add_json, engine_args


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="prove a layout correct against one rank on your prompts", description=__doc__)
    add_engine(p)
    p.add_argument("--prompts", default=None, help="a text file, one prompt per line (default: five built-in prompts)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=16,
                   help="greedy tokens the layout generates per prompt, then scored by both (default: %(default)s)")
    add_json(p)
    p.add_argument("--fault", default="", help=argparse.SUPPRESS)  # tests: a fault the check must catch
    p.set_defaults(run=run)


def _prompts(path: str | None) -> list[str]:
    from tensorpar.runtime.check import DEFAULT_PROMPTS

    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"--prompts {path}: {e.strerror}") from None
    prompts = [ln for ln in lines if ln.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt")
    return prompts


def run(args) -> int:
    from tensorpar.runtime.check import run_check

    engine = replace(engine_args(args, progress=False), fault=args.fault)
    report = run_check(engine, _prompts(args.prompts), args.max_new_tokens, args.chat)
    if args.json:
        print(json.dumps(report))
        return 0 if report["passed"] else 1
    print(f"tensorpar check: {report['model']} at {report['layout']}"
          + (f", {report['quantization']} weights" if report["quantization"] != "none" else "")
          + f", {report['dtype']}, against {report['reference']} (tolerance {report['tolerance']:g} of the largest "
            f"logit; near-tie below {report['near_tie']:g})")
    for r in report["prompts"]:
        where = ("no divergence" if r["first_divergence"] is None else
                 f"first divergence at completion token {r['first_divergence']} (top-2 margin {r['margin']:.3g})")
        print(f"  {r['verdict']:8s} max rel err {r['max_rel_error']:.2e}, mean {r['mean_rel_error']:.2e}, {where}: "
              f"{r['prompt'][:48]!r}")
    print(f"  replicated values across each tensor-parallel group: {report['replicated_values']}")
    print("passed" if report["passed"] else "FAILED: a real mismatch (see above)")
    return 0 if report["passed"] else 1
