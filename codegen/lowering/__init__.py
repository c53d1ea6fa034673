"""Lowering: one graph node -> the kernels computing it (`Lowered`: KernelSpecs + shared scratch).

Lowerings are registered per op (or per op family) in LOWERINGS by a decorator, as ops are in OPS;
an elementwise op defined by a sympy expression needs no entry: it lowers through the pointwise
family. Each family module sits beside its template and hands it C-ready values only.
"""
from __future__ import annotations

import math

import re

import sympy as sp
import sympy.printing.c  # noqa: F401  (IntegerPrinter's base)

from graphconv.errors import CompileError
from graphconv.ops import OPS
from graphconv.ops.base import CTYPE, TupleType

from ..cprinter import NoCForm
from ..spec import BATCH, Arg, Lowered, Value

LOWERINGS: dict = {}


def lowering(*op_names):
    def register(fn):
        for name in op_names:
            LOWERINGS[name] = fn
        return fn
    return register


NB = sp.Symbol("nb", integer=True, positive=True)
# the families whose kernels take any dim as a run-time size (sizes printed by c_int): elementwise
# kernels, concat / slice copies, views; and softmax, which takes the dims before its axis so and
# refuses a batch size from the axis on itself
BATCH_ANYWHERE = ("codegen.lowering.pointwise", "codegen.lowering.views", "codegen.lowering.softmax")


class IntegerPrinter(sp.printing.c.C99CodePrinter):
    """Integer arithmetic only: ceiling(p/q) as (p + q - 1) / q, Min / Max as min / max of long longs
    (one overload, whatever the operands' types); never a float."""

    def _print_ceiling(self, expr):
        num, den = sp.fraction(sp.together(expr.args[0]))
        return f"(({self._print(num)} + {self._print(den - 1)}) / {self._print(den)})"

    def _print_Min(self, expr):
        text = self._print(expr.args[0])
        for a in expr.args[1:]:
            text = f"min((long long)({text}), (long long)({self._print(a)}))"
        return text

    def _print_Max(self, expr):
        text = self._print(expr.args[0])
        for a in expr.args[1:]:
            text = f"max((long long)({text}), (long long)({self._print(a)}))"
        return text


def c_int(expr) -> str:
    """An integer size (sympy, in BATCH) as C text, `784` or `784*nb`: templates that use the batch
    size declare `const long long nb = batch;` so that sizes are computed in 64 bits."""
    expr = sp.sympify(expr)
    return str(int(expr)) if expr.is_Integer else IntegerPrinter().doprint(expr.subs(BATCH, NB))


def dim_name(d) -> str:
    """A size as it appears in a kernel's name (a C identifier): 16, N for the batch, 2N for twice it
    (a reshape), Nd2 for half."""
    text = str(d).replace("batch", "N").replace(" ", "")
    return re.sub(r"[^0-9A-Za-z_]", "", text.translate(str.maketrans({"*": "", "/": "d", "+": "p", "-": "m"})))


def flat(coords, sizes) -> str:
    """The row-major flat index of `coords` in a box of `sizes` as C text: (c0 * S1 + c1) * S2 + c2."""
    text = coords[0]
    for c, s in zip(coords[1:], sizes[1:]):
        text = f"({text}) * {s} + {c}"
    return text


def numel(shape):
    n = sp.Integer(1)
    for d in shape:
        n *= d
    return n


class Context:
    """What a lowering sees of its node: operand and result types in BATCH, keys to bind, names."""

    def __init__(self, graph, node, batch_symbol, tf32=False, winograd=False):
        self.graph, self.node = graph, node
        self.tf32 = tf32                      # GEMM-family kernels on TF32 tensor cores (opt-in)
        self.winograd = winograd              # FP32 3 x 3 direct convolutions by Winograd F(2x2, 3x3) (opt-in)
        self.op = OPS[node.op]
        self.attrs = node.attrs
        self.operands = graph.operands(node.name)
        self._subs = {batch_symbol: BATCH} if batch_symbol is not None else {}
        self.ins = [self.value_of(graph.node(o).type) for o in self.operands]
        types = node.type.parts if isinstance(node.type, TupleType) else (node.type,)
        self.outs = [self.value_of(t) for t in types]
        self.dtype = self.outs[0].dtype if self.outs[0].dtype in CTYPE else node.dtype
        self.T = CTYPE[self.dtype]
        self.layer = node.layer or node.name
        if node.role == "op" and batch_symbol is not None:
            self._check_batch_leading(batch_symbol)

    def _check_batch_leading(self, batch_symbol):
        """CompileError where the batch size is a dim other than dim 0 of the node's operands or results
        (an input ("N", 3, 8, "N")) and the node's kernels bake those dims in: every family's kernels but
        the elementwise and copying ones (pointwise, concat, slice, views) take only the leading dim
        at run time, and read the others as integers (a crash, or a wrong result from the reductions)."""
        fn = lowering_of(self.node.op)
        if fn is None or fn.__module__ in BATCH_ANYWHERE:
            return
        named = [(f"operand {o}", v) for o, v in zip(self.operands, self.ins)]
        named += [("result" if len(self.outs) == 1 else f"result {i}", v) for i, v in enumerate(self.outs)]
        for what, v in named:
            if v is None:
                continue
            dims = [i for i, d in enumerate(v.shape[1:], 1) if BATCH in sp.sympify(d).free_symbols]
            if dims:
                shape = ", ".join(str(d).replace(str(BATCH), str(batch_symbol)) for d in v.shape)
                raise self.fail(f"{what} is [{shape}]: the batch size {batch_symbol} is its dim "
                                f"{', '.join(map(str, dims))}; {self.node.op} kernels take the batch size "
                                f"only as dim 0 (every other size is baked into it): give that dim a fixed "
                                f"size, or run this graph with backend='numpy'")

    def value_of(self, t) -> Value | None:
        if isinstance(t, TupleType):          # the operand of a `part`: read through its parts
            return None
        return Value(tuple(sp.sympify(d).subs(self._subs) for d in t.shape), t.dtype)

    @property
    def images(self):
        """The image count of the node's first operand (a convolution's x or dy), in BATCH: the
        batch itself, a fixed number in a graph without a batch dim, or 2 x the batch after a
        reshape. Kernels size their grids by it, never by BATCH alone."""
        return self.ins[0].shape[0]

    @property
    def float_type(self) -> str:
        """float or double: the type the node computes in."""
        floats = [v.dtype for v in self.ins + self.outs if v.dtype in ("float32", "float64")]
        return CTYPE[floats[0]] if floats else "float"

    def out_key(self, i=0) -> str:
        return f"{self.node.name}:{i}" if len(self.outs) > 1 else self.node.name

    def scratch_key(self, what) -> str:
        return f"{self.node.name}.{what}"

    def arg_in(self, i, name) -> Arg:
        return Arg(f"const {CTYPE[self.ins[i].dtype]}*", name, self.operands[i])

    def arg_out(self, i, name) -> Arg:
        return Arg(f"{CTYPE[self.outs[i].dtype]}*", name, self.out_key(i))

    def where(self, template="") -> str:
        t = f" template {template}" if template else ""
        layer = "" if self.layer == self.node.name else f"{self.layer}: "
        return f"{layer}{self.node.name} [{self.node.op}]{t}: "

    def shapes_text(self) -> str:
        def fmt(v):
            return f"{v.dtype}[{', '.join(str(d).replace('batch', 'N') for d in v.shape)}]"
        ins = ", ".join(f"{o}: {fmt(v)}" for o, v in zip(self.operands, self.ins))
        outs = ", ".join(fmt(v) for v in self.outs)
        return f"({ins}) -> {outs}"

    def fail(self, why) -> CompileError:
        return CompileError(f"{self.where()}{why}")


