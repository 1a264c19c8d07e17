"""GGUF files (llama.cpp's format), read with the ``gguf`` package.

Tensor names are mapped to Hugging Face names. Quantized tensors are dequantized on load, and
only the blocks that hold the requested slice: a row slice cuts rows out of the memory map; a
column slice cuts the whole quantization blocks that cover it, then trims. llama.cpp permutes the
rows of Q and K within each head (to interleave rotary pairs); reading undoes it per head.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from tensorpar.errors import CheckpointError
from tensorpar.loading.sources import CheckpointSource
from tensorpar.models.config import ModelConfig

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for tensors the model does not use."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation for ``heads`` whole heads of rows (weight or bias)."""
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFSource(CheckpointSource):
    def __init__(self, path: Path):
        import gguf

        self.path = path
        self._gguf = gguf
        try:
            self._reader = gguf.GGUFReader(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable GGUF file (truncated?): {e}") from e
        self._tensors = {}
        for t in self._reader.tensors:
            name = hf_name(t.name)
            if name is not None:
                self._tensors[name] = t
        self.config = self._config()
        self._permuted = self._field("general.architecture") == "llama"

    def _field(self, key: str, default=None):
        f = self._reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def _config(self) -> ModelConfig:
        arch = self._field("general.architecture")
        if arch not in ("llama", "qwen2"):
            raise CheckpointError(f"{self.path}: unsupported GGUF architecture {arch!r} (supported: llama, qwen2)")
        if "rope_freqs.weight" in {t.name for t in self._reader.tensors}:
            raise CheckpointError(f"{self.path}: GGUF rope frequency factors (rope_freqs) are not supported yet")
        a = lambda k, d=None: self._field(f"{arch}.{k}", d)  # noqa: E731
        heads = int(a("attention.head_count"))
        hidden = int(a("embedding_length"))
        tokens = self._field("tokenizer.ggml.tokens")
        eos = self._field("tokenizer.ggml.eos_token_id")
        scaling = None
        if a("rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
        try:
            return ModelConfig(
                architecture=arch,
                vocab_size=int(a("vocab_size") or len(tokens)),
                hidden_size=hidden,
                intermediate_size=int(a("feed_forward_length")),
                num_layers=int(a("block_count")),
                num_heads=heads,
                num_kv_heads=int(a("attention.head_count_kv", heads)),
                head_dim=int(a("attention.key_length", hidden // heads)),
                rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
                rope_theta=float(a("rope.freq_base", 10000.0)),
                rope_scaling=scaling,
                max_position_embeddings=int(a("context_length", 4096)),
                tie_word_embeddings="lm_head.weight" not in self._tensors,
                qkv_bias="model.layers.0.self_attn.q_proj.bias" in self._tensors,
                o_bias="model.layers.0.self_attn.o_proj.bias" in self._tensors,
                bos_token_id=self._field("tokenizer.ggml.bos_token_id"),
                eos_token_ids=() if eos is None else (int(eos),),
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: incomplete GGUF metadata: {e}") from e

    def names(self) -> set[str]:
        return set(self._tensors)

    def file_of(self, name: str) -> str:
        return str(self.path)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[name].shape))  # GGUF lists dims fastest-first

    def _read(self, name, rows, cols) -> torch.Tensor:
        t = self._tensors[name]
        qtype = t.tensor_type
        data = t.data  # numpy memmap: [rows, cols] (or [rows, bytes] when quantized); 1-D for vectors
        if rows is not None:
            data = data[rows.start : rows.stop]
        block, block_bytes = self._gguf.GGML_QUANT_SIZES[qtype]
        quantized = qtype not in (self._gguf.GGMLQuantizationType.F32, self._gguf.GGMLQuantizationType.F16)
        trim = None
        if cols is not None:
            if quantized:
                b0, b1 = cols.start // block, -(-cols.stop // block)
                data = data[:, b0 * block_bytes : b1 * block_bytes]
                trim = slice(cols.start - b0 * block, cols.stop - b0 * block)
            else:
                data = data[:, cols.start : cols.stop]
        if quantized:
            data = self._gguf.quants.dequantize(np.ascontiguousarray(data), qtype)
            if trim is not None:
                data = data[:, trim]
        out = torch.from_numpy(np.array(data, dtype=np.float32))
        if self._permuted and (".q_proj." in name or ".k_proj." in name):
            out = unpermute_rows(out, out.shape[0] // self.config.head_dim)  # rows hold whole heads
        return out

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
