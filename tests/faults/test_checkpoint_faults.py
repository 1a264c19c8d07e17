"""Broken checkpoints of every format ``generate`` reads: safetensors (one file and indexed),
GGUF and tensorpar training checkpoints, each truncated, with a corrupt header, or with a tensor of
the wrong shape. Each ends in one line naming the file (and the tensor, where one is at fault);
those found while opening the file end before any rank starts."""

from __future__ import annotations

import json
import shutil
import struct
import time

import pytest
from helpers import cli
from faultkit import error_line
from gguf_tiny import write_gguf
from safetensors.torch import load_file, save_file

WRONG = "model.layers.1.self_attn.k_proj.weight"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_safetensors_header(path):
    data = bytearray(path.read_bytes())
    data[8:24] = b"{" + b"x" * 15  # the JSON header, after its 8-byte length
    path.write_bytes(data)


def _reshape(path, name=WRONG):
    tensors = load_file(path)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def _index(model_dir):
    """Split model.safetensors in two files named by model.safetensors.index.json."""
    tensors = load_file(model_dir / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(model_dir / file), metadata={"format": "pt"})
    (model_dir / "model.safetensors").unlink()
    weight_map = {n: file for file, part in halves.items() for n in part}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model_dir / "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    corpus = root / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    r = cli("train", "--model", "random-llama-tiny", "--data", str(corpus), "--steps", "1", "--seq-len", "16",
            "--batch", "2", "--save", str(root / "ckpt"), "--out", str(root / "out"), "--quiet", timeout=150)
    assert r.returncode == 0, r.stderr
    return next((root / "ckpt").glob("step-*"))


def _case(kind, tiny_chat_checkpoint, training_checkpoint, tmp_path):
    """Build the broken checkpoint of ``kind`` ("FORMAT FAULT"): (the path to give --model, the
    file at fault, the tensor at fault or None, what the line must say)."""
    fmt, fault = kind.split(" ", 1)
    if fmt == "gguf":
        hf = shutil.copytree(tiny_chat_checkpoint, tmp_path / "hf")
        if fault == "wrong shape":
            _reshape(hf / "model.safetensors")
        model = file = write_gguf(hf, tmp_path / "model.gguf")
    elif fmt == "training-checkpoint":
        model = shutil.copytree(training_checkpoint, tmp_path / training_checkpoint.name)
        file = sorted(model.glob("*.safetensors"))[0]
    else:
        model = shutil.copytree(tiny_chat_checkpoint, tmp_path / "model")
        file = _index(model) if fmt == "safetensors-indexed" else model / "model.safetensors"
    if fault == "truncated":
        _truncate(file)
        return model, file, None, "truncated"
    if fault == "corrupt header" and fmt == "gguf":
        data = bytearray(file.read_bytes())
        data[8:16] = struct.pack("<Q", 10 ** 9)  # a tensor count no file holds
        file.write_bytes(data)
        return model, file, None, "corrupt GGUF header"
    if fault == "corrupt header":
        _corrupt_safetensors_header(file)
        return model, file, None, "corrupt header"
    if fmt != "gguf":
        _reshape(file)
    return model, file, "blk.1.attn_k.weight" if fmt == "gguf" else WRONG, "shape"


KINDS = ["safetensors truncated", "safetensors corrupt header", "safetensors wrong shape",
         "safetensors-indexed truncated", "safetensors-indexed wrong shape",
         "gguf truncated", "gguf corrupt header", "gguf wrong shape",
         "training-checkpoint truncated", "training-checkpoint corrupt header"]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind", KINDS)
def test_a_broken_checkpoint_is_one_line_naming_the_file(kind, tiny_chat_checkpoint, training_checkpoint, tmp_path,
                                                          record):
    model, file, tensor, says = _case(kind, tiny_chat_checkpoint, training_checkpoint, tmp_path)
    t = time.monotonic()
    r = cli("generate", "--model", str(model), "--tp", "2", "--prompt", "hi", "--max-new-tokens", "2", timeout=120)
    seconds = time.monotonic() - t
    line = error_line(r.stderr)
    assert r.returncode == 1 and file.name in line and says in line, line
    assert tensor is None or repr(tensor) in line, line
    assert " failed: " not in line and "loading weights" not in r.stderr  # refused while opening, before any rank
    record(fault=kind.replace("-indexed", " (indexed)").replace("-", " "), command="generate", layout="tp=2",
           sees=line.replace(f"{tmp_path}/", ""),
           seconds=round(seconds, 1), lost="nothing")
