"""Ops that move no data: a view shares its operand's buffer (flatten and reshape of a contiguous
NCHW tensor, one part of a node with several outputs)."""
from __future__ import annotations

from ..spec import Lowered
from . import lowering


@lowering("flatten", "reshape")
def lower_view(ctx):
    return Lowered(alias=ctx.operands[0])


@lowering("part")
def lower_part(ctx):
    return Lowered(alias=f"{ctx.operands[0]}:{ctx.attrs['index']}")
