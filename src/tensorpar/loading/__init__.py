"""Checkpoint sources (Hugging Face safetensors directories, GGUF files) and sharded loading."""

from tensorpar.loading.loader import build_model, expected_shapes, load_weights
from tensorpar.loading.sources import CheckpointSource, open_source, resolve_model

__all__ = ["CheckpointSource", "open_source", "resolve_model", "build_model", "load_weights", "expected_shapes"]
