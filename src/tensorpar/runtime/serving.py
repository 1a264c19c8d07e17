"""Serving: the scheduler on a thread of the leader's process, behind the contract the HTTP layer uses.

The HTTP layer (``tensorpar.serve``) runs in the rank-0 process. It turns each API request into
``Request``s and hands them to ``submit`` with a sink; the engine thread calls the sink with a
``TokenEvent`` for every generated token and once more, with ``finished=True``, at the end (also
on abort or error). Sinks run on the engine thread: they must only hand the event over
(``loop.call_soon_threadsafe``), never block.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Protocol

from tensorpar.distributed.launch import Ranks, launch, take_compute_threads
from tensorpar.errors import RankFailure, TensorparError
from tensorpar.runtime import messages
from tensorpar.runtime.inputs import InputProcessor
from tensorpar.runtime.request import Request, Sink
from tensorpar.runtime.sequence import final_event
from tensorpar.runtime.spec import EngineArgs, EngineSpec
from tensorpar.runtime.worker import Worker

DEFAULT_MAX_MODEL_LEN = 2048  # the serving default, at most the model's context: slots are preallocated


class ServingBackend(Protocol):
    """What the HTTP layer needs of an engine."""

    model_name: str
    tokenizer: object
    inputs: InputProcessor  # prompt encoding and the context check
    max_model_len: int
    tp: int
    layout: str  # "tp=2 pp=2"
    sampling_defaults: dict  # SamplingParams fields a request leaves out (``EngineArgs.generation_config``)

    def submit(self, request: Request, sink: Sink) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict:
        """``running``, ``waiting``, ``kv_cache_usage`` (0 to 1), ``healthy``, ``error``,
        ``requests`` (submitted so far); with replicas also ``replicas``, each one's."""

    def shutdown(self) -> None: ...

    def load_weights(self, path: str) -> float:
        """Replace the weights by those of the checkpoint at ``path`` (``LLM.load_weights``);
        seconds taken. Raises ``TensorparError`` when it cannot."""


def reload_refused(backend, path: str) -> float:
    """``load_weights`` of the backends that spawn their replicas (``--dp``, ``--elastic``)."""
    raise TensorparError("weights are reloaded in place into a server of one replica; not with --dp or --elastic yet")


def launch_engine(spec: EngineSpec, max_num_seqs: int, cores: tuple[int, int | None] = (0, None)) -> Ranks:
    """The ranks of one serving replica, its rank 0 (the scheduler's) in this process; under
    torchrun, those of this rank's replica (``cores``: see ``launch``)."""
    return launch(spec.dims.replica_size, Worker, (spec, max_num_seqs), spec.device, spec.timeout_s, spec.use_shm,
                  leader_here=True, replicas=spec.dims.dp, cores=cores, step_thread=True)


