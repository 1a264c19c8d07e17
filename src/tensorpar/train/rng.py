"""Random streams for dropout under tensor and data parallelism.

Two streams per rank, each its own saved generator state, entered with ``fork(kind)``:

- ``replicated``: seeded alike on every rank of a tensor-parallel group (and differently in each
  data-parallel replica, whose data differs). For dropout on activations that every TP rank holds
  in full (the residual branches without sequence parallelism): the ranks must draw the same
  mask, or their copies of the residual stream drift apart.
- ``sharded``: seeded differently on every TP rank. For dropout on activations split across the
  group (attention probabilities of local heads; the residual stream's sequence shards under
  sequence parallelism): equal seeds would correlate the masks of different heads or tokens.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

STREAMS = ("replicated", "sharded")


def stream_seed(seed: int, step: int, dp_rank: int, stream: str, tp_rank: int) -> int:
    """The seed of one stream at one step: a function of the run's seed, the step and this rank's
    place in the mesh (so a resumed run draws the masks an uninterrupted one would)."""
    member = 0 if stream == "replicated" else 1 + tp_rank
    return hash((seed, step, dp_rank, member)) & (2**63 - 1)


class ParallelRNG:
    def __init__(self, seed: int, tp_rank: int, dp_rank: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.seed, self.tp_rank, self.dp_rank = seed, tp_rank, dp_rank
        self._states: dict[str, torch.Tensor] = {}
        self.start_step(0)

    def start_step(self, step: int) -> None:
        """Reseed both streams for optimizer step ``step``."""
        for stream in STREAMS:
            seed = stream_seed(self.seed, step, self.dp_rank, stream, self.tp_rank)
            self._states[stream] = torch.Generator(device=self.device).manual_seed(seed).get_state()

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.cuda else torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.cuda:
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    @contextmanager
    def fork(self, stream: str):
        """Draw from ``stream`` inside the block; the default generator is left as it was."""
        outer = self._get()
        self._set(self._states[stream])
        try:
            yield
        finally:
            self._states[stream] = self._get()
            self._set(outer)


def set_dropout(model: torch.nn.Module, p: float, rng: ParallelRNG, sequence_parallel: bool) -> None:
    """Dropout ``p`` at every module that declares a ``dropout_site``: on attention probabilities
    (``"attention"``: the sharded stream) and on residual branches (``"residual"``: the replicated
    stream, or the sharded one under sequence parallelism)."""
    streams = {"attention": "sharded", "residual": "sharded" if sequence_parallel else "replicated"}
    for module in model.modules():
        site = getattr(module, "dropout_site", None)
        if site is not None:
            stream = streams[site]
            module.dropout, module.dropout_rng = p, lambda stream=stream: rng.fork(stream)
