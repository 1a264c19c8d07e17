"""Hugging Face directories: ``config.json`` plus ``model.safetensors`` or a sharded index."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open

from tensorpar.errors import CheckpointError
from tensorpar.loading.sources import StoredTensorsSource, generation_defaults, read_json, safetensors_trouble
from tensorpar.models.config import ModelConfig
from tensorpar.models.registry import model_module


class SafetensorsSource(StoredTensorsSource):
    def __init__(self, path: Path):
        self.path = path
        try:
            config = ModelConfig.from_hf(read_json(path / "config.json"))
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path / 'config.json'}: {e}") from e
        generation = path / "generation_config.json"
        if generation.exists():  # its EOS ids join the config's (Llama 3 lists several there)
            gen = read_json(generation)
            eos = gen.get("eos_token_id")
            eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
            config = replace(config, eos_token_ids=tuple(dict.fromkeys([*config.eos_token_ids, *eos])))
            self.sampling_defaults = generation_defaults(gen)
        self.config = config
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.exists():
            self._files = {k: path / v for k, v in read_json(index)["weight_map"].items()}
        elif single.exists():
            self._files = {k: single for k in self._handle(single).keys()}
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")

    def _handle(self, file: Path):
        handles = self.__dict__.setdefault("_handles", {})  # reopened after unpickling
        if file not in handles:
            if not file.exists():
                raise CheckpointError(f"{file}: checkpoint file is missing (named by the index)")
            try:
                handles[file] = safe_open(str(file), framework="pt")
            except Exception as e:
                raise CheckpointError(f"{file}: not a readable safetensors file ({safetensors_trouble(e)}): {e}") from e
        return handles[file]

    def _open_files(self) -> None:
        for file in dict.fromkeys(self._files.values()):
            self._handle(file)

    def _stored_names(self):
        return self._files.keys()

    def _locate(self, name: str):
        return model_module(self.config).hf_tensor(name, self.config, self._files)

    def file_of(self, name: str) -> str:
        ref = self._refs.get(name)
        return str(self._files.get(ref.name, self.path) if ref else self.path)

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._files[name]).get_slice(name).get_shape())

    def _read_stored(self, name, rows, cols) -> torch.Tensor:
        sl = self._handle(self._files[name]).get_slice(name)
        r = slice(None) if rows is None else slice(rows.start, rows.stop)
        if cols is None:
            return sl[r]
        return sl[r, cols.start : cols.stop]

    def tokenizer(self, cache: bool = True):
        from tensorpar.loading.tokenizer_cache import load_tokenizer

        return load_tokenizer(self.path, cache=cache)
