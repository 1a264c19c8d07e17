"""``tensorpar plan``: which TP x PP x DP configuration to run a model with on given hardware, and why.

Evaluates every configuration of --gpus GPUs with an analytic model (FLOPs and bytes per operator,
a roofline, collectives, pipeline bubbles, KV cache and activation memory) and recommends one for
the goal. Runs in well under a second without a GPU.
"""

from __future__ import annotations

import sys

from tensorpar.cli.common import add_json


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="recommend a TP/PP/DP configuration for a model on given hardware",
                       description=__doc__)
    p.add_argument("--model", required=True,
                   help="built-in name (llama-2-7b, llama-2-13b, llama-2-70b, llama-3-8b, llama-3-70b, "
                        "llama-3.1-405b, mistral-7b, mixtral-8x7b, qwen2.5-72b, qwen3-32b, gemma-3-27b, "
                        "smollm2-135m, gpt3-175b), a Hugging Face config.json, or a directory holding one")
    p.add_argument("--gpu", required=True,
                   help="built-in device (h100-sxm, h200-sxm, a100-80gb-sxm, a100-40gb-sxm, h100-pcie, l40s, "
                        "rtx-4090, cpu) or a JSON device file")
    p.add_argument("--gpus", type=int, required=True, help="total number of GPUs (CPU ranks for --gpu cpu)")
    p.add_argument("--nodes", type=int, default=None, help="nodes the GPUs are spread over (default: as few as fit)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per sequence (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per sequence (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="concurrent sequences per replica (default: %(default)s)")
    p.add_argument("--dtype", default="bf16", help="weights: fp32/float32, bf16/bfloat16, fp16/float16, fp8 or int8 "
                                                    "(default: %(default)s)")
    p.add_argument("--kv-dtype", default=None, help="KV cache dtype (default: the weights' 16/32-bit dtype)")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="time-to-first-token goal")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="time-per-output-token goal")
    p.add_argument("--objective", default=None, help="latency, throughput or cost (default: latency for inference, "
                                                     "throughput for training)")
    p.add_argument("--mode", default="inference", help="inference or training (default: %(default)s)")
    p.add_argument("--global-batch", type=int, default=256, help="training: sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=4096, help="training: tokens per sequence (default: %(default)s)")
    p.add_argument("--micro-batch", type=int, default=1, help="training: sequences per micro-batch (default: %(default)s)")
    p.add_argument("--no-sequence-parallel", dest="sequence_parallel", action="store_false",
                   help="training: keep norm/dropout activations replicated across TP")
    p.add_argument("--recompute", default="selective", help="training: none, selective or full (default: %(default)s)")
    p.add_argument("--distributed-optimizer", action="store_true",
                   help="training: shard master weights and Adam moments over data parallelism")
    p.add_argument("--engine", default=None,
                   help="inference engine whose fixed costs to add: tensorpar, vllm, trtllm, trtllm-0.6, gpt-fast, "
                        "lmdeploy, or fitted (the device as --calibrate fitted it); default: fitted with "
                        "--calibrate or --gpu cpu, else tensorpar")
    p.add_argument("--virtual-stages", type=int, default=1,
                   help="training: model chunks per pipeline stage (interleaved 1F1B; default: %(default)s, plain 1F1B)")
    p.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                   help="inference: plan with speculative decoding, K drafts per step (TPOT then counts the "
                        "tokens each step keeps)")
    p.add_argument("--acceptance", type=float, default=0.7,
                   help="the chance each draft is accepted (default: %(default)s; `tensorpar generate --json` "
                        "reports a run's)")
    p.add_argument("--draft", default=None, help="the draft model (as --model); default: n-gram drafts, free")
    p.add_argument("--draft-tp", type=int, default=None,
                   help="the draft's degree (default: the fastest from 1 to each configuration's TP)")
    p.add_argument("--calibrate", default=None, metavar="BENCH_JSON",
                   help="bench.json written by `tensorpar bench`: fit the device model to this machine")
    add_json(p, "JSON instead of the table")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw latency and throughput against TP degree")
    p.set_defaults(run=run)


def run(args) -> int:
    from tensorpar.planner import PlanRequest, plan
    from tensorpar.planner.report import render_json, render_table

    request = PlanRequest(
        model=args.model, gpu=args.gpu, gpus=args.gpus, nodes=args.nodes, prompt_len=args.prompt_len,
        output_len=args.output_len, batch=args.batch, dtype=args.dtype, kv_dtype=args.kv_dtype, slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms, objective=args.objective, mode=args.mode, global_batch=args.global_batch,
        seq_len=args.seq_len, micro_batch=args.micro_batch, sequence_parallel=args.sequence_parallel,
        recompute=args.recompute, distributed_optimizer=args.distributed_optimizer, calibrate=args.calibrate,
        engine=args.engine, virtual_stages=args.virtual_stages, speculative_tokens=args.speculative_tokens,
        acceptance=args.acceptance, draft=args.draft, draft_tp=args.draft_tp)
    result = plan(request)
    print(render_json(result) if args.json else render_table(result))
    if args.plot:
        from tensorpar.planner.plot import plot

        path = plot(result, args.plot)
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return 0
