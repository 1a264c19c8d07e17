"""A random-weight mixture of experts with a real model's layer shapes and fewer layers, for
benchmarks on a machine that cannot hold the real one.

    python benchmarks/moe_model.py [--shape qwen3-30b-a3b] [--layers 2] [--vocab 32000] --out DIR

``qwen3-30b-a3b``: hidden 2048, 32 query / 4 KV heads of 128, 128 experts of width 768, top-8
(renormalised), as Qwen3-30B-A3B; its vocabulary (151936) is cut to ``--vocab`` so that the head
does not outweigh the few layers. Written by transformers (``save_pretrained``), in float32.
"""

from __future__ import annotations

import argparse

SHAPES = {
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096,
                          tie_word_embeddings=False, rms_norm_eps=1e-6),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**SHAPES[args.shape], num_hidden_layers=args.layers, vocab_size=args.vocab)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(args.out)
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")


if __name__ == "__main__":
    main()
