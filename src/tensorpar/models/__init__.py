"""Plain single-device model code; parallelism is applied afterwards by ``tensorpar.plans``."""

from tensorpar.models.config import ModelConfig
from tensorpar.models.llama import AttentionBatch, KVCache, LlamaForCausalLM

__all__ = ["ModelConfig", "LlamaForCausalLM", "KVCache", "AttentionBatch"]
