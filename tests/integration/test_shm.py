"""Shared-memory collectives: identical, deterministic results on every rank; chunking past the
slot size; a dead or silent peer raises a clear error instead of spinning; no segment is left in
/dev/shm."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import uuid
from pathlib import Path

import pytest
import torch

from tensorpar.distributed import shm as shm_module
from tensorpar.distributed.ranks import SpawnedRanks
from tensorpar.errors import RankFailure

pytestmark = pytest.mark.skipif(not shm_module.available(), reason="shared-memory collectives need x86-64 and /dev/shm")


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("tensorpar-*")}


def inputs(rank: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)
    if dtype.is_floating_point:
        return (torch.randn(n, generator=g) * 10).to(dtype)
    return torch.randint(-1000, 1000, (n,), generator=g, dtype=dtype)


def a2a_rows(world: int, width: int) -> torch.Tensor:
    """[world, world] rows rank p sends rank q: some none, and (wide rows) several slots' worth."""
    g = torch.Generator().manual_seed(7 + world + width)
    rows = torch.randint(0, 6 if width < 1000 else 900, (world, world), generator=g)
    rows[0, world - 1] = 0
    return rows


def a2a_inputs(rank: int, rows: torch.Tensor, width: int) -> torch.Tensor:
    return inputs(rank, int(rows[rank].sum()) * width, torch.float32).view(-1, width)


class CollectiveProbe:
    """Runs collectives on one rank and reports what every rank got."""

    def __init__(self, ctx):
        self.ctx = ctx

    def backend(self):
        return self.ctx.backend

    def run(self, op: str, n: int, dtype: torch.dtype, strided: bool = False):
        import torch.distributed as dist

        x = inputs(self.ctx.rank, n, dtype)
        if strided:  # a non-contiguous view of the same values
            big = torch.zeros(n, 2, dtype=dtype)
            big[:, 0] = x
            x = big[:, 0]
        if op == "all_reduce":
            got = [self.ctx.shm.all_reduce(x.clone()) for _ in range(2)]
            if strided:
                out = big.clone()[:, 0]
                self.ctx.shm.all_reduce(out)
                got.append(out)
        elif op == "all_gather":
            got = [self.ctx.shm.all_gather(x) for _ in range(2)]
        elif op == "all_to_all":  # n: the widest row; over shared memory, then over gloo alone
            import dataclasses

            from tensorpar.distributed.collectives import all_to_all

            rows = a2a_rows(self.ctx.world_size, n)
            x = a2a_inputs(self.ctx.rank, rows, n)
            got = [all_to_all(x, rows, self.ctx), all_to_all(x, rows, dataclasses.replace(self.ctx, shm=None))]
        else:
            got = [self.ctx.shm.broadcast(x.clone(), src=self.ctx.world_size - 1) for _ in range(2)]
        everyone = [None] * self.ctx.world_size
        dist.all_gather_object(everyone, [g.contiguous() for g in got])
        return everyone


def make_tester(ctx):
    return CollectiveProbe(ctx)


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request):
    before = shm_segments()
    group = SpawnedRanks(request.param, make_tester)
    yield group
    group.close()
    assert shm_segments() <= before  # nothing left behind after a normal exit


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("n", [1, 576, 3_000_000])  # the last one spans several 4 MiB slots
def test_all_reduce_is_exact_identical_and_deterministic(ranks, n, dtype):
    assert ranks.call("backend") == "shm+gloo"
    world = ranks.world_size
    everyone = ranks.call("run", "all_reduce", n, dtype)
    want = inputs(0, n, dtype).clone()
    for r in range(1, world):  # the documented order: slot 0 + slot 1 + ...
        want += inputs(r, n, dtype)
    for results in everyone:
        for got in results:
            assert torch.equal(got, want)


@pytest.mark.timeout(120)
def test_all_reduce_of_a_strided_view(ranks):
    everyone = ranks.call("run", "all_reduce", 1000, torch.float32, True)
    want = sum(inputs(r, 1000, torch.float32) for r in range(ranks.world_size))
    for results in everyone:
        assert torch.allclose(results[0], want) and torch.equal(results[0], results[2])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [3, 2_000_000])
def test_all_gather_and_broadcast(ranks, n):
    world = ranks.world_size
    want = torch.stack([inputs(r, n, torch.float32) for r in range(world)])
    for results in ranks.call("run", "all_gather", n, torch.float32):
        for got in results:
            assert torch.equal(got, want)
    for results in ranks.call("run", "broadcast", n, torch.float32):
        for got in results:
            assert torch.equal(got, inputs(world - 1, n, torch.float32))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("width", [3, 2048])  # 2048-wide float rows: a 4 MiB slot holds 512 of them
def test_all_to_all_of_variable_sizes(ranks, width):
    world = ranks.world_size
    rows = a2a_rows(world, width)
    sent = [a2a_inputs(p, rows, width).split(rows[p].tolist()) for p in range(world)]
    assert int(rows.sum(1).max()) * width * 4 > (4 << 20) or width < 1000
    for q, results in enumerate(ranks.call("run", "all_to_all", width, torch.float32)):
        want = torch.cat([sent[p][q] for p in range(world)])
        for got in results:
            assert torch.equal(got, want)


def _peer(path: str, behaviour: str) -> None:
    comm = shm_module.ShmCommunicator(path, 1, 2, 1 << 16, timeout_s=30, create=False)
    comm.all_reduce(torch.ones(4))
    if behaviour == "die":
        os._exit(3)
    time.sleep(60)  # "hang": alive, never joins the next op


@pytest.mark.timeout(60)
@pytest.mark.parametrize("behaviour", ["die", "hang"])
def test_dead_or_silent_peer_raises_instead_of_spinning(behaviour):
    path = f"/dev/shm/tensorpar-test-{uuid.uuid4().hex[:8]}"
    comm = shm_module.ShmCommunicator(path, 0, 2, 1 << 16, timeout_s=30, create=True)  # (the peer imports torch)
    peer = mp.get_context("spawn").Process(target=_peer, args=(path, behaviour), daemon=True)
    peer.start()
    try:
        assert torch.equal(comm.all_reduce(torch.ones(4)), torch.full((4,), 2.0))
        comm.timeout_s = 2.0
        os.unlink(path)
        t0 = time.monotonic()
        error = RuntimeError if behaviour == "die" else RankFailure
        with pytest.raises(error, match="rank 1"):
            comm.all_reduce(torch.ones(4))
        assert time.monotonic() - t0 < (1.0 if behaviour == "die" else 10.0)
    finally:
        peer.kill()
        peer.join()
        if os.path.exists(path):
            os.unlink(path)
