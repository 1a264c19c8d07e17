"""``load_tokenizer``: the SmolLM2 GGUF tokenizer converted by transformers, cached, and loaded back
from the cache behaving exactly like a fresh conversion; atomic entries, lost races, unwritable
caches, cache keys, and Hugging Face directories."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import tokenizers
from tokenizers.decoders import DecodeStream

from tensorpar.errors import CheckpointError
from tensorpar.loading import tokenizer_cache
from tensorpar.loading.gguf_file import GGUFFile
from tensorpar.loading.tokenizer_cache import cache_key, default_cache_dir, load_tokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Café, naïve, résumé; Ærøskøbing. Straße – “quotes” …",
    "emoji 🤗🚀👩‍👩‍👧 and ✓",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tprint({'a': [1, 2]})",
    "  leading and trailing spaces  ",
    "<|im_start|>user\nhi<|im_end|>",
]
CHAT = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4, of course."}]


def no_conversion(*args, **kwargs):
    raise AssertionError("the tokenizer was converted again instead of read from the cache")


@pytest.fixture(scope="module")
def fresh(smollm2_gguf, tmp_path_factory) -> SimpleNamespace:
    """A conversion with cache=False (and the cache directory it was given, which must stay empty)."""
    cache = tmp_path_factory.mktemp("unused-cache")
    return SimpleNamespace(tok=load_tokenizer(smollm2_gguf, cache=False, cache_dir=cache), cache=cache)


@pytest.fixture(scope="module")
def cached(smollm2_gguf, tmp_path_factory) -> SimpleNamespace:
    """The first load (converts and writes the entry) and the second (reads the entry)."""
    cache = tmp_path_factory.mktemp("cache")
    cold = load_tokenizer(smollm2_gguf, cache_dir=cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokenizer_cache, "_convert", no_conversion)
        warm = load_tokenizer(smollm2_gguf, cache_dir=cache)
    return SimpleNamespace(cold=cold, warm=warm, cache=cache)


def test_cache_false_converts_and_writes_nothing(fresh, smollm2_gguf):
    assert list(fresh.cache.iterdir()) == []
    assert len(fresh.tok) == len(GGUFFile(smollm2_gguf).metadata["tokenizer.ggml.tokens"]) == 49152


def test_first_load_writes_one_complete_entry(cached, smollm2_gguf):
    root = cached.cache / "tokenizers"
    key = cache_key(smollm2_gguf, GGUFFile(smollm2_gguf).header_sha256())
    assert len(key) == 32 and int(key, 16) >= 0
    assert list(root.iterdir()) == [root / key]  # no temporary directory left beside it
    assert (root / key / "tokenizer.json").is_file() and (root / key / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("which", ["cold", "warm"])
def test_cached_tokenizer_behaves_like_a_fresh_conversion(cached, fresh, smollm2_gguf, which):
    tok, ref = getattr(cached, which), fresh.tok
    assert type(tok) is type(ref)
    for text in TEXTS:
        ids = ref(text)["input_ids"]
        assert ids and tok(text)["input_ids"] == ids and tok.encode(text) == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids), text
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    chat = ref.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False) == chat
    assert chat[0] == 1 and ref.decode(chat).endswith("<|im_start|>assistant\n")
    assert tok.decode(chat, skip_special_tokens=True) == ref.decode(chat, skip_special_tokens=True)
    assert tok.decode(chat, skip_special_tokens=True) != tok.decode(chat)
    meta = GGUFFile(smollm2_gguf).metadata
    assert tok.eos_token_id == ref.eos_token_id == meta["tokenizer.ggml.eos_token_id"] == 2
    assert tok.bos_token_id == ref.bos_token_id == meta["tokenizer.ggml.bos_token_id"] == 1
    assert tok.pad_token_id == ref.pad_token_id and tok.all_special_ids == ref.all_special_ids
    assert len(tok) == len(ref) == 49152


def test_cached_tokenizer_streams_with_decode_stream(cached):
    tok = cached.warm
    backend = getattr(tok, "backend_tokenizer", None) or tok._tokenizer
    assert isinstance(backend, tokenizers.Tokenizer)
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=True, return_dict=False)
    ids += tok.encode(TEXTS[2] + TEXTS[1])
    stream = DecodeStream(skip_special_tokens=True)
    text = "".join(piece for i in ids if (piece := stream.step(backend, i)) is not None)
    assert text == tok.decode(ids, skip_special_tokens=True) and "🤗" in text


def test_directory_and_file_name_form(cached, smollm2_gguf, monkeypatch):
    monkeypatch.setattr(tokenizer_cache, "_convert", no_conversion)
    tok = load_tokenizer(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, cache_dir=cached.cache)
    assert tok.encode(TEXTS[0]) == cached.cold.encode(TEXTS[0])
    tok = load_tokenizer(smollm2_gguf, gguf_file=smollm2_gguf.name, cache_dir=cached.cache)
    assert tok.encode(TEXTS[3]) == cached.cold.encode(TEXTS[3])


def test_given_header_sha256_is_the_key(fresh, smollm2_gguf, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tokenizer_cache, "_convert", lambda path: calls.append(path) or fresh.tok)
    tok = load_tokenizer(smollm2_gguf, cache_dir=tmp_path, header_sha256="0" * 64)
    assert tok is fresh.tok and calls == [smollm2_gguf]
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == [cache_key(smollm2_gguf, "0" * 64)]


def test_unwritable_cache_falls_back_with_one_warning(fresh, smollm2_gguf, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(tokenizer_cache, "_convert", lambda path: fresh.tok)
    tok = load_tokenizer(smollm2_gguf, cache_dir=blocker / "cache", header_sha256="1" * 64)
    assert tok is fresh.tok
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tensorpar: warning: tokenizer cache") and str(blocker) in err
    assert blocker.read_text() == "not a directory"


def test_failed_save_leaves_no_entry(smollm2_gguf, tmp_path, monkeypatch, capsys):
    class DiskFull:
        def save_pretrained(self, directory: str) -> None:
            Path(directory, "tokenizer.json").write_text("{")  # half written
            raise OSError(errno.ENOSPC, "No space left on device")

    tok = DiskFull()
    monkeypatch.setattr(tokenizer_cache, "_convert", lambda path: tok)
    assert load_tokenizer(smollm2_gguf, cache_dir=tmp_path, header_sha256="2" * 64) is tok
    assert "No space left on device" in capsys.readouterr().err
    assert list((tmp_path / "tokenizers").iterdir()) == []


def test_lost_race_keeps_the_winners_entry(cached, fresh, smollm2_gguf, tmp_path, monkeypatch, capsys):
    key = cache_key(smollm2_gguf, "3" * 64)
    entry = tmp_path / "tokenizers" / key
    winner = next((cached.cache / "tokenizers").iterdir())

    def convert_while_another_process_wins(path):
        shutil.copytree(winner, entry)
        (entry / "winner").write_text("first")
        return fresh.tok

    monkeypatch.setattr(tokenizer_cache, "_convert", convert_while_another_process_wins)
    assert load_tokenizer(smollm2_gguf, cache_dir=tmp_path, header_sha256="3" * 64) is fresh.tok
    assert capsys.readouterr().err == ""
    assert list(entry.parent.iterdir()) == [entry] and (entry / "winner").read_text() == "first"
    monkeypatch.setattr(tokenizer_cache, "_convert", no_conversion)
    again = load_tokenizer(smollm2_gguf, cache_dir=tmp_path, header_sha256="3" * 64)
    assert again.encode(TEXTS[2]) == fresh.tok.encode(TEXTS[2])


def test_cache_key(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(100))
    key = cache_key(path, "a" * 64)
    assert len(key) == 32 and key == cache_key(path, "a" * 64)
    assert cache_key(path, "b" * 64) != key
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    touched = cache_key(path, "a" * 64)
    assert touched != key
    with open(path, "ab") as f:
        f.write(b"\0")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert cache_key(path, "a" * 64) not in (key, touched)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TENSORPAR_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("TENSORPAR_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "tensorpar"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "tensorpar"


def test_hugging_face_directory(fresh, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_cache, "_convert", no_conversion)
    with_tokenizer = tmp_path / "hf"
    fresh.tok.save_pretrained(with_tokenizer)
    (with_tokenizer / "config.json").write_text("{}")
    tok = load_tokenizer(with_tokenizer, cache_dir=tmp_path / "cache")
    assert tok.encode(TEXTS[1]) == fresh.tok.encode(TEXTS[1]) and len(tok) == len(fresh.tok)
    without = tmp_path / "bare"
    without.mkdir()
    (without / "config.json").write_text("{}")
    assert load_tokenizer(without, cache_dir=tmp_path / "cache") is None
    assert not (tmp_path / "cache").exists()


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_tokenizer(tmp_path / "absent.gguf")
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_tokenizer(tmp_path, gguf_file="absent.gguf")
