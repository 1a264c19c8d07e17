"""Gemma 3 (text): the architecture module.

Differences from the Llama family, all chosen by ``ModelConfig`` and built by the blocks:
token embeddings times sqrt(hidden); RMSNorm scaling by (1 + w); GeGLU with the tanh GELU;
RMSNorm of each q and k head; norms before and after both attention and MLP (``sandwich_norms``);
sliding-window layers (base 10000) interleaved with global ones (every 6th by default, with their
own base and scaling); q scaled by query_pre_attn_scalar^-1/2; a tied head. With one KV head
(270M, 1B) every rank holds it (replication).

llama.cpp's converter stores every norm weight as 1 + w, which ``from_gguf_layout`` undoes. GGUF
files of Gemma carry no chat template: ``CHAT_TEMPLATE`` is Gemma's turn format.
"""

from __future__ import annotations

import torch

from tensorpar.models.blocks import PLAN, CausalLM
from tensorpar.models.config import ModelConfig
from tensorpar.models.names import gguf_from_hf, same_name

__all__ = ["CHAT_TEMPLATE", "EOS_TOKENS", "MODEL", "PLAN", "from_gguf_layout", "gguf_tensor", "hf_tensor"]

MODEL = CausalLM
hf_tensor = same_name
gguf_tensor = gguf_from_hf(hf_tensor)

# Gemma's turns: a system message is prefixed to the first user turn; the assistant is "model".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
EOS_TOKENS = ("<eos>", "<end_of_turn>")


def from_gguf_layout(name: str, tensor: torch.Tensor, config: ModelConfig, gguf_architecture: str) -> torch.Tensor:
    """GGUF norm weights hold 1 + w; the model's norms add the 1 themselves."""
    return tensor - 1.0 if name.endswith("norm.weight") else tensor
