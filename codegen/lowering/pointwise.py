"""The pointwise family: every elementwise op (activations and their gradients, add, optimizer
updates, fused pointwise chains, constants) as one grid-stride kernel whose body is the op's own
sympy expression printed by the C printer. Operands are full-size, scalars, or per-channel [C]
vectors beside an [N, C, ...] result."""
from __future__ import annotations

import sympy as sp

from graphconv.ops.fused import FusedPointwise, expression_of

from ..cprinter import c_expression, c_function_prelude
from ..spec import BATCH, Arg, KernelSpec, Lowered
from . import c_int, lowering, numel, short_dtype

THREADS = 256
MAX_BLOCKS = 4096    # a grid-stride loop past this: enough blocks for 132 SMs, few enough to schedule


def operand_index(shape, out_shape) -> str:
    """How element i of the result finds its operand element: the same element, a scalar, or the
    channel of an [N, C, ...] result (the rule of Pointwise.shape)."""
    if tuple(shape) == tuple(out_shape):
        return "i"
    if len(shape) == 0:
        return "0"
    inner = numel(out_shape[2:])
    return f"(i / {c_int(inner)}) % {c_int(shape[0])}" if inner != 1 else f"i % {c_int(shape[0])}"


def pointwise_kernel(ctx, expr, operand_shapes, arg_values, out_value, out_shape, what, tag=""):
    """A KernelSpec computing `expr` (sympy, in symbols a0, a1, ...) elementwise."""
    dtype = ctx.outs[0].dtype
    T = "float" if dtype == "float32" else "double"
    names = {f"a{i}": f"v{i}" for i in range(len(operand_shapes))}
    temps, result, used = c_expression(expr, dtype, names)
    loads = [{"var": f"v{i}", "expr": f"a{i}[{operand_index(s, out_shape)}]"}
             for i, s in enumerate(operand_shapes)]
    args = [Arg(f"const {T}*", f"a{i}", v) for i, v in enumerate(arg_values)]
    args += [Arg(f"{T}*", "out", out_value), Arg("int", "batch")]
    total = numel(out_shape)
    dims = "x".join(str(d) for d in out_shape if d != BATCH) or "1"
    name = f"{what}_{short_dtype(dtype)}_{dims}{tag}"
    grid = (sp.Min(sp.ceiling(total / THREADS), MAX_BLOCKS), 1, 1)
    return KernelSpec(name=name, template="pointwise.cu.j2",
                      params={"T": T, "threads": THREADS, "total": c_int(total), "loads": loads, "temps": temps,
                              "result": result, "prelude": c_function_prelude(used, dtype),
                              "expression": str(expr)},
                      args=args, grid=grid, block=(THREADS, 1, 1))


def tag_of(ctx) -> str:
    """A short digest where attributes (a slope, a learning rate, a fused expression) change the code."""
    if not ctx.attrs:
        return ""
    from ..cache import digest
    return "_" + digest(repr(sorted((k, repr(v)) for k, v in ctx.attrs.items())))[:6]


@lowering("<pointwise>", "add", "fused_pointwise")
def lower_pointwise(ctx):
    symbols = FusedPointwise.symbols(len(ctx.operands))
    expr = expression_of(ctx.node.op, ctx.attrs, list(symbols))
    kernel = pointwise_kernel(ctx, expr, [v.shape for v in ctx.ins], ctx.operands, ctx.out_key(),
                              ctx.outs[0].shape, ctx.node.op, tag_of(ctx))
    return Lowered(kernels=[kernel])


@lowering("constant")
def lower_constant(ctx):
    kernel = pointwise_kernel(ctx, sp.Float(ctx.attrs["value"]), [], [], ctx.out_key(), ctx.outs[0].shape,
                              "fill", "_" + str(ctx.attrs["value"]).replace(".", "p").replace("-", "m"))
    return Lowered(kernels=[kernel])
