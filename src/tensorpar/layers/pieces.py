"""Where each entry of a local parameter comes from in the full (checkpoint) tensors.

A *piece* says: entries ``local`` of this rank's parameter, along ``axis``, are entries ``span``
of the full tensor ``<part>.<param>`` (``part=None``: zero padding that no full tensor holds;
``axis=None``: the whole tensor, replicated on every rank). A parameter's pieces tile it exactly.
Loading a checkpoint, saving and resharding one, summing partial gradients and exporting all read
the same pieces, so the layout is stated once, by the layer that owns it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Piece:
    part: str | None
    param: str
    axis: int | None = None
    span: range | None = None
    local: range | None = None

    def local_view(self, t: torch.Tensor) -> torch.Tensor:
        """The entries of local tensor ``t`` this piece covers."""
        return t if self.axis is None else t.narrow(self.axis, self.local.start, len(self.local))

    def full_slice(self, t: torch.Tensor) -> torch.Tensor:
        """The entries of the full tensor ``t`` this piece holds."""
        return t if self.axis is None else t.narrow(self.axis, self.span.start, len(self.span))


def split_pieces(spans: list[tuple[str | None, range]], param: str, axis: int) -> list[Piece]:
    """Pieces for consecutive spans [(part, global span)] stacked along ``axis``."""
    out, offset = [], 0
    for part, span in spans:
        out.append(Piece(part, param, axis, span, range(offset, offset + len(span))))
        offset += len(span)
    return out


Reader = Callable[..., torch.Tensor]  # read(part, param, rows=None, cols=None) -> tensor


CHUNK_VALUES = 1 << 22  # a large piece is read this many values (16 MB of float32) at a time


def _row_chunks(n_rows: int, row_len: int, align: int) -> list[range]:
    """Consecutive row ranges of about CHUNK_VALUES values each, ``align`` rows apart."""
    step = max(align, CHUNK_VALUES // max(row_len, 1) // align * align)
    return [range(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def fill_from_pieces(dst: torch.Tensor, pieces: list[Piece], read: Reader, chunk_align: int | None = None) -> None:
    """Write every piece of ``dst`` from ``read`` (padding pieces with zeros).

    ``chunk_align``: read 2-D pieces in row chunks whose boundaries fall every that many rows of
    the full tensor (whole attention heads, for readers that reorder rows within a head), so that
    reading a large tensor (a quantized embedding's dequantization) never holds a second copy of it.
    """
    covered = 0
    for pc in pieces:
        view = pc.local_view(dst)
        if pc.part is None:
            view.zero_()
        elif chunk_align is not None and view.dim() == 2 and view.numel() > CHUNK_VALUES and pc.axis != 1:
            start = 0 if pc.axis is None else pc.span.start  # (a span of rows starts on a head)
            for r in _row_chunks(view.shape[0], view.shape[1], chunk_align):
                view[r.start : r.stop].copy_(read(pc.part, pc.param, rows=range(start + r.start, start + r.stop)))
        elif pc.axis is None:
            view.copy_(read(pc.part, pc.param))
        else:
            view.copy_(read(pc.part, pc.param, **{("rows" if pc.axis == 0 else "cols"): pc.span}))
        covered += view.numel()
    if covered != dst.numel():
        raise AssertionError(f"pieces cover {covered} of {dst.numel()} entries")


@dataclass(frozen=True)
class ParamPieces:
    """A local parameter, its path in the model, and its pieces with full checkpoint names."""

    name: str
    param: nn.Parameter
    pieces: list[Piece]
    prefix: str  # checkpoint names are f"{prefix}{piece.part}.{piece.param}"

    def full_name(self, pc: Piece) -> str:
        return f"{self.prefix}{pc.part}.{pc.param}"


def module_pieces(module: nn.Module, leaf: str) -> dict[str, list[Piece]]:
    """``{param name: pieces}`` for a module's own parameters; ``leaf`` is its name in its parent.

    Sharded layers describe themselves (``pieces()``); a plain fused linear stacks its
    ``fused_parts``; any other parameter is replicated whole.
    """
    if hasattr(module, "pieces"):
        return module.pieces()
    parts = getattr(module, "fused_parts", None)
    out = {}
    for pname, p in module.named_parameters(recurse=False):
        if parts:
            out[pname] = split_pieces([(part, range(n)) for part, n in parts], pname, 0)
        else:
            out[pname] = [Piece(leaf, pname)]
    return out


def trainable_pieces(model: nn.Module) -> list[ParamPieces]:
    """``model_pieces`` of the parameters that require gradients (all, or a LoRA adapter's)."""
    return [pp for pp in model_pieces(model) if pp.param.requires_grad]


def model_pieces(model: nn.Module) -> list[ParamPieces]:
    """Every registered local parameter of ``model`` with its pieces, in ``named_parameters`` order."""
    by_id = {}
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        prefix = f"{parent}." if parent else ""
        own = dict(module.named_parameters(recurse=False))
        for pname, pcs in module_pieces(module, leaf).items():
            p = own.get(pname)
            if p is None:  # a weight already replaced by a packed one (``layers.quant``)
                continue
            if id(p) not in by_id:  # a tied parameter keeps its first name
                by_id[id(p)] = ParamPieces(f"{name}.{pname}" if name else pname, p, pcs, prefix)
    return [by_id[id(p)] for _, p in model.named_parameters() if id(p) in by_id]
