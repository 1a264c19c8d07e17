"""GGUF files (llama.cpp's format): the header parsed once, tensor slices read from a memory map.

Layout (little-endian, versions 2 and 3)::

    "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count     x  string key | u32 value_type | value
    tensor_count x  string name | u32 n_dims | n_dims x u64 dim | u32 ggml_type | u64 offset
    zero padding to general.alignment (default 32) | tensor data

A string is a u64 byte length, then UTF-8 bytes; an array is a u32 item type, a u64 count, then
the items. Dims are listed fastest-varying first, so the row-major (numpy, Hugging Face) shape is
their reverse. A tensor's offset counts from the start of tensor data. A quantized type packs
``B`` values into a block of ``S`` bytes (``B, S = GGML_QUANT_SIZES[type]``), blocks running along
a row, so a row of ``n`` values is ``n / B`` blocks and a tensor of ``N`` values holds
``N * S / B`` bytes.

``gguf.GGUFReader`` builds a numpy view of every field, each element of each array included (the
vocabulary and the merges, 10^5 strings: seconds). ``GGUFFile`` keeps the scalars and the short
numeric arrays (at most ``SHORT_ARRAY`` entries) as Python values and steps over string arrays and
long ones (the vocabulary's scores and token types), keeping only their counts, so the parent
parses the header in milliseconds and hands each rank a small picklable object
(``arrays=True`` decodes every array). Tensor bytes are read through a memory map opened on first read: a row slice reads those
rows; a column slice of a quantized tensor reads the blocks that cover it, then trims.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass
from itertools import repeat
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

from tensorpar.errors import CheckpointError

if TYPE_CHECKING:
    from tensorpar.layers.quant import BlockCodes

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_V = GGUFValueType
_SCALARS = {
    _V.UINT8: "<B", _V.INT8: "<b", _V.UINT16: "<H", _V.INT16: "<h", _V.UINT32: "<I", _V.INT32: "<i",
    _V.UINT64: "<Q", _V.INT64: "<q", _V.FLOAT32: "<f", _V.FLOAT64: "<d", _V.BOOL: "<?",
}
_SCALAR_STRUCTS = {t: struct.Struct(f) for t, f in _SCALARS.items()}
_ARRAY_DTYPES = {t: np.dtype(f if t != _V.BOOL else np.bool_) for t, f in _SCALARS.items()}
_Q = GGMLQuantizationType
_UNQUANTIZED = {_Q.F32: np.dtype("<f4"), _Q.F16: np.dtype("<f2"), _Q.F64: np.dtype("<f8")}


def can_read(ggml_type: int) -> bool:
    """Whether tensors of this type can be read: unquantized, or the ``gguf`` package dequantizes
    it (probed on one block of zeros, once per type)."""
    if ggml_type not in _READABLE:
        q = _Q(ggml_type)
        try:
            _READABLE[ggml_type] = q in _UNQUANTIZED or dequantize(
                np.zeros(GGML_QUANT_SIZES[q][1], dtype=np.uint8), q).size > 0
        except NotImplementedError:
            _READABLE[ggml_type] = False
    return _READABLE[ggml_type]


_READABLE: dict[int, bool] = {}

CODES_CHUNK = 1 << 22  # values decoded to codes at a time (``read_codes``)
SHORT_ARRAY = 64  # numeric arrays longer than this are stepped over unless ``arrays=True``


@dataclass(frozen=True)
class SkippedArray:
    """A metadata array that was stepped over (strings, or a long numeric one): only its length is known."""

    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor index. ``shape`` is row-major (GGUF's dims reversed); ``offset`` is
    the absolute byte offset of the tensor's data in the file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


def _skip_strings(buf: mmap.mmap, pos: int, count: int) -> int:
    """The offset just past ``count`` length-prefixed strings starting at ``pos``."""
    unpack = _U64.unpack_from
    for _ in repeat(None, count):
        (n,) = unpack(buf, pos)
        pos += 8 + n
    return pos


class _Cursor:
    def __init__(self, buf: mmap.mmap, arrays: bool):
        self.buf, self.pos, self.arrays = buf, 0, arrays

    def unpack(self, s: struct.Struct) -> Any:
        (v,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return v

    def string(self) -> str:
        n = self.unpack(_U64)
        end = self.pos + n
        if end > len(self.buf):
            raise ValueError(f"a string of {n} bytes at offset {self.pos} runs past the end")
        s = self.buf[self.pos : end].decode("utf-8")
        self.pos = end
        return s

    def value(self, vtype: int) -> Any:
        if vtype == _V.STRING:
            return self.string()
        if vtype == _V.ARRAY:
            return self.array()
        s = _SCALAR_STRUCTS.get(vtype)
        if s is None:
            raise ValueError(f"unknown value type {vtype} at offset {self.pos}")
        return self.unpack(s)

    def array(self) -> list | SkippedArray:
        itype, n = self.unpack(_U32), self.unpack(_U64)
        dtype = _ARRAY_DTYPES.get(itype)
        if dtype is not None:
            start, self.pos = self.pos, self.pos + n * dtype.itemsize
            if n > SHORT_ARRAY and not self.arrays:
                if self.pos > len(self.buf):
                    raise ValueError("an array runs past the end")
                return SkippedArray(n)
            return np.frombuffer(self.buf, dtype, n, start).tolist()
        if itype == _V.STRING and not self.arrays:
            self.pos = _skip_strings(self.buf, self.pos, n)
            if self.pos > len(self.buf):
                raise ValueError("a string array runs past the end")
            return SkippedArray(n)
        return [self.value(itype) for _ in range(n)]


class GGUFFile:
    """The header of a GGUF file (metadata and tensor index), and slices of its tensors."""

    path: Path
    version: int
    alignment: int
    data_offset: int
    header_nbytes: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]

    def __init__(self, path: str | os.PathLike[str], arrays: bool = False):
        self.path = Path(path)
        self._map: np.memmap | None = None
        self._sha256: str | None = None
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 24:
                    raise CheckpointError(f"{self.path}: truncated GGUF header ({size} bytes)")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    self._parse(buf, size, arrays)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read GGUF file: {e.strerror or e}") from e

    def _parse(self, buf: mmap.mmap, size: int, arrays: bool) -> None:
        if buf[:4] != _MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file (magic {buf[:4]!r}, expected {_MAGIC!r})")
        c = _Cursor(buf, arrays)
        c.pos = 4
        self.version = c.unpack(_U32)
        if self.version not in _VERSIONS and self.version & 0xFFFF == 0:
            raise CheckpointError(f"{self.path}: big-endian GGUF files are not supported")
        if self.version not in _VERSIONS:
            raise CheckpointError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are)")
        try:
            n_tensors, n_kv = c.unpack(_U64), c.unpack(_U64)
            self.metadata = {}
            for _ in range(n_kv):
                key = c.string()
                if key in self.metadata:
                    raise ValueError(f"duplicate metadata key {key!r}")
                self.metadata[key] = c.value(c.unpack(_U32))
            index = []
            for _ in range(n_tensors):
                name = c.string()
                n_dims = c.unpack(_U32)
                dims = struct.unpack_from(f"<{n_dims}Q", buf, c.pos)
                c.pos += 8 * n_dims
                index.append((name, dims, c.unpack(_U32), c.unpack(_U64)))
        except (struct.error, ValueError, UnicodeDecodeError, OverflowError, MemoryError) as e:
            raise CheckpointError(f"{self.path}: truncated or corrupt GGUF header: {e}") from e
        self.header_nbytes = c.pos
        self.alignment = self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        a = self.alignment
        if not isinstance(a, int) or isinstance(a, bool) or a <= 0 or a & (a - 1):
            raise CheckpointError(f"{self.path}: general.alignment {a!r} is not a power of two")
        self.data_offset = -(-c.pos // a) * a
        self.tensors = {}
        for name, dims, ggml_type, rel in index:
            self.tensors[name] = self._tensor_info(name, dims, ggml_type, rel, size)

    def _tensor_info(self, name: str, dims: tuple[int, ...], ggml_type: int, rel: int, size: int) -> TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        if name in self.tensors:
            raise CheckpointError(f"{where} appears twice in the tensor index")
        if ggml_type not in GGML_QUANT_SIZES:
            raise CheckpointError(f"{where} has unknown ggml type {ggml_type}")
        block, block_bytes = GGML_QUANT_SIZES[_Q(ggml_type)]
        if dims and dims[0] % block:
            raise CheckpointError(f"{where}: rows of {dims[0]} values are not whole {_Q(ggml_type).name} blocks")
        nbytes = prod(dims) * block_bytes // block
        offset = self.data_offset + rel
        if offset + nbytes > size:
            raise CheckpointError(
                f"{where}: data at bytes [{offset}, {offset + nbytes}) runs past the end of the file "
                f"({size} bytes; truncated?)"
            )
        return TensorInfo(name, tuple(reversed(dims)), ggml_type, offset, nbytes)

    def header_sha256(self) -> str:
        """The sha256 (hex) of the header bytes: the start of the file to the end of the tensor index."""
        if self._sha256 is None:
            with open(self.path, "rb") as f:
                self._sha256 = hashlib.sha256(f.read(self.header_nbytes)).hexdigest()
        return self._sha256

    def read(self, name: str, rows: range | None = None, cols: range | None = None) -> np.ndarray:
        """``tensor[rows, cols]`` as float32, reading only the bytes that hold it.

        For a 1-D tensor ``rows`` selects entries. A tensor of more dims is read as its 2-D view
        [prod(shape[:-1]), shape[-1]] (a run of rows of a stacked [experts, out, in] tensor is
        one expert's matrix, or part of it), and returned in that shape when sliced.
        """
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in the file")
        if len(t.shape) == 1:
            if cols is not None:
                raise ValueError(f"{name} is 1-D: select entries with rows")
            return self._read_2d(t, 1, t.shape[0], None, rows)[0]
        if len(t.shape) == 2:
            return self._read_2d(t, t.shape[0], t.shape[1], rows, cols)
        if rows is not None or cols is not None:
            return self._read_2d(t, prod(t.shape[:-1]), t.shape[-1], rows, cols)
        return self._read_2d(t, prod(t.shape[:-1]), t.shape[-1], None, None).reshape(t.shape)

    def _read_2d(self, t: TensorInfo, n_rows: int, n_cols: int, rows: range | None, cols: range | None) -> np.ndarray:
        rows, cols = _span(rows, n_rows, t.name, "rows"), _span(cols, n_cols, t.name, "cols")
        data = self._memmap()[t.offset : t.offset + t.nbytes]
        plain = _UNQUANTIZED.get(t.ggml_type)
        if plain is not None:
            values = data.view(plain).reshape(n_rows, n_cols)
            return np.array(values[rows.start : rows.stop, cols.start : cols.stop], dtype=np.float32)
        if not len(rows) or not len(cols):
            return np.zeros((len(rows), len(cols)), dtype=np.float32)
        block, block_bytes = GGML_QUANT_SIZES[_Q(t.ggml_type)]
        b0, b1 = cols.start // block, -(-cols.stop // block)
        blocks = data.reshape(n_rows, -1)[rows.start : rows.stop, b0 * block_bytes : b1 * block_bytes]
        try:
            values = dequantize(np.ascontiguousarray(blocks), _Q(t.ggml_type))
        except NotImplementedError as e:
            raise CheckpointError(f"{self.path}: tensor {t.name!r}: cannot read {_Q(t.ggml_type).name} data") from e
        start = cols.start - b0 * block
        return np.ascontiguousarray(values[:, start : start + len(cols)], dtype=np.float32)

    def read_codes(self, name: str, rows: range | None = None, cols: range | None = None) -> tuple["BlockCodes", int] | None:
        """``tensor[rows, cols]`` as its blocks' own codes (``gguf_codes``), or None for a type
        without codes there (unquantized ones included). Returns (codes, lead): the codes cover
        whole groups around ``cols``, whose first column is their column ``lead``.

        A tensor of more than 2 dims is read as its 2-D view, as ``read`` does.
        """
        import torch

        from tensorpar.layers.quant import BlockCodes
        from tensorpar.loading.gguf_codes import decode, group_of

        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in the file")
        group = group_of(t.ggml_type)
        if group is None or len(t.shape) < 2:
            return None
        n_rows, n_cols = prod(t.shape[:-1]), t.shape[-1]
        rows, cols = _span(rows, n_rows, t.name, "rows"), _span(cols, n_cols, t.name, "cols")
        block, block_bytes = GGML_QUANT_SIZES[_Q(t.ggml_type)]
        b0, b1 = cols.start // block, -(-cols.stop // block)
        data = self._memmap()[t.offset : t.offset + t.nbytes]
        blocks = data.reshape(n_rows, -1)[rows.start : rows.stop, b0 * block_bytes : b1 * block_bytes]
        step = max(1, CODES_CHUNK // max(1, (b1 - b0) * block))  # rows decoded at a time
        codes = decode(blocks[:step], t.ggml_type)
        if len(rows) > step:  # the rest into tensors of the full size, a chunk at a time
            full = BlockCodes(*(torch.empty((len(rows), *a.shape[1:]), dtype=a.dtype) if a is not None else None
                                for a in (codes.codes, codes.scale)), codes.group, codes.bits, codes.offset,
                              None if codes.bias is None else torch.empty((len(rows), codes.bias.shape[1])))
            for r in range(0, len(rows), step):
                part = codes if r == 0 else decode(blocks[r : r + step], t.ggml_type)
                for dst, src in ((full.codes, part.codes), (full.scale, part.scale), (full.bias, part.bias)):
                    if dst is not None:
                        dst[r : r + step] = src
            codes = full
        g0, g1 = cols.start // group * group, -(-cols.stop // group) * group  # whole groups around cols
        return codes.narrow_cols(g0 - b0 * block, g1 - g0), cols.start - g0

    def _memmap(self) -> np.memmap:
        if self._map is None:
            try:
                self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            except OSError as e:
                raise CheckpointError(f"{self.path}: cannot map GGUF file: {e.strerror or e}") from e
        return self._map

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_map": None}


def _span(r: range | None, n: int, name: str, axis: str) -> range:
    if r is None:
        return range(n)
    if r.step != 1 or not 0 <= r.start <= r.stop <= n:
        raise ValueError(f"{name}: {axis} {r} is not a contiguous span of range({n})")
    return r
