"""Checkpoint sources (real SmolLM2 GGUF, tiny safetensors checkpoints), their error reporting,
and ``build_model`` against the transformers reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_CONFIGS, hf_reference
from safetensors.torch import load_file, save_file

from tensorpar.distributed.groups import single_process_context
from tensorpar.errors import CheckpointError
from tensorpar.loading import build_model, open_source, resolve_model
from tensorpar.loading.gguf_source import GGUFSource
from tensorpar.loading.safetensors_source import SafetensorsSource
from tensorpar.models.llama import gguf_tensor, unpermute_rows
from tensorpar.models.registry import checkpoint_shapes

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")  # checkpoints that store the model's own names
ALL_ARCHS = (*ARCHS, "phi3", "gpt2")

DOWN = "model.layers.0.mlp.down_proj.weight"
EMBED = "model.embed_tokens.weight"
Q, K, V = (f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv")


def exact(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_source(smollm2_gguf) -> GGUFSource:
    return GGUFSource(smollm2_gguf)


@pytest.fixture(scope="module")
def gguf_reference_state(smollm2_gguf) -> dict[str, torch.Tensor]:
    """transformers' own GGUF loading (dequantized, Q/K un-permuted), layer-0 and embedding only."""
    sd = hf_reference(smollm2_gguf).state_dict()
    keep = [k for k in sd if k.startswith("model.layers.0.") or k in (EMBED, "model.norm.weight")]
    return {k: sd[k].detach().clone() for k in keep}


@pytest.fixture(scope="module")
def full_down(gguf_source) -> torch.Tensor:
    return gguf_source.read(DOWN)


def test_gguf_config(gguf_source):
    c = gguf_source.config
    assert c.architecture == "llama"
    assert c.num_layers == 30
    assert c.num_heads == 9
    assert c.num_kv_heads == 3
    assert c.head_dim == 64
    assert c.hidden_size == 576
    assert c.intermediate_size == 1536
    assert c.vocab_size == 49152
    assert c.tie_word_embeddings is True
    assert not c.qkv_bias and not c.o_bias


def test_gguf_tensor_types_are_what_the_slice_tests_assume(gguf_source):
    import gguf

    types = {n: gguf_source.file.tensors[gguf_tensor(n, gguf_source.config, "llama").name].ggml_type
             for n in (DOWN, EMBED)}
    assert types[DOWN] == gguf.GGMLQuantizationType.Q4_1
    assert types[EMBED] == gguf.GGMLQuantizationType.Q8_0
    assert gguf_source.shape(DOWN) == (576, 1536)
    assert gguf_source.shape(EMBED) == (49152, 576)


def test_gguf_full_read_matches_gguf_dequantize(gguf_source, full_down):
    import gguf

    t = next(t for t in gguf.GGUFReader(str(gguf_source.path)).tensors if t.name == "blk.0.ffn_down.weight")
    ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    assert full_down.dtype == torch.float32 and full_down.shape == (576, 1536)
    exact(full_down, torch.from_numpy(np.array(ref, dtype=np.float32)))


@pytest.mark.parametrize(
    "rows, cols",
    [
        (None, range(37, 611)),  # block-unaligned on both ends (Q4_1 blocks of 32)
        (None, range(0, 32)),
        (None, range(31, 33)),
        (None, range(1500, 1536)),
        (range(5, 17), None),
        (range(3, 301), range(100, 101)),
        (range(575, 576), range(37, 611)),
    ],
)
def test_gguf_q4_1_slices_equal_the_full_tensor_slice(gguf_source, full_down, rows, cols):
    got = gguf_source.read(DOWN, rows=rows, cols=cols)
    want = full_down
    if rows is not None:
        want = want[rows.start : rows.stop]
    if cols is not None:
        want = want[:, cols.start : cols.stop]
    assert got.shape == want.shape
    exact(got, want)


def test_gguf_q8_0_embedding_slices(gguf_source, gguf_reference_state):
    full = gguf_reference_state[EMBED]
    for rows, cols in [(range(1001, 1013), None), (range(49140, 49152), range(5, 70)), (range(0, 3), range(33, 575))]:
        got = gguf_source.read(EMBED, rows=rows, cols=cols)
        want = full[rows.start : rows.stop]
        if cols is not None:
            want = want[:, cols.start : cols.stop]
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", [Q, K, V, DOWN, "model.layers.0.self_attn.o_proj.weight",
                                  "model.layers.0.input_layernorm.weight", "model.norm.weight"])
