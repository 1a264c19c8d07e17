"""``tensorpar export``: write a sharded training checkpoint as a Hugging Face model directory
(a LoRA run's adapters with ``--merge-lora``: merged into the model they were trained on)."""

from __future__ import annotations

from tensorpar.cli.common import add_quiet


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="a training checkpoint -> a Hugging Face directory", description=__doc__)
    p.add_argument("checkpoint", metavar="DIR", help="a checkpoint (step-N) or a run directory (its latest)")
    p.add_argument("--hf", required=True, metavar="OUT", help="the new Hugging Face directory")
    p.add_argument("--merge-lora", action="store_true",
                   help="a LoRA run's checkpoint: write its base model with the adapters merged, W + alpha/r B A")
    add_quiet(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from tensorpar.train.export import export_hf

    out = export_hf(args.checkpoint, args.hf, progress=not args.quiet, merge_lora=args.merge_lora)
    print(f"wrote {out} (model.safetensors, config.json, tokenizer); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) or tensorpar generate --model {out}")
    return 0
