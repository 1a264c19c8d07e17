"""Make every rank's local gradient the matching slice of the single-process gradient.

After ``loss.backward()`` on each rank, three kinds of entries still differ from it:

1. **Padding** (query-head slots that hold no head, see ``tensorpar.partition``): their weights are
   zero and must stay zero, but ``o_proj``'s padding columns receive a gradient. It is zeroed.
2. **Partial sums.** A KV head that several ranks replicate gets, on each, the gradient through
   that rank's query heads only; under sequence parallelism a replicated tensor (norm weights,
   row-parallel biases) gets, on each rank, the gradient from that rank's sequence shard only.
   The true gradient is the sum over the holders: the partial tensors are scattered into full-size
   buffers, summed over the tensor-parallel group in one all-reduce, and read back. (In
   deterministic mode a KV head's gradient is already whole on every holder,
   ``layers.deterministic_grads``: nothing is partial.)
3. **Data parallelism.** Each replica's loss is its share of the global mean (token losses
   summed, divided by the global token count), so the replicas' gradients are summed over the
   data-parallel group. The sums start while backward is still running (``DataParallelBuckets``);
   all three steps are linear, so their order does not matter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tensorpar.distributed.collectives import all_gather_object, all_reduce
from tensorpar.distributed.mesh import Mesh
from tensorpar.layers import deterministic
from tensorpar.layers.pieces import trainable_pieces


def _overlaps(spans: list[tuple[int, int]]) -> bool:
    spans = sorted(spans)
    return any(b0 < a1 for (_, a1), (b0, _) in zip(spans, spans[1:]))


class DataParallelBuckets:
    """Sum gradients over the data-parallel group while backward runs.

    Parameters are grouped into buckets of about ``bucket_mib`` in reverse registration order
    (roughly the order backward produces their gradients). When the last gradient of a bucket has
    been accumulated, the bucket is flattened and all-reduced asynchronously; ``wait`` completes
    every bucket (launching any whose gradients did not all arrive) and writes the sums back.
    """

    def __init__(self, params: list[torch.nn.Parameter], ctx, bucket_mib: float = 25.0):
        self.ctx = ctx
        self.buckets: list[list[torch.nn.Parameter]] = [[]]
        size = 0
        for p in reversed(params):
            if size and size + p.numel() * p.element_size() > bucket_mib * 2**20:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.paused = False  # a micro-batch before the last: its gradients still accumulate
        self.ready = [0] * len(self.buckets)
        self.pending: dict[int, tuple] = {}
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if self.paused:
            return
        i = self.bucket_of[id(p)]
        self.ready[i] += 1
        if self.ready[i] == len(self.buckets[i]):
            self._launch(i)

    def _launch(self, i: int) -> None:
        for p in self.buckets[i]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.flatten() for p in self.buckets[i]])
        self.pending[i] = (dist.all_reduce(flat, group=self.ctx.group, async_op=True), flat)

    def reset(self) -> None:
        """Forget a backward pass that was not followed by ``wait`` (its sums are discarded)."""
        for work, _ in self.pending.values():
            work.wait()
        self.pending.clear()
        self.ready = [0] * len(self.buckets)

    def wait(self) -> None:
        for i in range(len(self.buckets)):
            if i not in self.pending:
                self._launch(i)
        for i, (work, flat) in self.pending.items():
            work.wait()
            bucket = self.buckets[i]
            for p, part in zip(bucket, flat.split([p.numel() for p in bucket])):
                p.grad.copy_(part.view_as(p.grad))
        self.pending.clear()
        self.ready = [0] * len(self.buckets)


class GradientSync:
    """The three steps of the module docstring, for the parameters that require gradients, whose
    full shapes (by checkpoint name) are ``shapes``."""

    def __init__(self, model, mesh: Mesh, sequence_parallel: bool, shapes: dict):
        self.mesh = mesh
        params = trainable_pieces(model)
        self.params = [pp.param for pp in params]
        self.data_parallel = DataParallelBuckets(self.params, mesh.dp) if mesh.dp.world_size > 1 else None
        self.padding = [(pp.param, pc) for pp in params for pc in pp.pieces if pc.part is None]
        held: dict[str, list[tuple[int, int]]] = {}
        for pp in params:
            for pc in pp.pieces:
                if pc.part is not None and pc.axis is not None:
                    held.setdefault(pp.full_name(pc), []).append((pc.span.start, pc.span.stop))
        partial = set()
        if mesh.tp.world_size > 1 and not deterministic.enabled():
            merged: dict[str, list[tuple[int, int]]] = {}
            for rank_held in all_gather_object(held, mesh.tp):
                for name, spans in rank_held.items():
                    merged.setdefault(name, []).extend(spans)
            partial = {n for n, spans in merged.items() if _overlaps(spans)}
            if sequence_parallel:
                partial |= {pp.full_name(pc) for pp in params for pc in pp.pieces if pc.axis is None}
        self.partial = [
            (name, shapes[name], [(pp.param, pc) for pp in params for pc in pp.pieces
                                  if pc.part is not None and pp.full_name(pc) == name])
            for name in sorted(partial)
        ]

    def start(self) -> None:
        """Before ``backward``: no data-parallel sum of an earlier pass is left in flight."""
        if self.data_parallel is not None:
            self.data_parallel.reset()

    def accumulating(self, more: bool) -> None:
        """Before each micro-batch's backward: ``more`` of them follow, so the data-parallel sums
        wait for the last one's gradients (which hold every micro-batch's)."""
        if self.data_parallel is not None:
            self.data_parallel.paused = more

    def __call__(self) -> None:
        """After ``backward``: every local gradient becomes its slice of the global gradient."""
        if self.data_parallel is not None:
            self.data_parallel.wait()
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for param, pc in self.padding:
            pc.local_view(param.grad).zero_()
        if self.partial:
            buffers = [torch.zeros(shape, device=self.params[0].device) for _, shape, _ in self.partial]
            for buf, (_, _, holders) in zip(buffers, self.partial):
                for param, pc in holders:
                    pc.full_slice(buf).add_(pc.local_view(param.grad))
            summed = all_reduce(torch.cat([b.flatten() for b in buffers]), self.mesh.tp)
            for buf, part in zip(buffers, summed.split([b.numel() for b in buffers])):
                buf.copy_(part.view_as(buf))
            for buf, (_, _, holders) in zip(buffers, self.partial):
                for param, pc in holders:
                    pc.local_view(param.grad).copy_(pc.full_slice(buf))
