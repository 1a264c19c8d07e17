"""Where a model tensor is stored: in a safetensors checkpoint (the architecture module's
``hf_tensor``) and in a GGUF file (``gguf_tensor``, through the ``gguf`` package's own map from
Hugging Face names to llama.cpp's, so that no architecture writes that table again).

A model tensor's name is its parameter path, a fused linear split into its parts
(``model.layers.3.self_attn.q_proj.weight``). Most checkpoints store exactly those; some fuse
parts into one tensor (Phi-3's ``qkv_proj``, GPT-2's ``c_attn``: the part is a run of its rows)
or store a linear as [in, out] (GPT-2's ``Conv1D``).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class TensorRef:
    """Model tensor = rows ``rows`` (None: all) of stored tensor ``name``, read as [out, in];
    ``transposed``: the stored tensor is [in, out]."""

    name: str
    rows: range | None = None
    transposed: bool = False


def same_name(name: str, config, stored: Collection[str] | None = None) -> TensorRef:
    """The checkpoint stores the tensor under the model's own name."""
    return TensorRef(name)


def fused_rows(parts: list[tuple[str, int]], part: str) -> range:
    """The rows of ``part`` in a tensor that stacks ``parts`` [(name, rows)] in order."""
    start = 0
    for p, n in parts:
        if p == part:
            return range(start, start + n)
        start += n
    raise KeyError(part)


@lru_cache(maxsize=16)
def _gguf_map(gguf_architecture: str, num_layers: int):
    import gguf

    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[gguf_architecture]
    return gguf.get_tensor_name_map(arch, num_layers)


def gguf_name(hf_name: str, gguf_architecture: str, num_layers: int) -> str | None:
    """llama.cpp's name of Hugging Face tensor ``hf_name`` in a GGUF file of that architecture."""
    return _gguf_map(gguf_architecture, num_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))


def gguf_from_hf(hf_tensor):
    """``gguf_tensor(name, config, gguf_architecture)`` from an architecture's ``hf_tensor``: the
    same rows of the tensor llama.cpp's converter wrote for the Hugging Face one (which it stores
    as [out, in])."""

    def gguf_tensor(name: str, config, gguf_architecture: str) -> TensorRef | None:
        ref = hf_tensor(name, config, None)
        stored = gguf_name(ref.name, gguf_architecture, config.num_layers)
        return None if stored is None else TensorRef(stored, ref.rows)

    return gguf_tensor


_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def gguf_experts(gguf_tensor):
    """``gguf_tensor`` that also finds expert e's matrix in llama.cpp's stacked tensors
    ``blk.L.ffn_{gate,up,down}_exps`` ([experts, out, in]): rows e*out .. (e+1)*out of their 2-D view."""

    def find(name: str, config, gguf_architecture: str) -> TensorRef | None:
        m = _EXPERT.match(name)
        if m is None:
            return gguf_tensor(name, config, gguf_architecture)
        layer, expert, part = int(m[1]), int(m[2]), m[3]
        out = config.hidden_size if part == "down_proj" else config.moe_intermediate_size
        return TensorRef(f"blk.{layer}.{_STACKED[part]}.weight", range(expert * out, (expert + 1) * out))

    return find
