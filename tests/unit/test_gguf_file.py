"""``GGUFFile`` against ``gguf.GGUFReader``: metadata, tensor index and dequantized slices of the
real SmolLM2 GGUF (and Gemma 3 270M Q4_K_M when installed), of a file written by
``gguf.GGUFWriter`` that holds every value type and every quant type gguf can dequantize, pickling,
and the errors of broken files."""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from tensorpar.errors import CheckpointError
from tensorpar.loading.gguf_file import SHORT_ARRAY, GGUFFile, SkippedArray, TensorInfo

Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType
QUANT_NAMES = (
    "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS",
    "TQ1_0", "TQ2_0", "MXFP4", "NVFP4",
)
QUANTS = [getattr(Q, n) for n in QUANT_NAMES if hasattr(Q, n)]
COLS = 768  # whole blocks of every type above (block sizes 1, 32, 64, 256)


def reference(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    """GGUFReader's tensor ``name``, fully dequantized, in row-major shape."""
    t = next(t for t in reader.tensors if t.name == name)
    shape = tuple(int(n) for n in reversed(t.shape))
    if t.tensor_type == Q.F64:
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    return dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)


def spans(n: int, block: int) -> list[range]:
    """Column spans of a row of ``n`` values: block-aligned, and starting and ending inside blocks."""
    out = [range(0, n), range(5, n - 7), range(n - 1, n), range(3, 3)]
    if n >= 3 * block:
        out += [range(block, 3 * block), range(block + 3, 2 * block + 9), range(block + 1, block + 2)]
    return out


def check_reads(f: GGUFFile, reader: gguf.GGUFReader, name: str) -> None:
    full = reference(reader, name)
    whole = f.read(name)
    assert whole.dtype == np.float32 and whole.shape == full.shape and np.array_equal(whole, full), name
    if full.ndim == 1:
        for rows in (range(0, len(full)), range(1, len(full) - 2), range(len(full) - 1, len(full)), range(4, 4)):
            assert np.array_equal(f.read(name, rows), full[rows.start : rows.stop]), (name, rows)
        return
    n_rows, n_cols = full.shape
    block = gguf.GGML_QUANT_SIZES[Q(f.tensors[name].ggml_type)][0]
    row_spans = [None, range(1, min(n_rows, 5)), range(n_rows - 1, n_rows), range(2, 2)]
    for rows in row_spans:
        for cols in [None, *spans(n_cols, block)]:
            got = f.read(name, rows, cols)
            r = slice(None) if rows is None else slice(rows.start, rows.stop)
            c = slice(None) if cols is None else slice(cols.start, cols.stop)
            want = full[r, c]
            assert got.dtype == np.float32 and got.shape == want.shape, (name, rows, cols)
            assert np.array_equal(got, want), (name, rows, cols)
            assert got.flags.c_contiguous and got.flags.writeable


