"""The autograd pairs of ``dist.collectives`` on three real ranks: each forward and backward
equals its definition, computed here from every rank's input and upstream gradient."""

from __future__ import annotations

import pytest
import torch

from tensorpar.distributed.ranks import SpawnedRanks

pytestmark = pytest.mark.timeout(120)
WORLD = 3


def rank_tensors(rank: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


class PairProbe:
    def __init__(self, ctx):
        self.ctx = ctx

    def run(self, name: str, in_shape, out_shape):
        from tensorpar.distributed import collectives
        from tensorpar.distributed.collectives import all_gather_object

        x, _ = rank_tensors(self.ctx.rank, in_shape)
        _, g = rank_tensors(self.ctx.rank, out_shape)
        x.requires_grad_()
        y = getattr(collectives, name)(x, self.ctx)
        (y * g).sum().backward()
        return all_gather_object((y.detach(), x.grad), self.ctx)


def chunk(t: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    return t.chunk(WORLD, dim=dim)[r]


# name, input shape, output shape, expected output of rank r, expected input gradient of rank r
CASES = [
    ("copy_to_tp", (2, 6, 4), (2, 6, 4), lambda xs, r: xs[r], lambda gs, r: sum(gs)),
    ("reduce_from_tp", (2, 6, 4), (2, 6, 4), lambda xs, r: sum(xs), lambda gs, r: gs[r]),
    ("gather_from_tp", (2, 6, 4), (2, 6, 12), lambda xs, r: torch.cat(xs, -1), lambda gs, r: chunk(gs[r], r, -1)),
    ("scatter_to_tp", (2, 6, 12), (2, 6, 4), lambda xs, r: chunk(xs[r], r, -1), lambda gs, r: torch.cat(gs, -1)),
    ("gather_seq", (2, 2, 4), (2, 6, 4), lambda xs, r: torch.cat(xs, 1), lambda gs, r: chunk(sum(gs), r, 1)),
    ("reduce_scatter_seq", (2, 6, 4), (2, 2, 4), lambda xs, r: chunk(sum(xs), r, 1), lambda gs, r: torch.cat(gs, 1)),
]


@pytest.fixture(scope="module")
def ranks():
    ranks = SpawnedRanks(WORLD, PairProbe, (), timeout_s=60)
    yield ranks
    ranks.close()


@pytest.mark.parametrize("name,in_shape,out_shape,forward,backward", CASES, ids=[c[0] for c in CASES])
def test_pair_forward_and_backward(ranks, name, in_shape, out_shape, forward, backward):
    got = ranks.call("run", name, in_shape, out_shape)
    xs = [rank_tensors(r, in_shape)[0] for r in range(WORLD)]
    gs = [rank_tensors(r, out_shape)[1] for r in range(WORLD)]
    for r, (y, grad) in enumerate(got):
        torch.testing.assert_close(y, forward(xs, r), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, backward(gs, r), rtol=1e-6, atol=1e-6)
