"""``tensorpar export``: a sharded training checkpoint -> a Hugging Face model directory.

Each full tensor is assembled from its pieces (``ShardedCheckpointSource``) and written, with the
Hugging Face names the engine loads by, to ``model.safetensors``; ``config.json`` and the
tokenizer come along, so ``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads it.
A LoRA run's checkpoint holds only adapters: ``merge_lora`` writes the model they were trained on
with them merged (``loading.lora_merge``).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm

from tensorpar.errors import TensorparError
from tensorpar.loading.tensorpar_checkpoint import ShardedCheckpointSource


def export_hf(checkpoint: str | Path, out: str | Path, progress: bool = False, merge_lora: bool = False) -> Path:
    """Write checkpoint ``checkpoint`` (a ``step-*`` directory or a run's root) to ``out``."""
    source = ShardedCheckpointSource(checkpoint)
    lora = source.meta.get("lora")
    if lora is not None and not merge_lora:
        raise TensorparError(f"{source.path} holds LoRA adapters only: --merge-lora writes {lora['base']} with them "
                             "merged (or serve them on it: --model BASE --lora-adapter CHECKPOINT)")
    if merge_lora:
        if lora is None:
            raise TensorparError(f"{source.path} is a whole-model checkpoint: it has no LoRA adapters to merge")
        from tensorpar.loading.lora_merge import LoraMergedSource
        from tensorpar.train.init import training_source

        source = LoraMergedSource(training_source(lora["base"], source.meta.get("seed", 0)), source.path)
    return write_hf(source, out, progress)


def write_hf(source, out: str | Path, progress: bool = False) -> Path:
    """Every tensor of checkpoint source ``source`` in full, with its config and tokenizer, as a
    Hugging Face directory ``out`` (new or empty)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise TensorparError(f"{out} exists and is not empty: choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(source.names())
    tensors = {n: source.read(n).contiguous() for n in tqdm(names, desc="exporting", disable=not progress)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(source.config.to_hf(), indent=2) + "\n")
    source.tokenizer().save_pretrained(str(out))
    return out
