"""``LLM``: the Python API. Launches the ranks (or joins ``torchrun``'s) and generates through the
same scheduler as the server."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from tensorpar.distributed.launch import launch, torchrun_env
from tensorpar.errors import RankFailure, TensorparError
from tensorpar.runtime.sampling import SamplingParams
from tensorpar.runtime.spec import DEFAULT_MAX_NUM_SEQS, EngineArgs, one_rank_fewer

if TYPE_CHECKING:
    from tensorpar.runtime.request import GenerationResult


class LLM:
    """A model sharded over ``tp`` ranks.

    >>> llm = LLM("smollm2-135m", tp=2)
    >>> llm.generate(["The capital of France is"], max_new_tokens=8)[0].text

    ``options`` are ``EngineArgs``' (``tp``, ``dtype``, ``device``, ``comm``, ``timeout_s``,
    ``max_model_len``, ``progress``, ``tokenizer_cache``). One rank runs in this process; more are
    spawned, supervised: if one dies, the others are stopped and the call raises ``RankFailure``
    naming it. Under ``torchrun`` the group's ranks are used as they are (``tp`` defaults to the
    world size) and every rank must make the same calls; all of them get the same results.
    Prompts are scheduled as concurrent requests, at most ``max_num_seqs`` at a time.

    ``ranks``: run on ranks already launched (``tensorpar.distributed.launch.launch(tp)``), to load
    one model after another without starting processes again; they stay up when this LLM closes.

    ``elastic``: when a spawned rank dies or stops answering, launch one rank fewer (tp - 1, else
    pp - 1; ``one_rank_fewer``) and make the call again, instead of raising; ``rank_failures``
    counts them. Nothing of a call is kept, so its results are those of the smaller degree.
    """

    def __init__(self, model: str | None = None, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS, ranks=None,
                 elastic: bool = False, **options):
        t0 = time.perf_counter()
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if options.get("dp", 1) != 1:
            raise TensorparError("LLM runs one replica of tp x pp ranks; `tensorpar serve --dp N` serves N replicas")
        self._args = EngineArgs(**({"model": model} if model is not None else {}), **options)
        self.spec = self._args.resolve()
        self.config = self.spec.config
        self.elastic, self.rank_failures, self._max_num_seqs = elastic, 0, max_num_seqs
        self._weights: str | None = None  # a checkpoint loaded since (``load_weights``)
        if elastic and (ranks is not None or torchrun_env() is not None):
            raise TensorparError("elastic=True launches ranks again on this host: not with ranks given, nor under "
                                 "torchrun (whose own restarts bring a job back)")
        t1 = time.perf_counter()
        self._owns_ranks = ranks is None
        if ranks is None:
            ranks = self._launch()
        elif ranks.world_size != self.spec.dims.world_size:
            raise TensorparError(f"--tp {self.spec.dims.tp} needs {self.spec.dims.world_size} ranks; "
                                 f"the ranks given are {ranks.world_size}")
        else:
            from tensorpar.runtime.worker import Worker

            ranks.rebuild(Worker, (self.spec, max_num_seqs))
        self._ranks = ranks
        self.load_s = time.perf_counter() - t0
        leader = self._ranks.ready_info.get(0, {})
        self._describe()
        rank0 = {f"rank0_{k}": v for k, v in leader.items() if k.endswith("_s")}
        self.startup = {**self.spec.startup, "launch_s": time.perf_counter() - t1, **rank0, "total_s": self.load_s}

    def _launch(self):
        from tensorpar.runtime.worker import Worker  # (here, not above: importing LLM imports no torch)

        return launch(self.spec.dims.world_size, Worker, (self.spec, self._max_num_seqs), self.spec.device,
                      self.spec.timeout_s, self.spec.use_shm)

    def _describe(self) -> None:
        self.tp, self.pp = self.spec.dims.tp, self.spec.dims.pp
        self.layout = self.spec.layout
        leader = self._ranks.ready_info.get(0, {})
        self.backend = leader.get("backend") or self._ranks.local.ctx.backend

    def get_default_sampling_params(self, **overrides) -> SamplingParams:
        """The sampling defaults ``generation_config`` names (by default the model's
        ``generation_config.json``: temperature, top-p, top-k, min-p when it samples, its repetition
        penalty and max_new_tokens), with ``overrides``; tensorpar itself is greedy unless asked."""
        return SamplingParams(**{**self.spec.sampling_defaults, **overrides})

    @property
    def rank(self) -> int:
        return self._ranks.ctx.rank if self._ranks is not None and self._ranks.ctx is not None else 0

    @property
    def worker_pids(self) -> list[int]:
        return self._ranks.pids if self._ranks is not None else []

    def _call(self, method: str, *args):
        if self._ranks is None:
            raise TensorparError("this LLM has been closed")
        while True:
            try:
                return self._ranks.call(method, *args)
            except RankFailure as e:
                failure = e.placed(self.spec.dims.place)
                smaller = one_rank_fewer(self._args, self.spec.dims) if self.elastic else None
                if smaller is None:
                    raise failure from None
            self._ranks.close(force=True)
            self._ranks, self.rank_failures = None, self.rank_failures + 1
            self._args, self.spec = smaller, smaller.resolve()
            print(f"tensorpar: warning: {failure}; running again at {self.spec.dims.describe()}", file=sys.stderr,
                  flush=True)
            self._ranks = self._launch()
            if self._weights is not None:
                self._ranks.call("load_weights", self._weights)
            self._describe()

    def generate_full(
        self,
        prompts: str | list,
        sampling: SamplingParams | list[SamplingParams] | None = None,
        chat: bool = False,
    ) -> "GenerationResult":
        """Completions (``params.n`` per prompt, prompt-major), plus timings and per-rank peak memory."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        sampling = sampling or SamplingParams()
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        return self._call("generate", prompts, params, chat)

    def generate(
        self,
        prompts: str | list,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: list[str] | None = None,
        chat: bool = False,
        ignore_eos: bool = False,
        n: int = 1,
    ):
        """Generate for each prompt (text or token ids); greedy unless ``temperature > 0``.

        Returns ``n`` completions per prompt, prompt-major; choice i samples with ``seed + i``.
        """
        sp = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, tuple(stop or ()), ignore_eos, n)
        return self.generate_full(prompts, sp, chat).completions

    def score(self, prompts: list) -> list:
        """Full-vocabulary logits [len(prompt), vocab] at every position of each prompt."""
        return self._call("score", list(prompts))

    def load_weights(self, path) -> float:
        """Replace the weights by those of the checkpoint at ``path`` (a newer training step's, say),
        without a restart: every rank reads its own slices, whatever layout it was saved at, and
        the prefix cache is forgotten. It must hold the same model (refused, weights untouched, if
        not); a model packed by ``quantization`` cannot be reloaded. Seconds taken."""
        seconds = self._call("load_weights", str(path))
        self._weights = str(path)
        return seconds

    def replica_mismatch(self, prompt: list[int]) -> str | None:
        """Score ``prompt`` (token ids) once and compare, within each tensor-parallel group, every
        value its ranks hold replicated (norm weights, the keys and values of a KV head held by
        several ranks, the residual stream after each layer) bit for bit: None where all agree,
        else the first layer and tensor that differ, and the ranks."""
        from tensorpar.runtime.digests import first_mismatch

        return first_mismatch(self._call("replica_digests", list(prompt)), self.spec.dims)

    def close(self) -> None:
        if self._ranks is not None:
            if self._owns_ranks:
                self._ranks.close()
            else:  # borrowed: left up, without this model
                self._ranks.rebuild(None)
            self._ranks = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

