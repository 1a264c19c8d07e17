"""Inference runtime: per-rank engine, sampling, and the user-facing ``LLM``."""

from tensorpar.runtime.engine import Completion, EngineSpec, GenerationResult
from tensorpar.runtime.llm import LLM
from tensorpar.runtime.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "Completion", "GenerationResult", "EngineSpec"]
