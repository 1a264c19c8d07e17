"""``run_server``: serve an engine over HTTP with uvicorn until SIGINT/SIGTERM (or ``stop``).

On a signal the server stops accepting connections, lets requests in flight finish for
``grace_s`` seconds (then cancels them, which aborts their sequences), shuts the engine down and
returns. A second Ctrl+C skips the wait.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading

import uvicorn

from tensorpar.errors import TensorparError
from tensorpar.runtime.serving import ServingBackend
from tensorpar.serve.app import create_app
from tensorpar.serve.errors import DEFAULT_MAX_REQUEST_BYTES
from tensorpar.serve.params import Limits


class _Server(uvicorn.Server):
    """uvicorn's server, announcing itself once listening, and returning after a signal (uvicorn
    itself re-raises the signal once it has stopped, which would kill the process before the engine
    shuts down)."""

    def __init__(self, config: uvicorn.Config, banner):
        super().__init__(config)
        self.banner = banner

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            port = self.servers[0].sockets[0].getsockname()[1] if self.servers else self.config.port
            print(self.banner(port), file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def log_to_stderr(requests: bool) -> None:
    """The request log (``tensorpar.serve.requests``) at info level on stderr, or silenced."""
    log = logging.getLogger("tensorpar.serve.requests")
    log.setLevel(logging.INFO if requests else logging.WARNING)
    if requests and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s tensorpar %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False


def run_server(engine: ServingBackend, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, *,
               grace_s: float = 5.0, stop: threading.Event | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, limits: Limits = Limits(),
               served_names: list[str] | None = None, log_requests: bool = True, root_path: str = "",
               uds: str | None = None) -> None:
    """Serve ``engine`` at ``host:port`` until SIGINT/SIGTERM or until ``stop`` is set, then shut
    the engine down. ``port=0`` picks a free port (the banner line on stderr names it).
    ``log_requests``: one line per request on stderr (``tensorpar.serve.bridge``). ``root_path``:
    the path prefix a proxy serves the app under; ``uds``: listen on this Unix socket instead."""
    log_to_stderr(log_requests)
    app = create_app(engine, api_key, max_request_bytes, limits, served_names)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace_s,
                            root_path=root_path, uds=uds)
    shown_host = f"[{host}]" if ":" in host else host
    name = (served_names or [engine.model_name])[0]
    where = (lambda p: f"unix:{uds}") if uds else (lambda p: f"http://{shown_host}:{p}")
    server = _Server(config, lambda p: f"tensorpar: serving {name} at {where(p)} ({engine.layout})")
    done = threading.Event()
    if stop is not None:
        def watch():
            while not done.is_set():
                if stop.wait(0.1):
                    server.should_exit = True
                    return

        threading.Thread(target=watch, name="tensorpar-serve-stop", daemon=True).start()
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot listen (it has logged why)
        if not server.started:
            raise TensorparError(f"could not listen on http://{shown_host}:{port}") from None
        raise
    finally:
        done.set()
        engine.shutdown()
