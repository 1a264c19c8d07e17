"""Distributed plumbing: launching ranks, process groups, and named collectives."""

from tensorpar.distributed.groups import ParallelContext, single_process_context

__all__ = ["ParallelContext", "single_process_context"]
