"""The classifier losses (softmax cross-entropy, multiclass hinge) and their gradients.

A loss is a mean over the batch: one thread per example writes its row's loss to scratch, then the
last block to finish its rows (reduce.LAST_BLOCK_FINISHES; else a kernel of its own) adds them in a
fixed order (per-thread strided sums, then a shared-memory tree), in double: no float atomics, the
same bits on every run. A gradient is one thread per example, writing
its row. Rows are short (the class count), so a row fits one thread's loop.
"""
from __future__ import annotations

import sympy as sp

from ..cprinter import c_nan
from ..spec import Arg, KernelSpec, Lowered, Value
from . import c_int, lowering, reduce, short_dtype
from .pointwise import MAX_BLOCKS, literal_seed
from .window import literal

THREADS = 256
MEAN_THREADS = 256
# the last block's mean (_last_block_mean.j2) runs on the row kernel's THREADS: the same additions, in
# the same order, as mean_rows's MEAN_THREADS only while the two are equal
assert THREADS == MEAN_THREADS


def loss_specs(ctx, template, params, grad):
    """The row kernel (and for a loss, the mean kernel and the rows' scratch)."""
    s = ctx.ins[0]
    T = ctx.float_type
    N, F = s.shape[0], int(s.shape[1])
    base = f"{ctx.node.op}_{short_dtype(ctx.dtype)}_c{F}" + params.pop("tag", "")
    params = dict(params, T=T, threads=THREADS, rows=c_int(N), F=F, nan=c_nan(T), grad=grad, mean=False, seed="")
    grid = (sp.Min(sp.ceiling(sp.sympify(N) / THREADS), MAX_BLOCKS), 1, 1)
    args = [ctx.arg_in(0, "scores"), ctx.arg_in(1, "target")]
    if grad:
        seed = literal_seed(ctx.graph, ctx.operands[2])
        if seed is None:
            args.append(ctx.arg_in(2, "grad_output"))
        else:          # the training step's dloss = 1: a literal, not a kernel filling one float
            params["seed"] = literal(seed, T)
            base += "_seed" + str(seed).replace(".", "p").replace("-", "m").replace("+", "")
        args += [ctx.arg_out(0, "dscores"), Arg("int", "batch")]
        return Lowered(kernels=[KernelSpec(name=base, template=template, params=params, args=args, grid=grid,
                                           block=(THREADS, 1, 1))])
    rows_key = ctx.scratch_key("rows")
    if reduce.LAST_BLOCK_FINISHES:       # the mean by the last block to finish its rows: one launch
        arrived = ctx.scratch_key("arrived")
        return Lowered(kernels=[KernelSpec(name=base, template=template, params=dict(params, mean=True),
                                           args=args + [Arg(f"{T}*", "row_loss", rows_key), ctx.arg_out(0, "loss"),
                                                        Arg("unsigned*", "arrived", arrived), Arg("int", "batch")],
                                           grid=grid, block=(THREADS, 1, 1), barrier=True)],
                       scratch={rows_key: Value((N,), ctx.dtype), arrived: Value((1,), "uint32", zeroed=True)})
    rows = KernelSpec(name=base + "_rows", template=template, params=params,
                      args=args + [Arg(f"{T}*", "row_loss", rows_key), Arg("int", "batch")],
                      grid=grid, block=(THREADS, 1, 1))
    mean = KernelSpec(name=f"mean_rows_{short_dtype(ctx.dtype)}", template="mean_rows.cu.j2",
                      params={"T": T, "threads": MEAN_THREADS, "rows": c_int(N)},
                      args=[Arg(f"const {T}*", "row_loss", rows_key), ctx.arg_out(0, "loss"), Arg("int", "batch")],
                      grid=(1, 1, 1), block=(MEAN_THREADS, 1, 1), barrier=True)
    return Lowered(kernels=[rows, mean], scratch={rows_key: Value((N,), ctx.dtype)})


@lowering("softmax_cross_entropy", "softmax_cross_entropy_grad")
def lower_softmax_cross_entropy(ctx):
    T = ctx.float_type
    fns = {"exp": "expf", "log": "logf"} if T == "float" else {"exp": "exp", "log": "log"}
    return loss_specs(ctx, "softmax_xent.cu.j2", fns, ctx.node.op.endswith("_grad"))


@lowering("hinge_loss", "hinge_loss_grad")
def lower_hinge_loss(ctx):
    T = ctx.float_type
    margin = ctx.attrs["margin"]
    tag = "" if margin == 1.0 else f"_m{margin:g}".replace(".", "p").replace("-", "m")
    return loss_specs(ctx, "hinge.cu.j2", {"margin": literal(margin, T), "tag": tag}, ctx.node.op.endswith("_grad"))
