"""Distributed plumbing: the parallel layout, launching ranks, process groups, named collectives
and the shared-memory backend. Torch is imported by the modules that need it, not here."""
