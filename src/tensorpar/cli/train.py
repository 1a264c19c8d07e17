"""``tensorpar train``: train with tensor (+ sequence), pipeline and data parallelism on a text or JSONL file.

Tokenizes the data with the model's tokenizer (a JSONL file's chat examples through its chat
template, the loss on the assistant's turns), runs AdamW to step ``--steps`` (the total: a run
resumed at step 10 with --steps 20 runs steps 11-20), shows loss and tokens/s, writes
OUT/losses.json and OUT/losses.png, and with ``--save`` a sharded checkpoint that ``--resume``
loads at any other TP/PP/DP degrees.
"""

from __future__ import annotations

import json

from tensorpar.cli.common import add_device, add_json, add_model, add_quiet, add_tp


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train with TP (+SP) x PP x DP; sharded, reshardable checkpoints",
                       description=__doc__)
    add_model(p, extra=", or random-llama-tiny (-6l: six layers)")
    p.add_argument("--data", required=True,
                   help="a UTF-8 text file, or a JSONL file of {\"text\"} or chat {\"messages\"} examples (the loss "
                        "on the assistant's turns)")
    p.add_argument("--pack", action="store_true",
                   help="JSONL: several whole examples to a row of --seq-len (the longest first, each where it fits), "
                        "attention and positions within each example")
    add_tp(p)
    p.add_argument("--dp", type=int, default=1, help="data-parallel degree (divides --batch)")
    p.add_argument("--pp", type=int, default=1,
                   help="pipeline stages: each a run of layers on its own --tp ranks, micro-batches scheduled 1F1B")
    p.add_argument("--virtual-stages", type=int, default=1, metavar="V",
                   help="interleaved 1F1B: V runs of layers per pipeline rank (a V times smaller bubble, V times "
                        "the sends)")
    p.add_argument("--sp", action="store_true", help="sequence parallelism inside each tensor-parallel group")
    p.add_argument("--steps", type=int, default=10, help="total optimizer steps, counting resumed ones")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="global batch, in sequences")
    p.add_argument("--lr", type=float, default=3e-4, help="the peak learning rate (default: %(default)s)")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "linear", "cosine"],
                   help="after the warm-up: constant, or a linear or cosine decay to --min-lr at --steps")
    p.add_argument("--warmup-steps", type=int, default=0, help="steps of linear warm-up from 0 to --lr")
    p.add_argument("--min-lr", type=float, default=0.0, help="where a decaying schedule ends (default: 0)")
    p.add_argument("--clip-grad-norm", type=float, default=None, metavar="MAX",
                   help="scale the gradients down to this global norm (every element counted once, at any degree)")
    p.add_argument("--grad-accum", type=int, default=None, metavar="N",
                   help="run each replica's rows in N micro-batches, their gradients summed (less activation memory); "
                        "under --pp the pipeline's micro-batches (default: 1, or --pp)")
    p.add_argument("--dtype", default="fp32",
                   help="compute: fp32, or bf16 (bfloat16 products over float32 master weights; gradients, their "
                        "sums, AdamW and checkpoints stay float32)")
    p.add_argument("--eval-every", type=int, default=0, metavar="K",
                   help="hold out --eval-split of the data and report its loss and perplexity every K steps and at "
                        "the last (default: 0, never)")
    p.add_argument("--eval-split", type=float, default=0.1, help="the part held out (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's, on matrices only (not norms, biases)")
    p.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="train only LoRA adapters of rank R on the frozen model (sharded like their projections; "
                        "checkpoints hold the adapters)")
    p.add_argument("--lora-alpha", type=float, default=None, help="the adapters' scale is alpha / R (default: R)")
    p.add_argument("--lora-targets", default="q,v", help="the projections adapted, from q,k,v,o,gate,up,down "
                   "(default: %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.0, help="on attention probabilities and residual branches")
    p.add_argument("--seed", type=int, default=None,
                   help="initialization (random models), batch order and dropout (default: 0, or the checkpoint's)")
    p.add_argument("--save", default=None, metavar="DIR", help="write a checkpoint DIR/step-N at the end")
    p.add_argument("--save-every", type=int, default=0, metavar="K", help="also every K steps")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="a checkpoint, or a run directory (its latest); `auto`: --save's latest if it has one, else "
                        "start afresh (a job that torchrun restarts, at whatever world size is left, continues)")
    p.add_argument("--out", default="train-out", help="where losses.json and losses.png go (default: %(default)s)")
    add_device(p)
    p.add_argument("--deterministic", action="store_true",
                   help="losses and gradients bitwise equal at every --tp, logits equal to an engine's (README)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any collective may wait (default: 300)")
    add_json(p)
    add_quiet(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from tensorpar.train.run import run_training
    from tensorpar.train.trainer import TrainConfig

    cfg = TrainConfig(
        data=args.data, model=args.model, tp=args.tp, dp=args.dp, pp=args.pp, virtual_stages=args.virtual_stages, sp=args.sp, steps=args.steps,
        seq_len=args.seq_len, batch=args.batch, lr=args.lr, weight_decay=args.weight_decay,
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, min_lr=args.min_lr,
        clip_grad_norm=args.clip_grad_norm, grad_accum=args.grad_accum, eval_every=args.eval_every,
        eval_split=args.eval_split, dtype=args.dtype, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_targets=args.lora_targets, pack=args.pack,
        label_smoothing=args.label_smoothing, dropout=args.dropout, seed=args.seed, save=args.save, save_every=args.save_every,
        resume=args.resume, device=args.device, timeout_s=args.timeout, deterministic=args.deterministic,
    )
    result = run_training(cfg, args.out, progress=not (args.quiet or args.json))
    if result is None:  # a torchrun rank other than 0
        return 0
    if args.json:
        print(json.dumps({k: result[k] for k in ("losses", "steps", "grad_norms", "lrs", "eval", "tokens_per_s",
                                                    "peak_rss_mb", "checkpoint", "loss_curve", "tp", "pp", "dp", "sp")}))
    else:
        print(f"steps {result['first_step']}-{result['steps'][-1]}: loss {result['losses'][0]:.4f} -> "
              f"{result['losses'][-1]:.4f}, {result['tokens_per_s']:,.0f} tokens/s, "
              f"peak RSS per rank (MiB): {', '.join(f'{m:.0f}' for m in result['peak_rss_mb'])}")
        if result["eval"]:
            last = result["eval"][-1]
            print(f"held-out loss at step {last['step']}: {last['loss']:.4f}, perplexity {last['perplexity']:.1f} "
                  f"({last['tokens']} tokens)")
        if result["checkpoint"]:
            print(f"checkpoint: {result['checkpoint']}")
        print(f"loss curve: {result['loss_curve']['json']}, {result['loss_curve']['png']}")
    return 0