def check_metadata(f: GGUFFile, reader: gguf.GGUFReader) -> None:
    fields = {k: v for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(f.metadata) == list(fields)
    for key, field in fields.items():
        value = f.metadata[key]
        if field.types[0] == V.ARRAY and (field.types[-1] == V.STRING or len(field.data) > SHORT_ARRAY):
            assert isinstance(value, SkippedArray) and len(value) == value.length == len(field.data), key
        else:
            want = field.contents()
            assert value == want and type(value) is type(want), key
            if isinstance(want, list):
                assert [type(v) for v in value] == [type(v) for v in want], key
    assert f.version == int(reader.fields["GGUF.version"].contents())
    assert f.alignment == reader.alignment and f.data_offset == reader.data_offset


def check_index(f: GGUFFile, reader: gguf.GGUFReader) -> None:
    assert list(f.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = f.tensors[t.name]
        assert info == TensorInfo(
            t.name, tuple(int(n) for n in reversed(t.shape)), int(t.tensor_type), t.data_offset, t.n_bytes
        )
        assert all(type(n) is int for n in info.shape)
    last = reader.tensors[-1].field
    assert f.header_nbytes == last.offset + sum(int(p.nbytes) for p in last.parts)


# ---------------------------------------------------------------- the real files


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real(request, tmp_path_factory) -> tuple[Path, GGUFFile, gguf.GGUFReader]:
    if request.param == "smollm2":
        path = request.getfixturevalue("smollm2_gguf")
    else:
        path = request.getfixturevalue("gemma3_gguf")
    return path, GGUFFile(path), gguf.GGUFReader(path)


def test_real_metadata_matches_reader(real):
    _, f, reader = real
    check_metadata(f, reader)
    assert len(f.metadata["tokenizer.ggml.tokens"]) == len(reader.fields["tokenizer.ggml.tokens"].data) >= 49152


def test_real_arrays_decoded_on_request(real):
    path, _, reader = real
    f = GGUFFile(path, arrays=True)
    arrays = [k for k, v in reader.fields.items() if v.types[:1] == [V.ARRAY]]
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type"} <= set(arrays)
    for key in arrays:
        assert f.metadata[key] == reader.fields[key].contents(), key


def test_real_tensor_index_matches_reader(real):
    _, f, reader = real
    check_index(f, reader)


def test_real_reads_match_reader(real):
    _, f, reader = real
    first_of_type = {}
    for t in reader.tensors:
        if t.n_elements <= 50_000_000:  # Gemma's 262144 x 640 embedding is 670 MB as float32
            first_of_type.setdefault(t.tensor_type, t.name)
    expected = {"llama": {Q.F32, Q.Q4_1, Q.Q8_0}, "gemma3": {Q.F32, Q.Q5_0, Q.Q4_K, Q.Q6_K, Q.Q8_0}}
    assert expected[f.metadata["general.architecture"]] <= set(first_of_type)
    for name in first_of_type.values():
        check_reads(f, reader, name)


def test_real_embedding_rows_and_columns(real):
    _, f, reader = real
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    n_rows, n_cols = f.tensors[t.name].shape
    rows = range(n_rows - 300, n_rows - 7)
    want = dequantize(np.asarray(t.data[rows.start : rows.stop]), t.tensor_type)
    assert np.array_equal(f.read(t.name, rows), want)
    assert np.array_equal(f.read(t.name, rows, range(37, n_cols - 3)), want[:, 37 : n_cols - 3])


def test_real_pickle_round_trip(real):
    _, f, reader = real
    name = next(t.name for t in reader.tensors if t.tensor_type not in (Q.F32, Q.F16))
    rows, cols = range(3, 11), range(40, 100)
    before = f.read(name, rows, cols)  # opens the memory map, which the pickle leaves out
    data = pickle.dumps(f)
    back = pickle.loads(data)
    assert back._map is None and back.metadata == f.metadata and back.tensors == f.tensors
    assert np.array_equal(back.read(name, rows, cols), before)
    assert back.header_sha256() == f.header_sha256()
    assert len(data) < f.header_nbytes / 2  # no decoded vocabulary


def test_pickle_is_small(real):
    """It travels to every rank: well under a pipe's 64 KiB, no vocabulary, no per-token arrays."""
    _, f, _ = real
    data = pickle.dumps(f)
    assert len(data) < 32_000
    assert "Ġthe".encode() not in data and b"<|endoftext|>" not in data  # vocabulary entries


def test_real_header_sha256(real):
    path, f, _ = real
    with open(path, "rb") as fh:
        want = hashlib.sha256(fh.read(f.header_nbytes)).hexdigest()
    assert f.header_sha256() == want and len(want) == 64


# ---------------------------------------------------------------- every type, written by GGUFWriter


SCALARS = [
    ("s.u8", V.UINT8, 200), ("s.i8", V.INT8, -100), ("s.u16", V.UINT16, 60000), ("s.i16", V.INT16, -30000),
    ("s.u32", V.UINT32, 4_000_000_000), ("s.i32", V.INT32, -2_000_000_000), ("s.u64", V.UINT64, 2**63 + 5),
    ("s.i64", V.INT64, -(2**62) - 3), ("s.f32", V.FLOAT32, 0.1), ("s.f64", V.FLOAT64, 0.1),
    ("s.bool", V.BOOL, True), ("s.false", V.BOOL, False), ("s.str", V.STRING, "héllo ✓ 🤗"),
]
ARRAYS = [
    ("a.u8", V.UINT8, [0, 7, 255]), ("a.i8", V.INT8, [-128, 0, 127]), ("a.u16", V.UINT16, [1, 65535]),
    ("a.i16", V.INT16, [-32768, 5]), ("a.u32", V.UINT32, [2**32 - 1, 0]), ("a.i32", V.INT32, [-1, 2, -3]),
    ("a.u64", V.UINT64, [2**64 - 1]), ("a.i64", V.INT64, [-(2**63), 1]), ("a.f32", V.FLOAT32, [0.1, -2.5, 1e30]),
    ("a.f64", V.FLOAT64, [0.1, 1e300]), ("a.bool", V.BOOL, [True, False, True]),
    ("a.str", V.STRING, ["a", "", "üü", "🤗" * 40]),
]


def write_synthetic(path: Path, endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE) -> Path:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, arch="synthetic", endianess=endianess)
    w.add_custom_alignment(64)
    for key, vtype, value in SCALARS:
        w.add_key_value(key, value, vtype)
    for key, vtype, value in ARRAYS:
        w.add_key_value(key, value, V.ARRAY, sub_type=vtype)
    w.add_tensor("f32", rng.standard_normal((6, COLS)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((6, COLS)).astype(np.float16))
    w.add_tensor("f64", rng.standard_normal((3, 40)))
    w.add_tensor("vec.f32", rng.standard_normal(100).astype(np.float32))
    w.add_tensor("cube.f32", rng.standard_normal((2, 3, 4)).astype(np.float32))
    for q in [*QUANTS, Q.Q8_1]:
        block, block_bytes = gguf.GGML_QUANT_SIZES[q]
        # bytes below 0x3C keep every f16/bf16 scale finite and below 1: no NaN, no overflow
        raw = rng.integers(0, 0x3C, (5, COLS // block * block_bytes), dtype=np.uint8)
        w.add_tensor(f"m.{q.name}", raw, raw_dtype=q)
    w.add_tensor("vec.q8_0", rng.integers(0, 0x3C, 3 * 34, dtype=np.uint8), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, GGUFFile, gguf.GGUFReader]:
    path = write_synthetic(tmp_path_factory.mktemp("synthetic") / "synthetic.gguf")
    return path, GGUFFile(path), gguf.GGUFReader(path)


def test_synthetic_metadata_every_value_type(synthetic):
    _, f, reader = synthetic
    check_metadata(f, reader)
    for key, _, value in SCALARS:
        want = struct.unpack("<f", struct.pack("<f", value))[0] if key == "s.f32" else value
        assert f.metadata[key] == want and type(f.metadata[key]) is type(want), key
    assert f.metadata["a.f32"] == [struct.unpack("<f", struct.pack("<f", v))[0] for v in (0.1, -2.5, 1e30)]
    assert f.metadata["a.u64"] == [2**64 - 1] and f.metadata["a.bool"] == [True, False, True]
    assert f.metadata["a.str"] == SkippedArray(4)
    assert f.alignment == 64 and f.data_offset % 64 == 0 and f.data_offset >= f.header_nbytes
    decoded = GGUFFile(f.path, arrays=True)
    assert decoded.metadata["a.str"] == ["a", "", "üü", "🤗" * 40] and decoded.tensors == f.tensors


def test_synthetic_tensor_index(synthetic):
    _, f, reader = synthetic
    check_index(f, reader)
    assert f.tensors["cube.f32"].shape == (2, 3, 4) and f.tensors["vec.q8_0"].shape == (96,)
    assert f.tensors[f"m.{Q.Q4_K.name}"].shape == (5, COLS)


@pytest.mark.parametrize("name", ["f32", "f16", "f64", "vec.f32", "vec.q8_0", *(f"m.{q.name}" for q in QUANTS)])
def test_synthetic_reads_match_reader(synthetic, name):
    _, f, reader = synthetic
    assert np.isfinite(reference(reader, name)).all()
    check_reads(f, reader, name)


def test_read_of_more_dims_slices_their_2d_view(synthetic):
    """A stacked [2, 3, 4] tensor is sliced as its [6, 4] view (an expert is a run of its rows)."""
    _, f, reader = synthetic
    whole = reference(reader, "cube.f32")
    assert np.array_equal(f.read("cube.f32"), whole)
    assert np.array_equal(f.read("cube.f32", range(3, 6)), whole[1])
    assert np.array_equal(f.read("cube.f32", range(3, 6), range(1, 3)), whole[1][:, 1:3])
    with pytest.raises(ValueError, match="1-D"):
        f.read("vec.f32", range(0, 1), range(0, 1))


@pytest.mark.parametrize(
    "rows, cols",
    [(range(0, 7), None), (range(-1, 2), None), (range(3, 2), None), (range(0, 4, 2), None),
     (None, range(0, COLS + 1)), (None, range(10, 9)), (None, range(0, 64, 2))],
)
def test_bad_spans(synthetic, rows, cols):
    _, f, _ = synthetic
    for name in ("f32", "m.Q4_K"):
        with pytest.raises(ValueError, match="is not a contiguous span of range"):
            f.read(name, rows, cols)


def test_column_slice_reads_only_its_blocks(synthetic, tmp_path):
    path, f, reader = synthetic
    name, rows, cols = "m.Q4_K", range(1, 3), range(300, 520)  # blocks 1 and 2 of rows 1..2
    info = f.tensors[name]
    row_bytes = info.nbytes // info.shape[0]
    block_bytes = gguf.GGML_QUANT_SIZES[Q.Q4_K][1]
    broken = tmp_path / "broken.gguf"
    data = bytearray(path.read_bytes())
    keep = [
        (info.offset + r * row_bytes + block_bytes, info.offset + r * row_bytes + 3 * block_bytes) for r in rows
    ]
    saved = [bytes(data[a:b]) for a, b in keep]
    data[info.offset : info.offset + info.nbytes] = b"\xff" * info.nbytes  # f16 0xffff is NaN
    for (a, b), s in zip(keep, saved):
        data[a:b] = s
    broken.write_bytes(bytes(data))
    g = GGUFFile(broken)
    assert np.isnan(g.read(name)).any()
    assert np.array_equal(g.read(name, rows, cols), reference(reader, name)[1:3, 300:520])


@pytest.mark.parametrize("cols", [range(256, 512), range(300, 520), range(0, 1), range(767, 768), range(0, COLS)])
def test_dequantizes_only_the_covering_blocks(synthetic, monkeypatch, cols):
    from tensorpar.loading import gguf_file

    _, f, reader = synthetic
    seen = []

    def spy(data, qtype):
        seen.append(data.shape)
        return dequantize(data, qtype)

    monkeypatch.setattr(gguf_file, "dequantize", spy)
    got = f.read("m.Q4_K", range(1, 3), cols)
    blocks = -(-cols.stop // 256) - cols.start // 256
    assert seen == [(2, blocks * gguf.GGML_QUANT_SIZES[Q.Q4_K][1])]
    assert np.array_equal(got, reference(reader, "m.Q4_K")[1:3, cols.start : cols.stop])


def test_rows_of_partial_blocks_are_refused(synthetic, tmp_path):
    data = bytearray(synthetic[0].read_bytes())
    name = b"m.Q4_K"
    dims_at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4
    assert struct.unpack_from("<2Q", data, dims_at) == (COLS, 5)
    struct.pack_into("<Q", data, dims_at, 700)
    path = tmp_path / "partial.gguf"
    path.write_bytes(bytes(data))
    one_line_error(path, "'m.Q4_K': rows of 700 values are not whole Q4_K blocks")


def test_version_2(synthetic, tmp_path):
    path, f, _ = synthetic
    v2 = tmp_path / "v2.gguf"
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    v2.write_bytes(bytes(data))
    g = GGUFFile(v2)
    assert g.version == 2 and f.version == 3
    assert g.metadata == f.metadata and g.tensors == f.tensors
    check_metadata(g, gguf.GGUFReader(v2))


def test_unsupported_dequantization(synthetic):
    _, f, _ = synthetic
    with pytest.raises(CheckpointError, match="'m.Q8_1': cannot read Q8_1"):
        f.read("m.Q8_1")


def test_file_gone_before_first_read(synthetic, tmp_path):
    moved = tmp_path / "moved.gguf"
    moved.write_bytes(synthetic[0].read_bytes())
    f = pickle.loads(pickle.dumps(GGUFFile(moved)))
    moved.unlink()
    with pytest.raises(CheckpointError, match="cannot map GGUF file") as e:
        f.read("f32")
    assert str(moved) in str(e.value)


def test_unknown_tensor(synthetic):
    _, f, _ = synthetic
    with pytest.raises(CheckpointError, match="no tensor 'blk.0.nope.weight'") as e:
        f.read("blk.0.nope.weight")
    assert str(f.path) in str(e.value)


# ---------------------------------------------------------------- broken files


def one_line_error(path: Path, match: str, **kw) -> str:
    with pytest.raises(CheckpointError, match=match) as e:
        GGUFFile(path, **kw)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    one_line_error(tmp_path / "absent.gguf", "No such file")


def test_bad_magic(smollm2_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    with open(smollm2_gguf, "rb") as fh:
        bad.write_bytes(b"GGUX" + fh.read(4096)[4:])
    one_line_error(bad, "not a GGUF file")


def test_unsupported_version(synthetic, tmp_path):
    path = tmp_path / "v9.gguf"
    data = bytearray(synthetic[0].read_bytes())
    data[4:8] = struct.pack("<I", 9)
    path.write_bytes(bytes(data))
    one_line_error(path, "version 9 is not supported")


def test_big_endian_is_refused(tmp_path):
    path = write_synthetic(tmp_path / "be.gguf", gguf.GGUFEndian.BIG)
    one_line_error(path, "big-endian")


@pytest.fixture(scope="module")
def smollm2_bytes(smollm2_gguf) -> tuple[bytes, GGUFFile]:
    f = GGUFFile(smollm2_gguf)
    with open(smollm2_gguf, "rb") as fh:
        return fh.read(f.data_offset + 4096), f


@pytest.mark.parametrize("arrays", [False, True])
@pytest.mark.parametrize("where", ["empty", "counts", "metadata", "vocabulary", "index"])
def test_truncated_header(smollm2_bytes, tmp_path, where, arrays):
    data, f = smollm2_bytes
    n = {"empty": 0, "counts": 20, "metadata": 300, "vocabulary": f.header_nbytes // 2, "index": f.header_nbytes - 5}
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: n[where]])
    one_line_error(path, "truncated", arrays=arrays)


def test_truncated_tensor_data(smollm2_bytes, tmp_path):
    data, f = smollm2_bytes
    path = tmp_path / "cut.gguf"
    path.write_bytes(data)
    first = min(f.tensors.values(), key=lambda t: t.offset)
    msg = one_line_error(path, "runs past the end of the file")
    assert repr(first.name) in msg
