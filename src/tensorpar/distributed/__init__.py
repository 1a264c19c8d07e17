"""Distributed plumbing: the parallel layout, launching ranks and replicas, process groups, named
collectives and the shared-memory backend. Torch is imported by the modules that need it, not here."""

DEFAULT_TIMEOUT_S = 60.0  # seconds any collective may wait
