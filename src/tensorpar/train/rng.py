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

from tensorpar.models.llama import Attention, DecoderLayer

STREAMS = ("replicated", "sharded")


def stream_seed(seed: int, dp_rank: int, stream: str, tp_rank: int) -> int:
    """The seed of one stream: a function of the run's seed and this rank's place in the mesh."""
    member = 0 if stream == "replicated" else 1 + tp_rank
    return hash((seed, dp_rank, member)) & (2**63 - 1)


class ParallelRNG:
    def __init__(self, seed: int, tp_rank: int, dp_rank: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._states = {}
        for stream in STREAMS:
            g = torch.Generator(device=device).manual_seed(stream_seed(seed, dp_rank, stream, tp_rank))
            self._states[stream] = g.get_state()

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
    """Dropout ``p`` on attention probabilities (sharded stream) and on the residual branches
    (replicated stream, or sharded under sequence parallelism)."""
    residual = "sharded" if sequence_parallel else "replicated"
    for module in model.modules():
        if isinstance(module, Attention):
            module.dropout, module.dropout_rng = p, lambda: rng.fork("sharded")
        elif isinstance(module, DecoderLayer):
            module.dropout, module.dropout_rng = p, lambda: rng.fork(residual)