def short_dtype(dtype) -> str:
    return {"float32": "f32", "float64": "f64", "uint8": "u8", "int64": "i64"}[dtype]


def lowering_of(op_name):
    """The lowering of an op: its own entry, else the pointwise family's for an elementwise op
    defined by a sympy expression (a user's activation needs no entry); None if there is none."""
    from . import families  # noqa: F401  (fills LOWERINGS)
    op = OPS[op_name]
    fn = LOWERINGS.get(op_name)
    if fn is None and op.kind == "elementwise" and hasattr(op, "expr"):
        fn = LOWERINGS["<pointwise>"]
    return fn


def no_c_form(contexts, error) -> CompileError:
    """The CompileError for a function the C printer has no form for (cprinter.NoCForm), naming the
    node (of `contexts`, the nodes one kernel computes) whose expression uses it."""
    def uses(ctx):
        expr = getattr(ctx.op, "expr", None)
        return isinstance(expr, sp.Basic) and any(a.func == getattr(error.expr, "func", None)
                                                  for a in expr.atoms(sp.Function))
    ctx = next((c for c in contexts if uses(c)), None)
    what = f"{ctx.node.op} is {ctx.op.expr}: it uses" if ctx else "uses"
    return (ctx or contexts[-1]).fail(f"{what} {error.function}, which has no C form: the host and cuda kernels "
                                      f"cannot compute it; run this graph with backend='numpy'")


def lower_node(ctx: Context) -> Lowered:
    fn = lowering_of(ctx.node.op)
    if fn is None:
        raise ctx.fail(f"no kernel for op {ctx.node.op} yet; run this graph with backend='numpy'")
    try:
        lowered = fn(ctx)
    except NoCForm as e:
        raise no_c_form([ctx], e) from None
    for k in lowered.kernels:
        k.nodes = k.nodes or (ctx.node.name,)
        k.replaces = k.replaces or tuple(r[0] for r in ctx.node.replaces)
        k.layers = k.layers or (ctx.layer,)
        k.shapes = k.shapes or ctx.shapes_text()
    return lowered


# ---- an index as mixed-radix digits in registers, advanced by a constant step with carries -----------
def digit_lines(k, radices, declare):
    """`declare(j) = value` lines: the digits of `k` in the mixed radix `radices` (the first unbounded)."""
    lines = []
    for j in range(len(radices)):
        inner = math.prod(radices[j + 1:])
        value = f"{k} / {inner}" if inner != 1 else k
        lines.append(f"{declare(j)} = (int)({value}{'' if j == 0 else f' % {radices[j]}'});")
    return lines


def in_batches(iters, most) -> int:
    """The size of equal batches of at most `most` of a thread's `iters` loads (all of a batch in
    flight before any is used): 21 in batches of at most 16 is two of 11."""
    return -(-iters // -(-iters // most))


def advance_lines(prefix, radices, step):
    """Lines adding the constant `step` to the digits prefix0, prefix1, ... with carries (each digit's
    share of the step is below its radix, so one carry of at most 1 per digit)."""
    share, rest = [], step
    for radix in reversed(radices[1:]):
        share.append(rest % radix)
        rest //= radix
    share.append(rest)
    share.reverse()
    lines, carry = [], None
    for j in reversed(range(len(radices))):
        add = " + ".join(t for t in (str(share[j]) if share[j] else "", carry or "") if t)
        if not add:
            carry = None
            continue
        lines.append(f"{prefix}{j} += {add};")
        if j == 0:
            break
        carry = f"{prefix.rstrip('_')}c{j}"
        lines.append(f"const int {carry} = {prefix}{j} >= {radices[j]};")
        lines.append(f"{prefix}{j} -= {carry} ? {radices[j]} : 0;")
    return lines
