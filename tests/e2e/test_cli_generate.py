"""``tensorpar generate`` driven as a user would, on a tiny Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import json

import pytest
from helpers import cli


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_checkpoint)


@pytest.mark.timeout(120)
def test_chat_json_on_hf_directory_at_tp2(tiny_chat_checkpoint, tokenizer):
    r = cli("generate", "--model", str(tiny_chat_checkpoint), "--tp", "2", "--chat", "--json",
            "--max-new-tokens", "8", "--prompt", "Explain tensor parallelism")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    want = tokenizer.apply_chat_template([{"role": "user", "content": "Explain tensor parallelism"}],
                                         add_generation_prompt=True, tokenize=True, return_dict=False)
    assert out["prompt_token_ids"] == list(want)
    assert out["tp"] == 2 and out["backend"] == "shm+gloo" and out["dtype"] == "float32"
    assert 1 <= len(out["token_ids"]) <= 8
    assert out["text"] == tokenizer.decode(out["token_ids"], skip_special_tokens=True)
    assert set(out["timings"]) >= {"load_s", "prefill_s", "decode_s_per_token"}
    assert all(v >= 0 for v in out["timings"].values())
    assert len(out["peak_rss_mb"]) == 2 and all(m > 50 for m in out["peak_rss_mb"])


@pytest.mark.timeout(120)
def test_plain_prompt_uses_default_tokenization_and_readable_output(tiny_chat_checkpoint, tokenizer):
    r = cli("generate", "--model", str(tiny_chat_checkpoint), "--json", "--max-new-tokens", "4",
            "--prompt", "The capital of France is")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt_token_ids"] == tokenizer("The capital of France is")["input_ids"]
    r = cli("generate", "--model", str(tiny_chat_checkpoint), "--max-new-tokens", "4", "--quiet",
            "--prompt", "The capital of France is", "--prompt", "Hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is")
    assert "\nHello" in r.stdout
    assert "tp=1" in r.stderr and "ms/token" in r.stderr


@pytest.mark.timeout(120)
def test_stop_string_truncates_and_reports_stop(tiny_chat_checkpoint):
    base = ["generate", "--model", str(tiny_chat_checkpoint), "--json", "--ignore-eos",
            "--max-new-tokens", "12", "--prompt", "Once upon a time"]
    full = json.loads(cli(*base).stdout)
    assert full["finish_reason"] == "length" and len(full["token_ids"]) == 12
    text = full["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop and stop.strip()
    cut = json.loads(cli(*base, "--stop", stop).stdout)
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == text[: text.find(stop)]
    assert cut["token_ids"] == full["token_ids"][: len(cut["token_ids"])]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,needle", [
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
])
def test_bad_sampling_arguments_get_one_clear_line(args, needle, tiny_chat_checkpoint):
    r = cli("generate", "--model", str(tiny_chat_checkpoint), "--prompt", "hi", *args)
    assert r.returncode == 1
    assert needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.timeout(60)
def test_usage_and_version():
    r = cli()
    assert r.returncode == 2 and "usage: tensorpar" in r.stderr
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("tensorpar ")
    r = cli("generate", "--help")
    assert r.returncode == 0 and "--tp" in r.stdout and "--json" in r.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["generate", "serve", "bench"])
def test_an_fp8_checkpoint_is_refused_before_any_rank_starts(command, tiny_checkpoints, tmp_path):
    """A config.json with a quantization_config: one line naming the method, from the launching
    process (``EngineArgs.resolve`` opens the model before ``launch``), never weights loaded as plain."""
    import json
    import shutil

    from tensorpar.errors import CheckpointError
    from tensorpar.runtime.spec import EngineArgs

    path = tmp_path / "fp8"
    shutil.copytree(tiny_checkpoints["llama"], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantized checkpoints \\(fp8, from quantization_config\\) are not supported"):
        EngineArgs(model=str(path), tp=2).resolve()
    args = {"generate": ["--prompt", "hi"], "serve": ["--port", "0"], "bench": ["--quick", "--no-peers"]}[command]
    r = cli(command, "--model", str(path), "--tp", "2", *args)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "fp8, from quantization_config) are not supported yet" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
