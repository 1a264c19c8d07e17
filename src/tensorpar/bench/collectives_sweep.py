"""All-reduce and all-gather latency and bandwidth over message sizes, like nccl-tests.

Ranks are spawned with ``SpawnedRanks`` (pinned and threaded exactly as the engine's ranks are);
each runs ``CollectiveBench.sweep``. Backends:

- ``gloo``: ``torch.distributed`` directly on ``ctx.group`` (``all_reduce``; ``all_gather_single``
  into one tensor, falling back to the list form where the build lacks it);
- ``shm``: the shared-memory communicator ``ctx.shm`` (``all_reduce(t) -> t`` in place,
  ``all_gather(t) -> tensor`` concatenated along dim 0), measured whenever the context has one.

Sizes follow nccl-tests: for all-reduce the size is the buffer every rank reduces; for all-gather
it is the gathered output (each rank contributes size / n). Per size: warm-up calls, then
back-to-back timed calls; each rank takes the median of its calls and the slowest rank's median is
the latency. ``algbw = bytes / latency``; ``busbw = algbw * 2(n-1)/n`` (all-reduce) or
``algbw * (n-1)/n`` (all-gather), the link bandwidth an ideal ring would need.
"""

from __future__ import annotations

import statistics
import threading
import time

import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "all_gather")


def sweep_sizes(max_bytes: int, min_bytes: int = 4) -> list[int]:
    """4 B, 16 B, 64 B, ... up to ``max_bytes`` (x4 each step)."""
    sizes, s = [], min_bytes
    while s <= max_bytes:
        sizes.append(s)
        s *= 4
    return sizes


def iterations_for(nbytes: int, iters: int, min_iters: int = 3, budget_bytes: int = 1 << 28) -> int:
    """Fewer timed calls for large messages: about ``budget_bytes`` moved per size, within
    [min(min_iters, iters), iters]."""
    return max(min(min_iters, iters), min(iters, budget_bytes // max(nbytes, 1)))


def bus_factor(collective: str, n: int) -> float:
    """nccl-tests' busbw / algbw."""
    return 2 * (n - 1) / n if collective == "all_reduce" else (n - 1) / n


class _Gloo:
    def __init__(self, group):
        self.group = group
        self.gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
        self.op = {"all_reduce": "all_reduce", "all_gather": "all_gather_single"}

    def all_reduce(self, t):
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t, out):
        if self.gather_single is not None:
            try:
                self.gather_single(out, t, group=self.group)
                return out
            except (RuntimeError, NotImplementedError):
                self.gather_single = None
                self.op["all_gather"] = "all_gather (list)"
        parts = list(out.view(-1, t.numel()).unbind(0))
        dist.all_gather(parts, t, group=self.group)
        return out


class _Shm:
    def __init__(self, shm):
        self.shm = shm
        self.op = {"all_reduce": "shm.all_reduce", "all_gather": "shm.all_gather"}

    def all_reduce(self, t):
        return self.shm.all_reduce(t)

    def all_gather(self, t, out):
        return self.shm.all_gather(t)


class CollectiveBench:
    """One rank's side of the sweep (built by ``make_collective_bench`` in every spawned rank)."""

    def __init__(self, ctx):
        self.ctx = ctx

    def backends(self) -> list[tuple[str, object]]:
        out = [("gloo", _Gloo(self.ctx.group))]
        shm = getattr(self.ctx, "shm", None)
        if shm is not None:
            out.append(("shm", _Shm(shm)))
        return out

    def sweep(self, sizes: list[int], iters: int, warmup: int) -> list[dict]:
        rows = []
        for backend, ops in self.backends():
            for collective in COLLECTIVES:
                for size in sizes:
                    rows.append(self._measure(backend, ops, collective, size, iters, warmup))
        return rows

    def _measure(self, backend, ops, collective, size, iters, warmup) -> dict:
        n, rank = self.ctx.world_size, self.ctx.rank
        if collective == "all_reduce":
            count = max(1, size // 4)
            nbytes = count * 4
            x = torch.full((count,), float(rank + 1))

            def run():
                return ops.all_reduce(x)

            def correct(y):
                return bool(torch.all(y == n * (n + 1) / 2))
        else:
            per = max(1, round(size / 4 / n))
            nbytes = per * 4 * n
            x = torch.full((per,), float(rank + 1))
            out = torch.empty(per * n)
            want = torch.arange(1, n + 1, dtype=torch.float32).repeat_interleave(per)

            def run():
                return ops.all_gather(x, out)

            def correct(y):
                return y.numel() == want.numel() and bool(torch.equal(y.reshape(-1), want))

        ok = correct(run())
        if collective == "all_reduce":
            x.zero_()  # keep repeated in-place sums bounded
        for _ in range(warmup):
            run()
        k = iterations_for(nbytes, iters)
        dist.barrier(group=self.ctx.group)
        times = []
        for _ in range(k):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        mine = (statistics.median(times), min(times), ok)
        every = [None] * n
        dist.all_gather_object(every, mine, group=self.ctx.group)
        latency = max(m[0] for m in every)
        algbw = nbytes / latency / 1e9
        return {
            "backend": backend,
            "op": ops.op[collective],
            "collective": collective,
            "world_size": n,
            "bytes": nbytes,
            "iters": k,
            "latency_us": latency * 1e6,
            "min_latency_us": max(m[1] for m in every) * 1e6,
            "algbw_GBps": algbw,
            "busbw_GBps": algbw * bus_factor(collective, n),
            "correct": all(m[2] for m in every),
        }


def make_collective_bench(ctx) -> CollectiveBench:
    """``SpawnedRanks`` factory (module level, so it pickles)."""
    return CollectiveBench(ctx)


def call_with_timeout(ranks, timeout_s: float, method: str, *args):
    """``ranks.call(method, *args)``, stopping every rank if it takes longer than ``timeout_s``."""
    box: dict = {}

    def target():
        try:
            box["value"] = ranks.call(method, *args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        ranks.close(force=True)
        th.join(10)
        raise TimeoutError(f"{method} did not finish within {timeout_s:.0f} s; ranks stopped")
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_sweep(world_size: int, sizes: list[int], iters: int, warmup: int, timeout_s: float = 600.0) -> list[dict]:
    """Spawn ``world_size`` ranks, sweep every backend they offer, and stop them."""
    from tensorpar.distributed.ranks import SpawnedRanks

    ranks = SpawnedRanks(world_size, make_collective_bench, (), "cpu", timeout_s=min(timeout_s, 120.0))
    try:
        return call_with_timeout(ranks, timeout_s, "sweep", sizes, iters, warmup)
    finally:
        ranks.close()
