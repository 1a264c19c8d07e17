"""GPT-2: the architecture module.

LayerNorm with bias, learned absolute position embeddings (no RoPE), a plain MLP
down(gelu_tanh(up(x))), biases on every projection, multi-head attention (as many KV heads as
query heads: TP up to the head count, 12 for GPT-2 small), a tied head.

Hugging Face checkpoints store ``Conv1D`` weights as [in, out] and Q/K/V fused in ``c_attn``
(``hf_tensor`` says which rows of which tensor each model tensor is, read transposed); names
appear with or without the ``transformer.`` prefix. llama.cpp's converter stores them as [out, in].
"""

from __future__ import annotations

import re
from collections.abc import Collection

from tensorpar.models.blocks import PLAN as DENSE_PLAN
from tensorpar.models.blocks import CausalLM
from tensorpar.models.names import TensorRef, fused_rows, gguf_from_hf

__all__ = ["MODEL", "PLAN", "from_gguf_layout", "gguf_tensor", "hf_tensor"]

MODEL = CausalLM

# The dense plan, its MLP's input projection plain ``up_proj`` (no gate to fuse with).
PLAN: dict[str, str] = {p.replace(".mlp.gate_up_proj", ".mlp.up_proj"): style for p, style in DENSE_PLAN.items()}

_GLOBAL = {"model.embed_tokens": "wte", "model.embed_positions": "wpe", "model.norm": "ln_f", "lm_head": "lm_head"}
_LAYER = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.c_proj",
          "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def hf_tensor(name: str, config, stored: Collection[str] | None = None) -> TensorRef:
    m = _LAYER_NAME.fullmatch(name)
    rows = None
    if m is None:
        module, param = name.rsplit(".", 1)
        path = _GLOBAL[module]
    else:
        layer, module, param = m.groups()
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            h = config.hidden_size
            rows = fused_rows([("q_proj", h), ("k_proj", h), ("v_proj", h)], module.rsplit(".", 1)[1])
            module = "attn.c_attn"
        else:
            module = _LAYER[module]
        path = f"h.{layer}.{module}"
    stored_name = f"{path}.{param}"
    if stored is not None and stored_name not in stored and f"transformer.{stored_name}" in stored:
        stored_name = f"transformer.{stored_name}"
    return TensorRef(stored_name, rows, transposed=param == "weight" and path.endswith(_CONV1D))


gguf_tensor = gguf_from_hf(hf_tensor)


def from_gguf_layout(name, tensor, config, gguf_architecture):
    return tensor
