"""Collectives for ranks on one host through one shared-memory segment.

gloo's all-reduce between two local processes costs over a millisecond per call, while a decode
step of a small model needs two per layer; this path costs microseconds.

Segment layout (one per group)::

    flags   [world] int64, one per 64-byte line: the sequence number of the last op each rank entered
    pids    [world] int64: to tell a dead peer from a slow one
    data    [2][world][capacity] bytes: a slot per rank, double-buffered by sequence parity

Every rank runs the same sequence of ops. For op ``s`` a rank writes its input into its slot of
buffer ``s % 2``, publishes ``flags[rank] = s``, and waits until every flag is >= s; then it reads
the slots. Two buffers suffice: a rank can only enter op ``s + 2`` (reusing buffer ``s % 2``) after
every rank has entered op ``s + 1``, that is, after every rank has finished reading op ``s``.

Reductions add the slots in rank order (slot 0 + slot 1 + ...), so every rank gets bit-identical
results, run after run. Messages larger than a slot go through in slot-sized chunks.

Ordering relies on x86-64's total store order (data stores become visible before the flag
store); elsewhere tensorpar falls back to gloo. Rank 0 creates the segment in ``/dev/shm`` (or in
``$TENSORPAR_SHM_DIR``), reserving its pages up front so that a full tmpfs fails there and then
rather than with a SIGBUS mid-run, and unlinks its name as soon as every rank has mapped it, so
nothing is left behind after a normal exit, a crash, or a ``SIGKILL``. A segment that cannot be
created (no such directory, no space, no permission) leaves the group on gloo, with a warning.
"""

from __future__ import annotations

import mmap
import os
import platform
import sys
import time
import uuid

import numpy as np
import torch

LINE = 64  # bytes per flag: one cache line each, so ranks do not write the same line
DEFAULT_CAPACITY = 4 << 20  # bytes per slot
SPIN = 200  # busy polls before yielding the core (matters when ranks outnumber cores)
CHECK_EVERY = 2000  # polls between deadline / peer-liveness checks
DOZE_AFTER = 50_000  # polls (several ms) after which a waiter is idle and sleeps between polls
DOZE_S = 0.0005


def available() -> bool:
    """Shared memory collectives are safe here (x86-64 ordering)."""
    return platform.machine().lower() in ("x86_64", "amd64")


def segment_dir() -> str:
    """Where segments are created: ``$TENSORPAR_SHM_DIR``, else ``/dev/shm``."""
    return os.environ.get("TENSORPAR_SHM_DIR") or "/dev/shm"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


