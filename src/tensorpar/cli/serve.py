"""``tensorpar serve``: an OpenAI-compatible HTTP server over a model sharded on ``--tp`` x ``--pp``
ranks, or over ``--dp`` replicas of that layout (each request to the least busy replica)."""

from __future__ import annotations

import os
import signal
import sys
import threading

from tensorpar.cli.common import add_engine, engine_args


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI API (completions, chat) over HTTP", description=__doc__)
    add_engine(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $VLLM_API_KEY, as vLLM reads it)")
    p.add_argument("--uds", default=None, metavar="PATH", help="listen on this Unix socket instead of --host/--port")
    p.add_argument("--root-path", default="", help="the path prefix a proxy serves the API under")
    p.add_argument("--enable-request-id-headers", action="store_true",
                   help="(always on: every response carries X-Request-Id, the request's own or a new one)")
    p.add_argument("--enable-server-load-tracking", action="store_true",
                   help="(always on: GET /load gives the /v1 requests in flight)")
    p.add_argument("--reasoning-parser", choices=["qwen3"], default=None,
                   help="return a chat reply's thinking (<think>...</think>) as `reasoning`, apart from `content`")
    p.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="usage.prompt_tokens_details.cached_tokens: the prompt tokens the prefix cache held")
    p.add_argument("--enable-force-include-usage", action="store_true",
                   help="end every stream with a usage chunk, asked for (stream_options.include_usage) or not")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="let a chat request bring its own chat_template (rendered in a sandbox; off: a 400)")
    p.add_argument("--dp", "--data-parallel-size", "-dp", dest="dp", type=int, default=1,
                   help="independent replicas of the --tp x --pp layout behind the one endpoint; a request goes "
                        "to the replica with the fewest outstanding requests, and the others serve on when one fails")
    p.add_argument("--elastic", action="store_true",
                   help="survive a rank that dies or stops answering (--timeout): the HTTP server runs in a process "
                        "without weights, the replica restarts one rank smaller (tp 3 -> 2), and the requests in "
                        "flight resume where their streams stopped. Without it a dead rank stops the server at once")
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences that run at once (per replica); more wait")
    p.add_argument("--disable-log-requests", action="store_true",
                   help="no log line per request (endpoint, tokens in and out, finish, time to first token, latency)")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20,
                   help="largest request body accepted; larger ones get 413 (default: %(default)s)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the names the model answers to in requests (the first is the one responses carry; "
                        "default: --model as given)")
    p.add_argument("--max-n", type=int, default=32,
                   help="most choices (n) one request may ask for (default: %(default)s)")
    p.add_argument("--max-tokens-limit", type=int, default=None, metavar="N",
                   help="most tokens one request may generate per choice; a request asking more gets 400, one "
                        "asking nothing gets at most this (default: what the context leaves)")
    p.add_argument("--plan", default=None, metavar="PLAN.json",
                   help="take --tp, --pp and --dp from the recommended configuration of `tensorpar plan --json`")
    p.set_defaults(run=run)


