"""dropout: a grid-stride kernel drawing the mask from graphconv.ops.dropout's hash (training), or a
view of its input (eval mode: no kernel, no copy)."""
from __future__ import annotations

import sympy as sp

from graphconv.ops import OPS
from graphconv.ops.dropout import base_key, threshold

from ..spec import Arg, KernelSpec, Lowered
from . import c_int, dim_name, lowering, numel, short_dtype
from .pointwise import MAX_BLOCKS, THREADS
from .window import literal


@lowering("dropout")
def lower_dropout(ctx):
    a = ctx.attrs
    if not a["training"] or a["p"] == 0:
        return Lowered(alias=ctx.operands[0])
    T = ctx.float_type
    total = numel(ctx.outs[0].shape)
    dims = "x".join(dim_name(d) for d in ctx.outs[0].shape[1:]) or "1"
    name = f"dropout_{short_dtype(ctx.dtype)}_{dims}_t{threshold(a['p'])}_{a['salt']:08x}"    # t: the drop threshold
    params = {"T": T, "threads": THREADS, "total": c_int(total), "key0": f"0x{base_key(a['seed'], a['salt']):016X}",
              "thr": threshold(a["p"]), "p": f"{a['p']:g}", "scale": literal(OPS["dropout"].scale(a), T)}
    args = [ctx.arg_in(0, "x"), ctx.arg_in(1, "step"), ctx.arg_out(0, "out"), Arg("int", "batch")]
    grid = (sp.Min(sp.ceiling(sp.sympify(total) / THREADS), MAX_BLOCKS), 1, 1)
    return Lowered(kernels=[KernelSpec(name=name, template="dropout.cu.j2", params=params, args=args, grid=grid,
                                       block=(THREADS, 1, 1))])
