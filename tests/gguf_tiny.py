"""Write a tiny Hugging Face checkpoint as a GGUF file the way llama.cpp's converter does (names
from the ``gguf`` package's own map; Q/K rows permuted for ``llama``; Conv1D weights transposed
for ``gpt2``; Gemma's norms stored as 1 + w; Llama 3's RoPE scaling as a ``rope_freqs`` tensor of
per-frequency divisors). No tokenizer: models read from it take token ids."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3",
             "gpt2": "gpt2", "mixtral": "llama", "qwen3_moe": "qwen3moe"}
EXPERT_PARTS = {"mixtral": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}),
                "qwen3_moe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})}


def llama3_rope_factors(cfg: dict) -> list[float]:
    """llama.cpp's ``rope_freqs``: 1 for high frequencies, ``factor`` for low ones, a smooth ramp between."""
    rope = cfg.get("rope_parameters") or cfg["rope_scaling"]
    base, d = rope.get("rope_theta", cfg.get("rope_theta", 10000.0)), cfg.get("head_dim")
    d = d or cfg["hidden_size"] // cfg["num_attention_heads"]
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)):
        wavelen = 2 * math.pi / float(freq)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir: Path, out: Path, raw_types: dict | None = None) -> Path:
    """``raw_types``: GGUF tensor name -> ggml type written instead, as zero bytes of that type."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = GGUF_ARCH[cfg["model_type"]]
    state: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    gpt2 = arch == "gpt2"
    hidden = cfg["n_embd"] if gpt2 else cfg["hidden_size"]
    layers = cfg["n_layer"] if gpt2 else cfg["num_hidden_layers"]
    heads = cfg["n_head"] if gpt2 else cfg["num_attention_heads"]
    kv = heads if gpt2 else cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    w = gguf.GGUFWriter(str(out), arch)
    u32 = lambda k, v: w.add_uint32(f"{arch}.{k}", int(v))  # noqa: E731
    u32("context_length", cfg.get("n_positions") or cfg["max_position_embeddings"])
    u32("embedding_length", hidden)
    u32("block_count", layers)
    u32("feed_forward_length", cfg.get("n_inner") or 4 * hidden if gpt2 else cfg["intermediate_size"])
    u32("attention.head_count", heads)
    u32("attention.head_count_kv", kv)
    u32("attention.key_length", head_dim)
    u32("attention.value_length", head_dim)
    u32("vocab_size", cfg["vocab_size"])
    if gpt2:
        w.add_float32(f"{arch}.attention.layer_norm_epsilon", cfg.get("layer_norm_epsilon", 1e-5))
    else:
        w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.get("rms_norm_eps", 1e-6))
        rope = cfg.get("rope_parameters") or {}
        rope = rope.get("full_attention", rope)
        w.add_float32(f"{arch}.rope.freq_base", rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if arch == "gemma3":
        u32("attention.sliding_window", cfg["sliding_window"])
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if experts:  # llama.cpp stacks each layer's experts: ffn_{gate,up,down}_exps [experts, out, in]
        u32("expert_count", experts)
        u32("expert_used_count", cfg["num_experts_per_tok"])
        if cfg.get("moe_intermediate_size"):
            u32("expert_feed_forward_length", cfg["moe_intermediate_size"])
        block, parts = EXPERT_PARTS[cfg["model_type"]]
        for layer in range(layers):
            for kind, part in parts.items():
                stacked = torch.stack([state[f"model.layers.{layer}.{block}.experts.{e}.{part}.weight"]
                                       for e in range(experts)])
                w.add_tensor(f"blk.{layer}.ffn_{kind}_exps.weight", np.ascontiguousarray(stacked.float().numpy()))
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], layers)
    for name, t in state.items():
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            continue
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            t = _permute(t, heads if "q_proj" in name else kv)
        if gpt2 and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.T
        if arch == "gemma3" and name.endswith("norm.weight"):
            t = t + 1
        if raw_types and new in raw_types:
            block, nbytes = gguf.GGML_QUANT_SIZES[raw_types[new]]
            w.add_tensor(new, np.zeros(t.numel() // block * nbytes, dtype=np.uint8), raw_shape=tuple(t.shape),
                         raw_dtype=raw_types[new])
            continue
        w.add_tensor(new, np.ascontiguousarray(t.float().numpy()))
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", np.array(llama3_rope_factors(cfg), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
