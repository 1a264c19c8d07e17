"""The flags that several commands share, each defined once."""

from __future__ import annotations

import argparse

from tensorpar.dtypes import ALIASES, ENGINE_DTYPES
from tensorpar.loading.open import ALIASES as MODEL_ALIASES
from tensorpar.loading.open import DEFAULT_MODEL
from tensorpar.runtime.spec import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_BATCHED_TOKENS

MODEL_HELP = (f"an alias ({', '.join(MODEL_ALIASES)}), a Hugging Face directory, a .gguf file, or a tensorpar "
              "training checkpoint")


def add_model(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP}{extra} (default: %(default)s)")


def add_json(p: argparse.ArgumentParser, what: str = "one JSON object on stdout") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what}")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_tp(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", "--tensor-parallel-size", "-tp", dest="tp", type=int, default=None,
                   help="tensor-parallel degree: any value from 1 to the number of query heads "
                        "(default: 1, or torchrun's world size)")


def add_pp(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pp", "--pipeline-parallel-size", "-pp", dest="pp", type=int, default=1,
                   help="pipeline stages, each a tensor-parallel group of --tp ranks, holding contiguous "
                        "layers (default: 1)")


def add_ep(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ep", type=int, default=1,
                   help="expert parallelism (mixture-of-experts models): each stage's ranks hold the experts in this "
                        "many sets; --tp is then 1 (attention replicated) or a multiple of --ep (default: 1)")
    p.add_argument("--moe-dispatch", default="auto", choices=["auto", "reduce", "all_to_all"],
                   help="how tokens reach their experts' ranks: reduce (every rank routes every token, partial sums "
                        "all-reduced), all_to_all (each rank routes its slice, rows sent to the experts and back), "
                        "auto (all_to_all where it moves fewer bytes: experts whole on more than 2 x top-k ranks, "
                        "steps of 64 tokens or more; default)")


def add_engine(p: argparse.ArgumentParser) -> None:
    """--model, --tp, --pp, --ep and the options of ``tensorpar.runtime.EngineArgs``."""
    add_model(p)
    add_tp(p)
    add_pp(p)
    add_ep(p)
    names = ", ".join("/".join(ALIASES[d]) for d in ENGINE_DTYPES)
    p.add_argument("--dtype", default="auto", help=f"weights: auto (bf16 on CUDA, fp32 elsewhere), {names}")
    add_device(p)
    p.add_argument("--comm", default="auto", choices=["auto", "gloo"],
                   help="auto: shared memory between CPU ranks on one host, else gloo/NCCL (default); gloo: always gloo")
    p.add_argument("--quantization", default="none", choices=["none", "int8", "int4", "gguf"],
                   help="weight-only quantization of each rank's shards (CPU): int8 per output row, int4 in groups "
                        "of --quant-group inputs, both applied after loading; gguf keeps a GGUF file's own blocks "
                        "(Q4_0/1, Q5_0/1, Q8_0, Q4_K, Q5_K, Q6_K) packed (default: none)")
    p.add_argument("--lora-adapter", default=None, metavar="CHECKPOINT",
                   help="LoRA adapters from `tensorpar train --lora-rank`, merged into --model's weights as they load "
                        "(any degree)")
    p.add_argument("--quant-group", type=int, default=32, choices=[32, 64, 128, 256],
                   help="inputs per int4 group (default: %(default)s)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + completion in tokens (default: the model's context; serve: at most 2048)")
    p.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS,
                   help="new tokens one model step runs at most: a decode token for each running sequence, then "
                        "prompt tokens (default: %(default)s)")
    p.add_argument("--chunked-prefill", "--enable-chunked-prefill", dest="chunked_prefill",
                   action=argparse.BooleanOptionalAction, default=True,
                   help="split a prompt longer than what is left of a step's token budget into chunks run beside "
                        "the running decodes over several steps (default: on); off, prompts run whole")
    p.add_argument("--kv-cache-memory", type=_budget, default=None, metavar="SIZE|FRACTION",
                   help="KV cache per rank: bytes (e.g. 2GiB) or a fraction of the memory free after loading (e.g. "
                        "0.5); requests are admitted while its blocks last (default: room for --max-num-seqs "
                        "sequences of --max-model-len, resident only as used)")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help="positions per KV-cache block (default: %(default)s)")
    p.add_argument("--prefix-caching", "--enable-prefix-caching", dest="prefix_caching",
                   action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV-cache blocks of a prompt prefix computed before, such as a shared system "
                        "prompt (default: on)")
    p.add_argument("--deterministic", "--enable-deterministic-inference", dest="deterministic", action="store_true",
                   help="logits bitwise equal at every tensor-parallel degree: every product in one fixed order, "
                        "row-parallel sums over a grid the degree does not change (float32 dense models on CPU; "
                        "slower)")
    add_speculative(p)
    p.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                   help="a Jinja chat template (a file, or the text) instead of the tokenizer's own")
    p.add_argument("--generation-config", default="auto", metavar="auto|vllm|FOLDER",
                   help="sampling defaults for what a request leaves out: auto, the model's generation_config.json "
                        "(temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens); vllm, none; or a "
                        "folder holding a generation_config.json (default: auto)")
    p.add_argument("--timeout", type=float, default=None, help="seconds any collective may wait (default: 60)")
    p.add_argument("--max-memory", type=_size, default=None, metavar="SIZE",
                   help="bytes of weights one rank may hold, e.g. 8GiB: a layout needing more is refused before "
                        "loading (always refused: more than the host has available)")
    p.add_argument("--no-tokenizer-cache", dest="tokenizer_cache", action="store_false",
                   help="convert a GGUF file's tokenizer afresh instead of keeping it in ~/.cache/tensorpar "
                        "(or $TENSORPAR_CACHE_DIR)")


def add_speculative(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help="speculative decoding, as vLLM configures it: '{\"method\": \"ngram\", "
                        "\"num_speculative_tokens\": 4, \"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}' (drafts "
                        "copied from the text so far), or '{\"model\": PATH_OR_ALIAS, \"num_speculative_tokens\": 4, "
                        "\"draft_tensor_parallel_size\": 1}' (a draft model with the target's vocabulary, on the "
                        "first ranks; default degree: --tp)")


def _size(text: str) -> int:
    from tensorpar.runtime.memory_guard import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _budget(text: str) -> float | int:
    from tensorpar.runtime.memory_guard import parse_budget

    try:
        return parse_budget(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")


def engine_args(args: argparse.Namespace, progress: bool = True, dp: int = 1):
    """The ``EngineArgs`` of the flags ``add_engine`` defined (and ``dp`` replicas, for serving)."""
    from tensorpar.runtime.spec import EngineArgs

    options = dict(model=args.model, tp=args.tp, pp=args.pp, dp=dp, ep=args.ep, moe_dispatch=args.moe_dispatch,
                   quantization=args.quantization, quant_group=args.quant_group, dtype=args.dtype, device=args.device,
                   comm=args.comm,
                   max_model_len=args.max_model_len, progress=progress, tokenizer_cache=args.tokenizer_cache,
                   max_num_batched_tokens=args.max_num_batched_tokens, chunked_prefill=args.chunked_prefill,
                   max_memory=args.max_memory, kv_cache_memory=args.kv_cache_memory, block_size=args.block_size,
                   prefix_caching=args.prefix_caching, chat_template=args.chat_template,
                   generation_config=args.generation_config, deterministic=args.deterministic,
                   speculative_config=args.speculative_config, lora_adapter=args.lora_adapter)
    if args.timeout is not None:
        options["timeout_s"] = args.timeout
    return EngineArgs(**options)
