"""``tensorpar serve``: an OpenAI-compatible HTTP server over a model sharded on ``--tp`` ranks."""

from __future__ import annotations

import os
import signal
import sys
import threading


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI API (completions, chat) over HTTP", description=__doc__)
    p.add_argument("--model", default="smollm2-135m", help="alias, Hugging Face directory, or .gguf file")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (1 to the number of query heads)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences that run at once; more wait")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + completion in tokens (default: min(model context, 2048))")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--comm", default="auto", choices=["auto", "gloo"])
    p.set_defaults(run=run)


def _watch(engine, stop: threading.Event) -> None:
    """When a rank dies, say which and stop the server (it then exits non-zero)."""
    while not stop.wait(0.2):
        if not engine.stats()["healthy"]:
            print(f"tensorpar: error: {engine.stats()['error']}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            return


def run(args) -> int:
    from tensorpar.runtime.serving import ServingEngine

    engine = ServingEngine(
        args.model, tp=args.tp, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, comm=args.comm,
    )
    if not engine.engine.ctx.is_leader:  # a follower rank under torchrun
        engine.engine.follow_forever()
        return 0
    from tensorpar.serve.server import run_server

    stop = threading.Event()
    threading.Thread(target=_watch, args=(engine, stop), daemon=True).start()
    try:
        run_server(engine, args.host, args.port, args.api_key)
    finally:
        stop.set()
    return 0 if engine.stats()["healthy"] else 1
