"""``LLM``: the Python API. Spawns the ranks (or joins ``torchrun``'s) and drives generation."""

from __future__ import annotations

import time

from tensorpar.distributed.groups import DEFAULT_TIMEOUT_S
from tensorpar.errors import TensorparError
from tensorpar.runtime.engine import Engine, EngineSpec, GenerationResult
from tensorpar.runtime.ranks import start_ranks
from tensorpar.runtime.sampling import SamplingParams


class LLM:
    """A model sharded over ``tp`` ranks.

    >>> llm = LLM("smollm2-135m", tp=2)
    >>> llm.generate(["The capital of France is"], max_new_tokens=8)[0].text

    ``tp=1`` runs in this process. ``comm="auto"`` sends CPU collectives between ranks of one
    host through shared memory; ``comm="gloo"`` forces gloo (for comparison). ``tp>1`` spawns that many local ranks,
    supervised: if one dies, the others are stopped and the call raises ``RankFailure`` naming it. Under ``torchrun``
    the group's ranks are used as they are (``tp`` must equal the world size) and every rank
    must make the same calls; all of them get the same results.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        tp: int = 1,
        dtype: str = "auto",
        device: str = "cpu",
        progress: bool = True,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        comm: str = "auto",
    ):
        t0 = time.perf_counter()
        self.spec = EngineSpec(model=model, dtype=dtype, device=device, progress=progress)
        self.config, ctx, self._ranks = start_ranks(self.spec, tp, timeout_s, comm, leader_here=False)
        self._engine: Engine | None = None
        if ctx is not None:
            self._engine = Engine(self.spec, ctx)
            self.tp, self.backend = ctx.world_size, ctx.backend
        else:
            self.tp, self.backend = tp, self._ranks.call("backend")
        self.load_s = time.perf_counter() - t0

    @property
    def rank(self) -> int:
        return self._engine.ctx.rank if self._engine is not None else 0

    @property
    def worker_pids(self) -> list[int]:
        return self._ranks.pids if self._ranks is not None else []

    def _call(self, method: str, *args, **kwargs):
        if self._engine is not None:
            return getattr(self._engine, method)(*args, **kwargs)
        if self._ranks is None:
            raise TensorparError("this LLM has been closed")
        return self._ranks.call(method, *args, **kwargs)

    def generate_full(
        self,
        prompts: str | list,
        sampling: SamplingParams | list[SamplingParams] | None = None,
        chat: bool = False,
    ) -> GenerationResult:
        """Completions plus timings and per-rank peak memory."""
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
    ):
        """Generate for each prompt (text or token ids); greedy unless ``temperature > 0``."""
        sp = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, tuple(stop or ()), ignore_eos)
        return self.generate_full(prompts, sp, chat).completions

    def score(self, prompts: list) -> list:
        """Full-vocabulary logits [len(prompt), vocab] at every position of each prompt."""
        return self._call("score", list(prompts))

    def close(self) -> None:
        if self._ranks is not None:
            self._ranks.close()
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