class ServingEngine:
    """The leader's side of serving (a ``ServingBackend``): ``EngineCore.step`` on a thread, over
    requests that arrive at any time. All ranks run every step; followers run
    ``Worker.follow_forever``. An idle leader sends followers a keep-alive every ``IDLE_WAIT_S``.

    ``ServingEngine(model, max_num_seqs=32, **options)``: ``options`` are ``EngineArgs``'.
    ``ServingEngine(ranks=..., max_num_seqs=...)`` serves ranks already launched (``launch_engine``).
    """

    IDLE_WAIT_S = 0.5
    REAP_S = 2.0  # how long a failed step waits to learn which rank died and how

    def __init__(self, model: str | None = None, max_num_seqs: int = 32, ranks: Ranks | None = None, **options):
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if options.get("dp", 1) != 1:
            raise TensorparError("a ServingEngine is one replica; `tensorpar serve --dp N` "
                                 "(tensorpar.runtime.replicas.start_serving) serves N")
        if ranks is None:
            args = EngineArgs(**({"model": model} if model is not None else {}), **options)
            ranks = launch_engine(args.resolve(DEFAULT_MAX_MODEL_LEN), max_num_seqs)
        if not ranks.is_leader:
            ranks.close()
            raise TensorparError("a serving engine runs on rank 0; other torchrun ranks run Worker.follow_forever")
        self._serve(ranks, max_num_seqs)

    def _serve(self, ranks: Ranks, max_num_seqs: int) -> None:
        self._ranks = ranks
        worker: Worker = ranks.local
        spec = worker.spec
        self.worker, self.core, self.scheduler = worker, worker.core, worker.core.scheduler
        self.model_name, self.max_num_seqs, self.max_model_len = spec.model, max_num_seqs, spec.max_model_len
        self.sampling_defaults = spec.sampling_defaults
        self.tp, self.backend = spec.dims.tp, worker.ctx.backend
        self.layout = spec.layout
        self.tokenizer, self.inputs = worker.tokenizer, worker.inputs
        if self.tokenizer is None:
            ranks.close(force=True)
            raise TensorparError(f"{spec.model} ships no tokenizer; serving needs one")
        ranks.start("follow_forever")
        self.core.reserve(max_num_seqs, self.max_model_len)
        self._stopping = False
        self._reloads: deque[tuple[str, Future]] = deque()  # asked for, not yet done
        self.healthy, self.error, self.submitted = True, None, 0
        self._thread = threading.Thread(target=self._loop, name="tensorpar-engine", daemon=True)
        self._thread.start()

    # ---- the HTTP side's interface -----------------------------------------------------------

    def submit(self, request: Request, sink: Sink) -> None:
        if self._stopping:
            sink(final_event(request.request_id, "error", "the server is shutting down"))
            return
        self.submitted += 1
        self.scheduler.add(request, sink)

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def stats(self) -> dict:
        return {**self.core.stats(), "healthy": self.healthy, "error": self.error, "requests": self.submitted,
                "tp": self.tp}

    def load_weights(self, path: str) -> float:
        """Replace every rank's weights by those of the checkpoint at ``path`` (resharded to this
        degree; ``EngineCore.load_weights``) between steps: requests that arrive meanwhile wait,
        those running finish on the old weights first, so that no answer mixes the two. Blocks
        until done; seconds the weights took."""
        done: Future = Future()
        with self.scheduler.lock:
            if not self.healthy or self._stopping:
                raise TensorparError(self.error or "the server is shutting down")
            self._reloads.append((path, done))
            self.scheduler.holding = True
            self.scheduler.lock.notify()
        return done.result()

    def shutdown(self) -> None:
        """Stop admitting, end what runs with "abort", stop the follower ranks."""
        self._stopping = True
        with self.scheduler.lock:
            self.scheduler.lock.notify()
        self._thread.join(timeout=30)
        self._ranks.close(force=not self.healthy)

    # ---- the engine thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        take_compute_threads(self._ranks)
        try:
            while not self._stopping:
                if self._reloads and not (self.scheduler.running or self.scheduler.preempted):
                    self._reload()
                elif self.scheduler.wait_for_work(self.IDLE_WAIT_S):
                    self.core.step()
                elif not self._stopping:
                    self.worker.runner.execute(messages.Message(messages.NOOP))
            self.scheduler.close("abort")
            self.worker.runner.execute(messages.Message(messages.SHUTDOWN))
        except Exception as e:  # a rank died or a collective failed: nothing more can run
            failure = self._ranks.failure()
            deadline = time.monotonic() + self.REAP_S
            while failure is None and not isinstance(e, RankFailure) and time.monotonic() < deadline:
                time.sleep(0.05)  # a peer seen dead in a collective may not have been reaped yet
                failure = self._ranks.failure()
            failure = failure or (e if isinstance(e, RankFailure) else None)
            if failure is not None:
                failure = failure.placed(self.worker.spec.dims.place)
            self.error = str(failure) if failure is not None else f"{type(e).__name__}: {e}"
            self.healthy = False
            self.scheduler.close("error", self.error)
            while self._reloads:
                self._reloads.popleft()[1].set_exception(TensorparError(self.error))

    def _reload(self) -> None:
        """The oldest weight reload asked for, with nothing running; the scheduler admits again
        once none is left. A checkpoint refused leaves the weights as they were; a rank lost on
        the way ends the loop as any step's would."""
        path, done = self._reloads[0]
        try:
            checked = self.worker.runner.checked_weights(path)
        except Exception as e:  # refused before any rank is told: the weights stay
            done.set_exception(e if isinstance(e, TensorparError) else TensorparError(f"{type(e).__name__}: {e}"))
        else:
            done.set_result(self.core.load_weights(checked))  # (a failure here ends the loop, as a step's would)
        with self.scheduler.lock:
            self._reloads.popleft()
            self.scheduler.holding = bool(self._reloads)
