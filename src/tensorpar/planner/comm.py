"""Collective communication time: a latency plus bytes over bandwidth, with the algorithm's factor.

For ``n`` ranks and a message of ``S`` bytes (nccl-tests conventions: ``S`` is the buffer each
rank holds for an all-reduce, the gathered output for an all-gather):

    ring all-reduce        t = alpha(n) + 2 (n - 1) / n * S / busbw
    NVLink SHARP (NVLS)    t = alpha(n) + S / (sharp_efficiency * bandwidth)    (the switch reduces)
    all-gather / reduce-scatter (ring)   t = alpha(n) + (n - 1) / n * S / busbw
    all-to-all             t = alpha(n) + (n - 1) / n * S / busbw      (S: the buffer each rank sends)
    point-to-point send    t = alpha + S / bandwidth

with ``alpha(n) = latency + (n - 1) * latency_per_rank`` and ``busbw = efficiency * bandwidth``.
The all-reduce takes whichever algorithm is faster for the message (as NCCL's tuner does). An
inference engine with its own all-reduce kernel for small messages (``engines``: one-shot over
peer memory inside a node) replaces ``alpha(n)`` by its latency for messages up to its limit.
Inside a node the link is the GPU's (NVLink, PCIe, shared memory); a group spread over several
nodes is limited by the node's inter-node bandwidth, shared by the ``concurrent`` groups that
cross it at the same time, and pays the inter-node latency. Collectives measured by
``tensorpar bench`` (``Device.measured_collectives``) replace the link model at the world
sizes they were measured at.
"""

from __future__ import annotations

from tensorpar.planner.engines import Engine
from tensorpar.planner.hardware import Device, Link

ALL_REDUCE = "all_reduce"
ALL_GATHER = "all_gather"
REDUCE_SCATTER = "reduce_scatter"
ALL_TO_ALL = "all_to_all"


def ring_all_reduce_time(nbytes: float, n: int, alpha_s: float, busbw_Bps: float) -> float:
    """``alpha + 2 (n - 1) / n * S / busbw`` (0 for a group of one)."""
    if n <= 1:
        return 0.0
    return alpha_s + 2 * (n - 1) / n * nbytes / busbw_Bps


def sharp_all_reduce_time(nbytes: float, n: int, alpha_s: float, bandwidth_Bps: float) -> float:
    """In-switch reduction: every rank sends and receives its ``S`` bytes once."""
    if n <= 1:
        return 0.0
    return alpha_s + nbytes / bandwidth_Bps


def ring_all_gather_time(nbytes: float, n: int, alpha_s: float, busbw_Bps: float) -> float:
    """``alpha + (n - 1) / n * S / busbw``, ``S`` the gathered output (same for reduce-scatter)."""
    if n <= 1:
        return 0.0
    return alpha_s + (n - 1) / n * nbytes / busbw_Bps


def p2p_time(nbytes: float, alpha_s: float, bandwidth_Bps: float) -> float:
    return alpha_s + nbytes / bandwidth_Bps


def link_latency_s(link: Link, n: int) -> float:
    return (link.latency_us + (n - 1) * link.latency_per_rank_us) * 1e-6


def _measured(device: Device, op: str, n: int):
    wanted = ALL_GATHER if op in (REDUCE_SCATTER, ALL_TO_ALL) else op  # (the same bytes cross the same links)
    for m in device.measured_collectives:
        if m.op == wanted and m.world_size == n:
            return m
    return None


def collective_time(op: str, nbytes: float, n: int, device: Device, nodes: int = 1, concurrent: int = 1,
                    oversubscribed: bool = False, engine: Engine | None = None) -> float:
    """Seconds for one collective of ``n`` ranks spread over ``nodes`` nodes (see module doc)."""
    if n <= 1:
        return 0.0
    if op not in (ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, ALL_TO_ALL):
        raise ValueError(f"unknown collective {op!r}")
    measured = _measured(device, op, n) if nodes == 1 else None
    if measured is not None:
        alpha, busbw = measured.alpha_us * 1e-6, measured.busbw_GBps * 1e9
        if op == ALL_REDUCE:
            return ring_all_reduce_time(nbytes, n, alpha, busbw)
        return ring_all_gather_time(nbytes, n, alpha, busbw)
    intra = device.intra_node
    if nodes > 1:
        inter = device.inter_node
        if inter is None:
            raise ValueError(f"device {device.name!r} has no inter-node link")
        alpha = link_latency_s(inter, n)
        busbw = min(intra.efficiency * intra.bandwidth_GBps, inter.efficiency * inter.bandwidth_GBps / concurrent) * 1e9
        sharp_bw = None
    else:
        alpha = link_latency_s(intra, n)
        busbw = intra.efficiency * intra.bandwidth_GBps * 1e9
        sharp_bw = intra.sharp_efficiency * intra.bandwidth_GBps * 1e9 if intra.sharp else None
    if oversubscribed:
        alpha += device.oversubscribed_latency_us * 1e-6
    if op == ALL_REDUCE:
        t = ring_all_reduce_time(nbytes, n, alpha, busbw)
        if sharp_bw is not None:
            t = min(t, sharp_all_reduce_time(nbytes, n, alpha, sharp_bw))
        if (engine is not None and engine.allreduce_latency_us is not None and nodes == 1
                and nbytes <= engine.allreduce_max_bytes):
            t = min(t, ring_all_reduce_time(nbytes, n, engine.allreduce_latency_us * 1e-6, busbw))
        return t
    return ring_all_gather_time(nbytes, n, alpha, busbw)


def send_time(nbytes: float, device: Device, across_nodes: bool) -> float:
    """One pipeline-stage boundary: activations sent from one GPU to the next."""
    if across_nodes and device.inter_node is not None:
        link = device.inter_node
        bandwidth = link.efficiency * link.bandwidth_GBps / max(1, device.gpus_per_node)
    else:
        link = device.intra_node
        bandwidth = link.efficiency * link.bandwidth_GBps
    return p2p_time(nbytes, link.latency_us * 1e-6, bandwidth * 1e9)