def apply_plan_file(args) -> None:
    """Set ``args.tp`` / ``args.pp`` / ``args.dp`` from a plan's recommendation; refuse one tensorpar cannot run."""
    import json

    from tensorpar.errors import TensorparError

    try:
        plan = json.loads(open(args.plan).read())
        best = plan["recommended"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TensorparError(f"--plan {args.plan}: not the output of `tensorpar plan --json` ({e})") from None
    if not best:
        raise TensorparError(f"--plan {args.plan}: the plan recommends no configuration")
    if not best.get("runnable_by_tensorpar"):
        raise TensorparError(f"--plan {args.plan}: tensorpar cannot run the recommended TP={best.get('tp')} "
                             f"PP={best.get('pp')} DP={best.get('dp')} EP={best.get('ep')} yet")
    args.tp, args.pp, args.dp = best["tp"], best["pp"], best.get("dp", 1)


def _watch(engine, stop: threading.Event) -> None:
    """Say when a replica goes down (a front end says it itself); when none is left, say why and
    stop the server (it then exits non-zero)."""
    said = None
    quiet = getattr(engine, "says_failures", False)
    while not stop.wait(0.2):
        stats = engine.stats()
        if stats["error"] and stats["error"] != said and stats["healthy"] and not quiet:
            live = sum(r["healthy"] for r in stats.get("replicas", []))
            print(f"tensorpar: error: {stats['error']}; serving on {live} replica(s)", file=sys.stderr, flush=True)
            said = stats["error"]
        if not stats["healthy"]:
            print(f"tensorpar: error: {stats['error']}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _check_port(host: str, port: int) -> None:
    """Refuse a port another process holds before any rank loads the model (under torchrun, on
    the rank that will listen)."""
    import socket

    from tensorpar.distributed.launch import torchrun_env
    from tensorpar.errors import TensorparError

    env = torchrun_env()
    if port == 0 or (env is not None and env.rank != 0):
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            shown = f"[{host}]" if ":" in host else host
            raise TensorparError(f"could not listen on http://{shown}:{port}: {e.strerror.lower()}") from None


def start_engine(args):
    """The engine behind the server: on one host, with ``--elastic`` or ``--dp`` above 1, a front
    end without weights over spawned replicas that it restarts (``runtime.frontend``); otherwise the
    replicas with the first one's leader in this process (``runtime.replicas``). None on a torchrun
    rank that is not the server's."""
    from tensorpar.distributed.launch import torchrun_env
    from tensorpar.errors import TensorparError

    options = engine_args(args, dp=args.dp)
    if torchrun_env() is None and (args.elastic or args.dp > 1):
        from tensorpar.runtime.frontend import Frontend

        return Frontend(options, args.max_num_seqs, elastic=args.elastic)
    if args.elastic:
        raise TensorparError("--elastic restarts replicas on this host; under torchrun a rank that dies ends the "
                             "job, and torchrun's own restarts (--max-restarts) bring it back")
    from tensorpar.runtime.replicas import start_serving
    from tensorpar.runtime.serving import DEFAULT_MAX_MODEL_LEN

    return start_serving(options.resolve(DEFAULT_MAX_MODEL_LEN), args.max_num_seqs)


def api_key(given: str | None) -> str | None:
    """The key requests must bring: ``--api-key``, else ``$VLLM_API_KEY`` (a server configured the
    vLLM way is not left open), else none."""
    return given or os.environ.get("VLLM_API_KEY") or None


def run(args) -> int:
    if args.max_num_seqs < 1:
        raise ValueError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    if args.max_n < 1:
        raise ValueError(f"--max-n must be >= 1, got {args.max_n}")
    if args.max_tokens_limit is not None and args.max_tokens_limit < 1:
        raise ValueError(f"--max-tokens-limit must be >= 1, got {args.max_tokens_limit}")
    if args.plan:
        apply_plan_file(args)
    if not args.uds:
        _check_port(args.host, args.port)
    engine = start_engine(args)
    if engine is None:  # another rank under torchrun: it has followed its leader to the end
        return 0
    from tensorpar.serve.params import Limits
    from tensorpar.serve.server import run_server

    stop = threading.Event()
    threading.Thread(target=_watch, args=(engine, stop), daemon=True).start()
    try:
        run_server(engine, args.host, args.port, api_key(args.api_key),
                   max_request_bytes=args.max_request_bytes,
                   limits=Limits(args.max_n, args.max_tokens_limit, args.trust_request_chat_template,
                                 args.enable_force_include_usage, args.reasoning_parser,
                                 args.enable_prompt_tokens_details),
                   served_names=args.served_model_name, root_path=args.root_path, uds=args.uds,
                   log_requests=not args.disable_log_requests)
    finally:
        stop.set()
    return 0 if engine.stats()["healthy"] else 1
