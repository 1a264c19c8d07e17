"""``tensorpar generate``: complete prompts with a model sharded over ``--tp`` ranks."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from prompts", description=__doc__)
    p.add_argument("--model", default="smollm2-135m", help="alias, Hugging Face directory, or .gguf file (default: %(default)s)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: any value from 1 to the number of query heads")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--comm", default="auto", choices=["auto", "gloo"],
                   help="auto: shared memory between CPU ranks on one host, else gloo/NCCL (default)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    from tensorpar.runtime import LLM, SamplingParams

    sp = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    with LLM(args.model, tp=args.tp, dtype=args.dtype, device=args.device,
             progress=not (args.quiet or args.json), comm=args.comm) as llm:
        if llm.rank == 0 and not args.quiet:
            print(f"tensorpar: loaded {args.model} at tp={llm.tp} ({llm.backend}) in {llm.load_s:.1f}s; generating",
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
                "backend": llm.backend,
                "device": args.device,
                "dtype": str(llm.spec.torch_dtype()).removeprefix("torch."),
                "prompt_token_ids": first.prompt_token_ids,
                "token_ids": first.token_ids,
                "text": first.text,
                "finish_reason": first.finish_reason,
                "completions": [vars(c) for c in result.completions],
                "timings": timings,
                "peak_rss_mb": [round(m, 1) for m in result.peak_rss_mb],
            }
            print(json.dumps(out))
        else:
            for prompt, c in zip(args.prompt, result.completions):
                print(f"{prompt}{c.text}" if not args.chat else c.text)
                if len(args.prompt) > 1:
                    print("-" * 40)
            print(
                f"[tp={llm.tp} backend={llm.backend} load {timings['load_s']:.1f}s "
                f"prefill {timings['prefill_s'] * 1e3:.0f} ms "
                f"decode {timings['decode_s_per_token'] * 1e3:.1f} ms/token "
                f"peak RSS per rank (MiB): {', '.join(f'{m:.0f}' for m in result.peak_rss_mb)}]",
                file=sys.stderr,
            )
    return 0
