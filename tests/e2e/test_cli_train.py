"""``tensorpar train`` and ``tensorpar export`` as a user runs them: a TP=2 run saves a checkpoint,
a TP=3 run resumes it (reporting only the new steps), torchrun's two pipeline stages give the
losses of the spawned TP=2 run, the export loads with transformers, and bad input gets one clear line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import cli

from tensorpar.distributed.host import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

TEXT = ("Tensor parallelism splits each weight matrix across devices. " * 4
        + "The quick brown fox jumps over the lazy dog. " * 3) * 40
COMMON = ["--model", "random-llama-tiny", "--seq-len", "32", "--batch", "4", "--lr", "3e-3", "--seed", "7"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def first_run(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    r = cli("train", "--data", str(corpus), "--tp", "2", "--steps", "6", "--save", str(root / "ckpt"),
            "--out", str(root / "out"), "--json", *COMMON)
    assert r.returncode == 0, r.stderr
    return root, json.loads(r.stdout)


def test_train_json_loss_curve_and_checkpoint(first_run):
    root, out = first_run
    assert out["steps"] == [1, 2, 3, 4, 5, 6] and len(out["losses"]) == 6
    assert out["losses"][-1] < out["losses"][0]
    assert out["tokens_per_s"] > 0 and len(out["peak_rss_mb"]) == 2
    assert out["checkpoint"].endswith("ckpt/step-00000006")
    assert (root / "out" / "losses.png").stat().st_size > 1000
    assert json.loads((root / "out" / "losses.json").read_text())["losses"] == out["losses"]


def test_resume_at_tp3_runs_the_remaining_steps(first_run, corpus, tmp_path):
    root, _ = first_run
    r = cli("train", "--data", str(corpus), "--tp", "3", "--steps", "9", "--resume", str(root / "ckpt"),
            "--out", str(tmp_path), "--json", *COMMON)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["steps"] == [7, 8, 9] and len(out["losses"]) == 3 and len(out["peak_rss_mb"]) == 3


def test_torchrun_matches_spawned_ranks(first_run, corpus, tmp_path):
    _, spawned = first_run
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         "-m", "tensorpar", "train", "--data", str(corpus), "--tp", "1", "--pp", "2", "--steps", "6", "--json",
         "--out", str(tmp_path), *COMMON],
        capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)  # only rank 0 prints
    assert (out["tp"], out["pp"]) == (1, 2)
    assert out["losses"] == pytest.approx(spawned["losses"], rel=1e-5)


def test_export_then_generate_and_generate_from_the_checkpoint(first_run, tmp_path):
    root, _ = first_run
    r = cli("export", str(root / "ckpt"), "--hf", str(tmp_path / "hf"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    g = cli("generate", "--model", str(tmp_path / "hf"), "--tp", "2", "--prompt", "The quick brown",
            "--max-new-tokens", "4", "--json", "--ignore-eos")
    assert g.returncode == 0, g.stderr
    exported = json.loads(g.stdout)["token_ids"]
    assert len(exported) == 4
    # the checkpoint itself generates, at another degree, the same tokens as its export
    direct = cli("generate", "--model", str(root / "ckpt"), "--tp", "3", "--prompt", "The quick brown",
                 "--max-new-tokens", "4", "--json", "--ignore-eos")
    assert direct.returncode == 0, direct.stderr
    assert json.loads(direct.stdout)["tp"] == 3 and json.loads(direct.stdout)["token_ids"] == exported
    again = cli("export", str(root / "ckpt"), "--hf", str(tmp_path / "hf"), "--quiet")
    assert again.returncode == 1 and "exists and is not empty" in again.stderr
    merge = cli("export", str(root / "ckpt"), "--hf", str(tmp_path / "merged"), "--merge-lora", "--quiet")
    assert merge.returncode == 1 and "has no LoRA adapters to merge" in merge.stderr


def test_chat_jsonl_with_a_schedule_clipping_and_accumulation(tmp_path):
    """A chat JSONL file (the loss on the assistant's turns: ``tests/unit/test_train_data.py``) at
    tp=2, with a cosine schedule after a warm-up, clipping and two micro-batches a step."""
    data = tmp_path / "chat.jsonl"
    chat = [{"role": "user", "content": "What is tensor parallelism?"},
            {"role": "assistant", "content": "Splitting each weight matrix across devices."}]
    data.write_text("\n".join(json.dumps({"messages": chat}) for _ in range(4)) + "\n")
    r = cli("train", "--data", str(data), "--tp", "2", "--steps", "4", "--lr-schedule", "cosine", "--warmup-steps",
            "1", "--clip-grad-norm", "1.0", "--grad-accum", "2", "--out", str(tmp_path / "out"), "--json",
            *[a if a != "32" else "48" for a in COMMON])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["lrs"][0] == pytest.approx(3e-3) and out["lrs"][-1] == pytest.approx(0.0)
    assert out["losses"][-1] < out["losses"][0] and all(n > 0 for n in out["grad_norms"])


@pytest.mark.parametrize("args,message", [
    (["--tp", "7"], "tensor-parallel degree 7 is not valid for a model with 6 query heads"),
    (["--dp", "3"], "--batch 4 must be a multiple of --dp 3"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--grad-accum", "3"], "--batch 4 must split into --dp 1 replicas of --grad-accum 3 equal micro-batches"),
    (["--lr-schedule", "cosine", "--min-lr", "1"], "--min-lr from 0 to --lr"),
    (["--clip-grad-norm", "0"], "--clip-grad-norm must be positive"),
    (["--dtype", "fp8"], "unknown training --dtype 'fp8'; choose one of: fp32"),
    (["--resume", "/nonexistent/run"], "no checkpoint at '/nonexistent/run'"),
    (["--pp", "3", "--batch", "6"], "--pp 3 is more pipeline stages than the model's 2 layers"),
    (["--pp", "3"], "replicas of --grad-accum 3 equal micro-batches (--grad-accum defaults to --pp)"),
    (["--pp", "2", "--grad-accum", "1"], "a pipeline of 2 stages needs at least 2 micro-batches"),
    (["--pack"], "--pack packs the examples of a JSONL file"),
    (["--lora-rank", "4", "--lora-targets", "q,x"], "--lora-targets: x; choose from q,k,v,o,gate,up,down"),
])
def test_bad_input_gets_one_clear_line(corpus, args, message):
    r = cli("train", "--data", str(corpus), "--quiet", *COMMON, *args)
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr


def test_a_run_keeps_its_seed_and_its_directory(first_run, corpus):
    root, _ = first_run
    base = [a for a in COMMON if a not in ("--seed", "7")]
    other_seed = cli("train", "--data", str(corpus), "--steps", "9", "--resume", str(root / "ckpt"), "--seed", "8",
                     "--quiet", *base)
    assert other_seed.returncode == 1 and "trained with --seed 7" in other_seed.stderr
    into_old = cli("train", "--data", str(corpus), "--steps", "2", "--save", str(root / "ckpt"), "--quiet", *COMMON)
    assert into_old.returncode == 1 and "already holds checkpoints of another run" in into_old.stderr


def test_architectures_outside_the_llama_family_are_refused_before_launch(corpus, tiny_checkpoints):
    r = cli("train", "--data", str(corpus), "--model", str(tiny_checkpoints["gemma3"]), "--tp", "2", "--steps", "1",
            "--quiet")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "training runs the Llama family (llama, mistral, qwen2); gemma3_text models run in" in r.stderr
