"""softmax, log_softmax and their gradients: a row kernel along the op's axis.

The tensor is seen as [A, C, B] (C the axis): a row is one (a, b) pair, its C values B apart. Short
rows (C <= PER_BLOCK_FROM, or B > 1 where consecutive rows are adjacent in memory) take one thread
each; a long contiguous row (B == 1, e.g. 1000 classes) takes a block and a shared-memory tree.
Both give the same bits on every run (no atomics, a fixed order of additions).
"""
from __future__ import annotations

import sympy as sp

from graphconv.ops.softmax import axis_of

from ..cprinter import c_neg_inf
from ..spec import Arg, KernelSpec, Lowered
from . import c_int, dim_name, lowering, numel, short_dtype
from .pointwise import MAX_BLOCKS

THREADS = 128
PER_BLOCK_FROM = 64

# op: (needs the max, the formula in the header, the term summed per element, the result per element)
FORMS = {
    "softmax": (True, "out = exp(x - max) / sum exp(x - max)", "{exp}(x[i] - mx)", "{exp}(x[i] - mx) / s"),
    "log_softmax": (True, "out = (x - max) - log(sum exp(x - max))", "{exp}(x[i] - mx)", "(x[i] - mx) - {log}(s)"),
    "softmax_grad": (False, "out = y * (dy - sum(dy * y))", "dy[i] * y[i]", "y[i] * (dy[i] - s)"),
    "log_softmax_grad": (False, "out = dy - exp(y) * sum(dy)", "dy[i]", "dy[i] - {exp}(y[i]) * s"),
}


@lowering(*FORMS)
def lower_softmax(ctx):
    x = ctx.ins[0]
    T = ctx.float_type
    axis = axis_of(ctx.attrs["dim"], len(x.shape))
    A, C, B = numel(x.shape[:axis]), sp.sympify(x.shape[axis]), sp.sympify(numel(x.shape[axis + 1:]))
    if not (C.is_Integer and B.is_Integer):
        raise ctx.fail(f"{ctx.node.op} along dim {ctx.attrs['dim']} of [{', '.join(str(d).replace('batch', 'N') for d in x.shape)}]: "
                       f"a kernel needs static sizes from that axis on (the batch axis is not); run this graph with "
                       f"backend='numpy'")
    C, B = int(C), int(B)
    needs_max, formula, term, result = FORMS[ctx.node.op]
    fns = {"exp": "expf", "log": "logf"} if T == "float" else {"exp": "exp", "log": "log"}
    per_block = B == 1 and C > PER_BLOCK_FROM
    rows = A * B
    if ctx.node.op.endswith("_grad"):
        args, first = [ctx.arg_in(0, "y"), ctx.arg_in(1, "dy")], "y"
    else:
        args, first = [ctx.arg_in(0, "x")], "x"
    args += [ctx.arg_out(0, "out"), Arg("int", "batch")]
    dims = "x".join(dim_name(d) for d in x.shape[1:]) or "1"
    name = f"{ctx.node.op}_{short_dtype(ctx.dtype)}_{dims}_a{axis}"
    grid = (sp.Min(rows, MAX_BLOCKS) if per_block else sp.Min(sp.ceiling(sp.sympify(rows) / THREADS), MAX_BLOCKS), 1, 1)
    params = {"T": T, "threads": THREADS, "rows": c_int(rows), "C": C, "B": B, "per_block": per_block,
              "needs_max": needs_max, "first": first, "neg_inf": c_neg_inf(T), "formula": formula,
              "term": term.format(**fns), "result": result.format(**fns)}
    return Lowered(kernels=[KernelSpec(name=name, template="softmax.cu.j2", params=params, args=args, grid=grid,
                                       block=(THREADS, 1, 1), barrier=per_block)])