class ShmCommunicator:
    def __init__(self, path: str, rank: int, world_size: int, capacity: int, timeout_s: float, create: bool):
        self.rank, self.world_size, self.capacity, self.timeout_s = rank, world_size, capacity, timeout_s
        header = 2 * world_size * LINE
        size = header + 2 * world_size * capacity
        fd = os.open(path, (os.O_CREAT | os.O_EXCL | os.O_RDWR) if create else os.O_RDWR, 0o600)
        try:
            if create:
                os.posix_fallocate(fd, 0, size)  # ENOSPC now, not a SIGBUS at the first write
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        words = np.frombuffer(self._map, dtype=np.int64, count=header // 8)
        self._flags = words[: world_size * LINE // 8 : LINE // 8]  # strided view, one per line
        self._pids = words[world_size * LINE // 8 :: LINE // 8]
        self._pids[rank] = os.getpid()
        self._data = torch.frombuffer(self._map, dtype=torch.uint8, offset=header, count=2 * world_size * capacity)
        self._data = self._data.view(2, world_size, capacity)
        self._views: dict = {}
        self._seq = 0
        self._peers = [r for r in range(world_size) if r != rank]

    # ---- building blocks --------------------------------------------------------------------

    def _slot(self, buf: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
        return self._slots(dtype)[buf][rank]

    def _slots(self, dtype: torch.dtype) -> list[list[torch.Tensor]]:
        """Typed views of every slot, [buffer][rank], made once per dtype."""
        views = self._views.get(dtype)
        if views is None:
            views = self._views[dtype] = [
                [self._data[b, r].view(dtype) for r in range(self.world_size)] for b in range(2)
            ]
        return views

    def _enter(self, what: str) -> int:
        """Publish this rank's arrival at the next op and wait for every peer's; return the buffer."""
        self._seq += 1
        seq = self._seq
        self._flags[self.rank] = seq
        flags = self._flags
        for peer in self._peers:
            polls = 0
            while flags[peer] < seq:
                polls += 1
                if polls > DOZE_AFTER:
                    time.sleep(DOZE_S)
                elif polls > SPIN:
                    os.sched_yield()
                if polls % CHECK_EVERY == 0:
                    self._check(peer, seq, what, polls)
        return seq & 1

    def _check(self, peer: int, seq: int, what: str, polls: int) -> None:
        if not hasattr(self, "_deadline") or self._deadline[0] != seq:
            self._deadline = (seq, time.monotonic() + self.timeout_s)
        pid = int(self._pids[peer])
        if pid and not _alive(pid):
            raise RuntimeError(f"rank {peer} (pid {pid}) died; rank {self.rank} was waiting for it in shared-memory {what}")
        if time.monotonic() > self._deadline[1]:
            from tensorpar.errors import RankFailure

            ranks, world = getattr(self, "group_ranks", None), getattr(self, "group_world", self.world_size)
            raise RankFailure(ranks[peer] if ranks else peer, world,
                              f"did not answer within {self.timeout_s:.0f} s (shared-memory {what})")

    def _chunks(self, n: int, itemsize: int):
        step = self.capacity // itemsize
        for start in range(0, n, step):
            yield start, min(n, start + step)

    # ---- collectives ---------------------------------------------------------------------------

    def _shaped(self, dtype: torch.dtype, shape: torch.Size) -> list[list[torch.Tensor]]:
        """Slot views of exactly ``shape``, [buffer][rank], cached: a decode step reuses a few
        shapes thousands of times, and making a view costs about a microsecond."""
        key = (dtype, shape)
        views = self._views.get(key)
        if views is None:
            if len(self._views) > 512:  # many prompt lengths seen: start afresh
                self._views.clear()
            n = shape.numel()
            views = self._views[key] = [[v[:n].view(shape) for v in bufs] for bufs in self._slots(dtype)]
        return views

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x <- sum over ranks of x, in place; the sum is taken in rank order on every rank."""
        if x.is_contiguous() and x.numel() * x.element_size() <= self.capacity:  # one slot: the decode case
            slots = self._shaped(x.dtype, x.shape)[(self._seq + 1) & 1]
            slots[self.rank].copy_(x)
            self._enter("all_reduce")
            if self.world_size == 2:
                torch.add(slots[0], slots[1], out=x)
            else:
                x.copy_(slots[0])
                for r in range(1, self.world_size):
                    x.add_(slots[r])
            return x
        flat = x.view(-1) if x.is_contiguous() else x.contiguous().view(-1)
        for a, b in self._chunks(flat.numel(), flat.element_size()):
            piece = flat[a:b]
            n = b - a
            buf = (self._seq + 1) & 1
            self._slot(buf, self.rank, flat.dtype)[:n].copy_(piece)
            self._enter("all_reduce")
            piece.copy_(self._slot(buf, 0, flat.dtype)[:n])
            for r in range(1, self.world_size):
                piece.add_(self._slot(buf, r, flat.dtype)[:n])
        if flat.data_ptr() != x.data_ptr():
            x.copy_(flat.view_as(x))
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's equal-sized ``x`` stacked: [world_size, *x.shape]."""
        return self._gather(x, "all_gather", read=True)

    def gather(self, x: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        """Every rank's equal-sized ``x`` stacked on rank ``dst``, [world_size, *x.shape]; None on
        the others, which only write their slot and leave."""
        return self._gather(x, "gather", read=self.rank == dst)

    def _gather(self, x: torch.Tensor, what: str, read: bool) -> torch.Tensor | None:
        flat = x.reshape(-1)
        out = torch.empty(self.world_size, flat.numel(), dtype=x.dtype) if read else None
        for a, b in self._chunks(flat.numel(), flat.element_size()):
            n = b - a
            buf = (self._seq + 1) & 1
            self._slot(buf, self.rank, flat.dtype)[:n].copy_(flat[a:b])
            self._enter(what)
            if out is not None:
                for r in range(self.world_size):
                    out[r, a:b].copy_(self._slot(buf, r, flat.dtype)[:n])
        return None if out is None else out.view(self.world_size, *x.shape)

    def all_to_all(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` [N, ...] sent by destination: ``rows`` [world, world] (the same on every
        rank) says how many rows rank p sends rank q, and this rank's ``x`` holds its rows for rank
        0, then for rank 1, and so on. Returns the rows every rank sent here, in rank order,
        [sum_p rows[p, rank], ...].

        Each rank's flat buffer goes through its slot in slot-sized rounds (as many as the largest
        buffer needs); in each round a rank copies out of every peer's slot the part of that peer's
        buffer addressed to it. Its own rows it copies directly.
        """
        width = x[0].numel() if x.shape[0] else int(np.prod(x.shape[1:]))
        counts = rows.tolist()
        me = self.rank
        flat = x.reshape(-1)
        out = torch.empty(sum(c[me] for c in counts) * width, dtype=x.dtype)
        src = [sum(c[:me]) * width for c in counts]  # where each rank's rows for me start in its buffer
        dst = [sum(counts[p][me] for p in range(q)) * width for q in range(self.world_size)]
        n_me = counts[me][me] * width
        out[dst[me]:dst[me] + n_me].copy_(flat[src[me]:src[me] + n_me])
        step = self.capacity // x.element_size()
        longest = max(sum(c) for c in counts) * width
        for a in range(0, longest, step):
            b = a + step
            buf = (self._seq + 1) & 1
            mine = flat[a:b]
            if mine.numel():
                self._slot(buf, me, x.dtype)[: mine.numel()].copy_(mine)
            self._enter("all_to_all")
            for p in self._peers:
                lo, hi = max(a, src[p]), min(b, src[p] + counts[p][me] * width)
                if lo < hi:
                    at = dst[p] + lo - src[p]
                    out[at:at + hi - lo].copy_(self._slot(buf, p, x.dtype)[lo - a:hi - a])
        return out.view(-1, *x.shape[1:])

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """x <- rank ``src``'s x, in place."""
        if x.is_contiguous() and x.numel() * x.element_size() <= self.capacity:  # one slot
            slot = self._shaped(x.dtype, x.shape)[(self._seq + 1) & 1][src]
            if self.rank == src:
                slot.copy_(x)
            self._enter("broadcast")
            if self.rank != src:
                x.copy_(slot)
            return x
        flat = x.view(-1) if x.is_contiguous() else x.contiguous().view(-1)
        for a, b in self._chunks(flat.numel(), flat.element_size()):
            n = b - a
            buf = (self._seq + 1) & 1
            if self.rank == src:
                self._slot(buf, src, flat.dtype)[:n].copy_(flat[a:b])
            self._enter("broadcast")
            if self.rank != src:
                flat[a:b].copy_(self._slot(buf, src, flat.dtype)[:n])
        if flat.data_ptr() != x.data_ptr():
            x.copy_(flat.view_as(x))
        return x

    def close(self) -> None:
        self._views.clear()
        self._data = self._flags = self._pids = None
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with the process
            pass


def create_group_communicator(rank: int, world_size: int, group, timeout_s: float,
                              capacity: int = DEFAULT_CAPACITY) -> ShmCommunicator | None:
    """Set up one segment for ``group`` (a collective over the group's own backend); None on
    every rank, and a warning from rank 0, when rank 0 cannot create it."""
    import torch.distributed as dist

    comm = None
    if rank == 0:
        path = os.path.join(segment_dir(), f"tensorpar-{uuid.uuid4().hex[:16]}")
        try:
            comm = ShmCommunicator(path, rank, world_size, capacity, timeout_s, create=True)
            box = [path]
        except OSError as e:
            try:
                os.unlink(path)
            except OSError:
                pass
            box = [None]
            print(f"tensorpar: warning: cannot create a shared-memory segment in {segment_dir()} "
                  f"({e.strerror or e}); collectives go through gloo instead (slower)", file=sys.stderr, flush=True)
    else:
        box = [None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    path = box[0]
    if path is None:
        return None
    if rank != 0:
        comm = ShmCommunicator(path, rank, world_size, capacity, timeout_s, create=False)
    dist.barrier(group=group)  # every rank has mapped it: its name can go
    if rank == 0:
        os.unlink(path)
    comm.group_ranks = [dist.get_global_rank(group, i) for i in range(world_size)]  # to name a silent peer
    comm.group_world = dist.get_world_size()
    return comm
