"""``tensorpar generate``: complete prompts with a model sharded over ``--tp`` ranks."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from tensorpar.cli.common import add_engine, add_json, add_quiet, engine_args


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from prompts", description=__doc__)
    add_engine(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="choice i of a prompt samples with seed + i")
    p.add_argument("-n", "--n", type=int, default=1, help="completions per prompt (default: 1)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    add_json(p)
    add_quiet(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from tensorpar.process import age_s
    from tensorpar.runtime import LLM, SamplingParams

    imported_s = age_s()  # the interpreter and the imports, before anything starts
    if args.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {args.max_new_tokens}")
    sp = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
        n=args.n,
    )
    with LLM(**asdict(engine_args(args, progress=not (args.quiet or args.json)))) as llm:
        if llm.rank == 0 and not args.quiet:
            print(f"tensorpar: loaded {args.model} at {llm.layout} ({llm.backend}) in {llm.load_s:.1f}s; generating",
                  file=sys.stderr, flush=True)
        result = llm.generate_full(args.prompt, sp, chat=args.chat)
        if llm.rank != 0:
            return 0
        first = result.completions[0]
        timings = {"load_s": round(llm.load_s, 4), **{k: round(v, 6) for k, v in result.timings.items()}}
        if args.json:
            out = {
                "model": args.model,
                "tp": llm.tp,
                "pp": llm.pp,
                "ep": llm.spec.dims.ep,
                "backend": llm.backend,
                "device": args.device,
                "dtype": llm.spec.dtype_name,
                "quantization": llm.spec.quantization,
                "prompt_token_ids": first.prompt_token_ids,
                "token_ids": first.token_ids,
                "text": first.text,
                "finish_reason": first.finish_reason,
                "completions": [vars(c) for c in result.completions],
                "timings": timings,
                "startup_s": {k: round(v, 4) for k, v in {"import_s": imported_s, **llm.startup}.items()
                              if v is not None},
                "peak_rss_mb": [round(m, 1) for m in result.peak_rss_mb],
            }
            if result.speculation:
                out["speculation"] = result.speculation
            print(json.dumps(out))
        else:
            many = len(result.completions) > 1
            for c in result.completions:
                prompt = args.prompt[c.prompt_index]
                print(f"{prompt}{c.text}" if not args.chat else c.text)
                if many:
                    print("-" * 40)
            print(
                f"[{llm.layout} backend={llm.backend} load {timings['load_s']:.1f}s "
                f"prefill {timings['prefill_s'] * 1e3:.0f} ms "
                f"decode {timings['decode_s_per_token'] * 1e3:.1f} ms/token "
                + (f"accepted {result.speculation['acceptance_rate']:.0%} of drafts, "
                   f"{result.speculation['mean_acceptance_length']:.2f} tokens/step " if result.speculation else "")
                + f"peak RSS per rank (MiB): {', '.join(f'{m:.0f}' for m in result.peak_rss_mb)}]",
                file=sys.stderr,
            )
    return 0
