"""Inference runtime: one scheduler for ``LLM``, ``tensorpar generate`` and ``tensorpar serve``,
the model runner of each rank, the KV cache, sampling."""

from tensorpar.runtime.llm import LLM
from tensorpar.runtime.request import Completion, Request, TokenEvent
from tensorpar.runtime.sampling import SamplingParams
from tensorpar.runtime.spec import EngineArgs, EngineSpec
from tensorpar.runtime.worker import GenerationResult

__all__ = ["LLM", "SamplingParams", "Completion", "GenerationResult", "EngineArgs", "EngineSpec", "Request",
           "TokenEvent"]