def test_gguf_reads_equal_transformers(gguf_source, gguf_reference_state, name):
    got = gguf_source.read(name)
    want = gguf_reference_state[name]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name, heads", [(Q, range(2, 5)), (Q, range(8, 9)), (K, range(1, 2)), (K, range(1, 3))])
def test_gguf_head_aligned_row_slices_equal_transformers(gguf_source, gguf_reference_state, name, heads):
    d = gguf_source.config.head_dim
    rows = range(heads.start * d, heads.stop * d)
    got = gguf_source.read(name, rows=rows)
    torch.testing.assert_close(got, gguf_reference_state[name][rows.start : rows.stop])


def test_gguf_expected_shapes_match_the_file(gguf_source):
    shapes = checkpoint_shapes(gguf_source.config)
    assert "lm_head.weight" not in shapes  # tied
    assert set(shapes) == gguf_source.names()
    for name, shape in shapes.items():
        assert gguf_source.shape(name) == shape, name


def test_gguf_name_mapping_and_unpermute(gguf_source):
    where = lambda name: gguf_tensor(name, gguf_source.config, "llama").name  # noqa: E731
    assert where(EMBED) == "token_embd.weight"
    assert where("model.layers.12.self_attn.q_proj.weight") == "blk.12.attn_q.weight"
    assert where("model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"
    assert where("lm_head.weight") == "output.weight"
    # unpermute_rows inverts llama.cpp's permute (reshape(h, 2, d/2).swapaxes(1, 2)).
    heads, d, cols = 3, 8, 5
    w = torch.randn(heads * d, cols)
    permuted = w.reshape(heads, 2, d // 2, cols).transpose(1, 2).reshape(heads * d, cols)
    exact(unpermute_rows(permuted, heads), w)
    b = torch.randn(heads * d)
    exact(unpermute_rows(b.reshape(heads, 2, d // 2).transpose(1, 2).reshape(-1), heads), b)


def test_gguf_truncated_file(tmp_path, smollm2_gguf):
    path = tmp_path / "cut-smollm2.gguf"
    with open(smollm2_gguf, "rb") as f:
        path.write_bytes(f.read(1 << 20))
    with pytest.raises(CheckpointError, match="cut-smollm2.gguf") as e:
        open_source(str(path))  # resolve_model accepts it; GGUFSource must reject it
    assert "truncated" in str(e.value)


# ---------------------------------------------------------------- safetensors


@pytest.fixture(scope="module")
def st_sources(tiny_checkpoints):
    return {arch: SafetensorsSource(tiny_checkpoints[arch]) for arch in ARCHS}


def load_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_safetensors_slices_equal_load_file(arch, tiny_checkpoints, st_sources):
    src, full = st_sources[arch], load_all(tiny_checkpoints[arch])
    assert src.names() == set(full)
    for name, t in full.items():
        assert src.shape(name) == tuple(t.shape)
        exact(src.read(name), t)
        if t.dim() == 2:
            n, m = t.shape
            exact(src.read(name, rows=range(1, n - 2)), t[1 : n - 2])
            exact(src.read(name, cols=range(3, m - 1)), t[:, 3 : m - 1])
            exact(src.read(name, rows=range(n // 3, n // 2), cols=range(m // 4, m // 2 + 1)),
                  t[n // 3 : n // 2, m // 4 : m // 2 + 1])
        else:
            exact(src.read(name, rows=range(2, 7)), t[2:7])


@pytest.mark.parametrize("arch", ARCHS)
def test_safetensors_expected_shapes_match(arch, st_sources):
    src = st_sources[arch]
    shapes = checkpoint_shapes(src.config)
    assert set(shapes) <= src.names()
    tied = src.config.tie_word_embeddings
    assert tied == TINY_CONFIGS[arch].get("tie_word_embeddings", arch == "gemma3")
    assert ("lm_head.weight" in shapes) == (not tied)
    assert set(shapes) == src.names() - ({"lm_head.weight"} if tied else set())
    for name, shape in shapes.items():
        assert src.shape(name) == shape, name


def test_fused_and_transposed_checkpoint_tensors_read_as_the_model_names_them(tiny_checkpoints):
    """Phi-3 stores q/k/v in qkv_proj and gate/up in gate_up_proj; GPT-2 stores Conv1D weights
    [in, out] and q/k/v in c_attn. Slices of the model's tensors are slices of those."""
    phi = SafetensorsSource(tiny_checkpoints["phi3"])
    full = load_all(tiny_checkpoints["phi3"])
    qkv = full["model.layers.1.self_attn.qkv_proj.weight"]  # [(6 + 2 + 2) * 8, 48]
    exact(phi.read("model.layers.1.self_attn.k_proj.weight"), qkv[48:64])
    exact(phi.read("model.layers.1.self_attn.v_proj.weight", rows=range(3, 9), cols=range(5, 40)), qkv[67:73, 5:40])
    assert phi.shape("model.layers.1.self_attn.q_proj.weight") == (48, 48)
    up = full["model.layers.0.mlp.gate_up_proj.weight"][80:]
    exact(phi.read("model.layers.0.mlp.up_proj.weight", rows=range(10, 20)), up[10:20])
    assert "model.layers.0.mlp.gate_up_proj.weight" not in phi.names()

    gpt = SafetensorsSource(tiny_checkpoints["gpt2"])
    full = load_all(tiny_checkpoints["gpt2"])
    prefix = "transformer." if "transformer.wte.weight" in full else ""
    c_attn = full[f"{prefix}h.0.attn.c_attn.weight"]  # [36, 3 * 36], Conv1D: [in, out]
    exact(gpt.read("model.layers.0.self_attn.v_proj.weight"), c_attn[:, 72:].T)
    exact(gpt.read("model.layers.0.self_attn.q_proj.weight", rows=range(6, 18), cols=range(1, 30)),
          c_attn[1:30, 6:18].T)
    exact(gpt.read("model.layers.0.self_attn.k_proj.bias"), full[f"{prefix}h.0.attn.c_attn.bias"][36:72])
    fc = full[f"{prefix}h.1.mlp.c_fc.weight"]  # [36, 144]
    assert gpt.shape("model.layers.1.mlp.up_proj.weight") == (144, 36)
    exact(gpt.read("model.layers.1.mlp.up_proj.weight", rows=range(100, 144)), fc[:, 100:].T)
    exact(gpt.read("model.embed_positions.weight"), full[f"{prefix}wpe.weight"])


def test_generation_config_eos_ids_and_sampling_defaults(tiny_checkpoints, tmp_path):
    path = tmp_path / "llama"
    shutil.copytree(tiny_checkpoints["llama"], path)
    (path / "config.json").write_text(json.dumps({**TINY_CONFIGS["llama"], "eos_token_id": 3}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 128001, 128009], "do_sample": True,
                                                             "temperature": 0.6, "top_p": 0.9}))
    src = SafetensorsSource(path)
    assert src.config.eos_token_ids == (3, 128001, 128009)
    assert src.sampling_defaults == {"temperature": 0.6, "top_p": 0.9}
    assert SafetensorsSource(tiny_checkpoints["llama"]).sampling_defaults == {}


def test_sharded_checkpoint_reads_from_several_files(tiny_checkpoints, st_sources):
    path, src = tiny_checkpoints["qwen2"], st_sources["qwen2"]
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    files = {src.file_of(n) for n in src.names()}
    assert len(files) > 1
    assert files == {str(path / f) for f in index.values()}
    by_file: dict[str, str] = {}
    for name, f in index.items():
        by_file.setdefault(f, name)
    assert len(by_file) > 1
    for f, name in by_file.items():
        exact(src.read(name), load_file(str(path / f))[name])


# ---------------------------------------------------------------- errors


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor(tmp_path, tiny_checkpoints):
    path = copy_checkpoint(tiny_checkpoints["llama"], tmp_path / "llama")
    missing = "model.layers.1.mlp.up_proj.weight"
    tensors = load_file(str(path / "model.safetensors"))
    del tensors[missing]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    src = SafetensorsSource(path)
    with pytest.raises(CheckpointError, match=missing) as e:
        build_model(src, single_process_context())
    assert "missing" in str(e.value) and str(path) in str(e.value)
    with pytest.raises(CheckpointError, match=missing):
        src.read(missing)


def test_truncated_safetensors(tmp_path, tiny_checkpoints):
    path = copy_checkpoint(tiny_checkpoints["llama"], tmp_path / "llama")
    f = path / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        build_model(open_source(str(path)), single_process_context())


def test_truncated_shard_of_an_index(tmp_path, tiny_checkpoints):
    path = copy_checkpoint(tiny_checkpoints["qwen2"], tmp_path / "qwen2")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=shard.name):
        build_model(SafetensorsSource(path), single_process_context())


def test_index_naming_a_missing_file(tmp_path, tiny_checkpoints):
    path = copy_checkpoint(tiny_checkpoints["qwen2"], tmp_path / "qwen2")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        build_model(SafetensorsSource(path), single_process_context())


def test_shape_mismatch(tmp_path, tiny_checkpoints):
    path = copy_checkpoint(tiny_checkpoints["llama"], tmp_path / "llama")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["intermediate_size"] == 88
    cfg["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    src = SafetensorsSource(path)
    with pytest.raises(CheckpointError) as e:
        build_model(src, single_process_context())
    msg = str(e.value)
    assert "model.safetensors" in msg
    assert "mlp.gate_proj.weight" in msg or "mlp.up_proj.weight" in msg or "mlp.down_proj.weight" in msg
    assert "[88, 48]" in msg and "[96, 48]" in msg


def test_directory_without_config(tmp_path, tiny_checkpoints):
    path = tmp_path / "no-config"
    path.mkdir()
    shutil.copy(tiny_checkpoints["llama"] / "model.safetensors", path)
    with pytest.raises(CheckpointError, match="config.json") as e:
        resolve_model(str(path))
    assert "no-config" in str(e.value)
    with pytest.raises(CheckpointError, match="config.json"):
        SafetensorsSource(path)


def test_directory_without_weights(tmp_path, tiny_checkpoints):
    path = tmp_path / "no-weights"
    path.mkdir()
    shutil.copy(tiny_checkpoints["llama"] / "config.json", path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_source(str(path))


def test_unsupported_model_type_in_config(tmp_path, tiny_checkpoints):
    path = copy_checkpoint(tiny_checkpoints["llama"], tmp_path / "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gpt2") as e:
        SafetensorsSource(path)
    assert "config.json" in str(e.value)


def test_unknown_alias_and_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match="no-such-model-7b") as e:
        resolve_model("no-such-model-7b")
    assert "smollm2-135m" in str(e.value)  # names the known aliases
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(CheckpointError, match="nowhere"):
        resolve_model(str(missing))
    with pytest.raises(CheckpointError, match="nowhere"):
        open_source(str(missing))


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="weights.bin") as e:
        resolve_model(str(f))
    assert ".gguf" in str(e.value)


def test_alias_resolves_to_the_packaged_gguf(smollm2_gguf):
    p = resolve_model("smollm2-135m")
    assert p == smollm2_gguf and p.suffix == ".gguf" and p.is_file()


# ---------------------------------------------------------------- build_model vs transformers


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_build_model_matches_transformers(arch, tiny_checkpoints):
    path = tiny_checkpoints[arch]
    model = build_model(open_source(str(path)), single_process_context())
    assert not any(p.requires_grad for p in model.parameters())
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    ref = hf_reference(path)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY_CONFIGS[arch]["vocab_size"], (2, 13), generator=g)  # > sliding window 8
    with torch.no_grad():
        got = model.logits(model(ids))
        want = ref(ids).logits
    assert got.shape == want.shape == (2, 13, TINY_CONFIGS[arch]["vocab_size"])
    err = (got - want).abs().max() / want.abs().max()
    assert err < 1e-4, f"relative error {err:.2e}"
    # Parameters equal the checkpoint exactly (fused parts included).
    full = load_all(path)
    if arch not in ARCHS:
        return
    layer = model.model.layers[0]
    q, k, v = (full[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    exact(layer.self_attn.qkv_proj.weight, torch.cat([q, k, v]))
    exact(layer.mlp.gate_up_proj.weight,
          torch.cat([full["model.layers.0.mlp.gate_proj.weight"], full["model.layers.0.mlp.up_proj.weight"]]))
