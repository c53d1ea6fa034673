"""The pointwise family: every elementwise op (activations and their gradients, add, optimizer
updates, fused pointwise chains, constants) as one grid-stride kernel whose body is the op's own
sympy expression printed by the C printer. Operands are full-size, scalars, or per-channel [C]
vectors beside an [N, C, ...] result."""
from __future__ import annotations

import math

import sympy as sp

from graphconv.ops.fused import FusedPointwise, expression_of

from ..cprinter import c_expression_hoisting, c_function_prelude
from ..spec import BATCH, Arg, KernelSpec, Lowered
from . import c_int, dim_name, lowering, numel, short_dtype

THREADS = 256
MAX_BLOCKS = 4096    # a grid-stride loop past this: enough blocks for 132 SMs, few enough to schedule
# elements per thread per pass, all their loads issued before the first result is computed: a thread
# keeps UNROLL times the bytes in flight (one element per pass left an H200 at 67-71% of its copy
# bandwidth on large tensors: too few loads outstanding per SM to cover the memory latency)
UNROLL = 4


def operand_index(shape, out_shape, i="i") -> str:
    """How element `i` of the result finds its operand element: the same element, a scalar, or the
    channel of an [N, C, ...] result (the rule of Pointwise.shape). An operand of the result's rank
    is the same element even where its dims read differently: `s: (3, 4)` beside an `[N, 4]` result
    is one only at N = 3, which the runtimes check on every call before a kernel runs."""
    if len(shape) == len(out_shape):
        return i
    if len(shape) == 0:
        return "0"
    if len(shape) != 1:
        raise ValueError(f"operand shape {tuple(shape)} does not broadcast to {tuple(out_shape)}")
    inner = numel(out_shape[2:])
    return f"({i} / {c_int(inner)}) % {c_int(shape[0])}" if inner != 1 else f"{i} % {c_int(shape[0])}"


def pointwise_kernel(ctx, expr, operand_shapes, arg_values, out_value, out_shape, what, tag=""):
    """A KernelSpec computing `expr` (sympy, in symbols a0, a1, ...) elementwise."""
    return pointwise_steps(ctx, [(expr, out_value)], operand_shapes, arg_values, out_shape, what, tag)


def pointwise_steps(ctx, steps, operand_shapes, arg_values, out_shape, what, tag=""):
    """A KernelSpec computing several results elementwise in one loop: `steps` are (expr, output
    value key) in order, each expr in the operands a0, a1, ... and the earlier results r0, r1, ..."""
    dtype = ctx.outs[0].dtype
    T = "float" if dtype == "float32" else "double"
    scalar = [len(s) == 0 and len(out_shape) > 0 for s in operand_shapes]
    # per-element operands live in arrays of UNROLL registers (v0[u]); a scalar is read once per thread
    names = {f"a{i}": f"v{i}" if scalar[i] else f"v{i}[u]" for i in range(len(operand_shapes))}
    names.update({f"r{j}": f"r{j}" for j in range(len(steps))})
    scalar_names = [f"v{i}" for i in range(len(scalar)) if scalar[i]]
    used, printed, invariants = set(), [], []
    for j, (expr, out_value) in enumerate(steps):
        before, temps, result, functions = c_expression_hoisting(expr, dtype, names, scalar_names,
                                                                  prefix=f"_t{j}_" if len(steps) > 1 else "_t")
        invariants += before
        used |= functions
        out = "out" if len(steps) == 1 else f"out{j}"
        printed.append({"temps": temps, "result": result, "out": out, "expression": str(expr),
                        "var": f"r{j}" if len(steps) > 1 else None})
    read = set().union(*(sp.sympify(expr).free_symbols for expr, _ in steps))
    read = {s.name for s in read}
    loads = [{"var": f"v{i}", "expr": f"a{i}[{operand_index(s, out_shape, 'j')}]", "scalar": scalar[i]}
             for i, s in enumerate(operand_shapes) if f"a{i}" in read]    # an operand the result ignores: not read
    args = [Arg(f"const {T}*", f"a{i}", v) for i, v in enumerate(arg_values)]
    args += [Arg(f"{T}*", step["out"], value) for step, (_, value) in zip(printed, steps)] + [Arg("int", "batch")]
    total = numel(out_shape)
    dims = "x".join(dim_name(d) for d in out_shape if d != BATCH) or "1"
    name = f"{what}_{short_dtype(dtype)}_{dims}{tag}"
    grid = (sp.Min(sp.ceiling(total / (THREADS * UNROLL)), MAX_BLOCKS), 1, 1)
    return KernelSpec(name=name, template="pointwise.cu.j2",
                      params={"T": T, "threads": THREADS, "unroll": UNROLL, "total": c_int(total), "loads": loads, "steps": printed,
                              "prelude": c_function_prelude(used, dtype), "invariants": invariants, "segments": [],
                              "family": (what, short_dtype(dtype), tag), "store_index": "j"},
                      args=args, grid=grid, block=(THREADS, 1, 1), restrict=False)   # may run in place


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


SEED_READERS = ("softmax_cross_entropy_grad", "hinge_loss_grad")   # read grad_output (operand 2) once


def literal_seed(graph, name):
    """The value of a finite scalar constant (a training step's dloss = 1) whose every reader is a
    loss gradient, which takes it as a literal instead of a launch filling one value; else None."""
    node = graph.node(name)
    if node.op != "constant" or tuple(node.shape) != () or name in graph.outputs:
        return None
    users = graph.users(name)
    value = float(node.attrs["value"])
    if not users or not math.isfinite(value) or not all(graph.node(u).op in SEED_READERS and i == 2 for u, i in users):
        return None
    return value


@lowering("constant")
def lower_constant(ctx):
    if literal_seed(ctx.graph, ctx.node.name) is not None:
        return Lowered()             # its readers print it (lowering/loss.py)
    kernel = pointwise_kernel(ctx, sp.Float(ctx.attrs["value"]), [], [], ctx.out_key(), ctx.outs[0].shape,
                              "fill", "_" + str(ctx.attrs["value"]).replace(".", "p").replace("-", "m"))
    return Lowered(kernels=[kernel])


# ---- several elementwise nodes, one kernel ---------------------------------------------------------
def is_pointwise(graph, name) -> bool:
    """A node this family lowers (a constant aside: it reads nothing to share)."""
    from . import lowering_of
    node = graph.node(name)
    return node.role == "op" and node.op != "constant" and lowering_of(node.op) is lower_pointwise


def pointwise_groups(graph) -> dict:
    """{last member: members} for elementwise nodes one kernel computes together: a node joins the
    group of every elementwise producer of its shape (Adam's two moment updates and its parameter
    update: g and p are read once, m' and v' handed on in registers). A group stands only where
    nothing outside it reads a member before the group's last member has run."""
    order = [n.name for n in graph.topo()]
    position = {name: i for i, name in enumerate(order)}
    group_of: dict = {}
    for name in order:
        if not is_pointwise(graph, name):
            continue
        shape = graph.node(name).shape
        joined = {group_of[o] for o in graph.operands(name) if o in group_of and graph.node(o).shape == shape}
        group = frozenset().union(*joined) | {name}
        for member in group:
            group_of[member] = group
    groups = {}
    for group in set(group_of.values()):
        if len(group) < 2:
            continue
        members = sorted(group, key=position.get)
        last = position[members[-1]]
        if all(position[user] >= last or user in group for m in members[:-1] for user, _ in graph.users(m)):
            groups[members[-1]] = tuple(members)
    return groups


def lower_pointwise_group(ctxs):
    """One kernel for the members (in order): operands outside the group are loaded once."""
    members = {ctx.node.name: j for j, ctx in enumerate(ctxs)}
    externals, shapes = [], []
    steps = []
    for ctx in ctxs:
        args = []
        for operand, value in zip(ctx.operands, ctx.ins):
            if operand in members:
                args.append(sp.Symbol(f"r{members[operand]}", real=True))
                continue
            if operand not in externals:
                externals.append(operand)
                shapes.append(value.shape)
            args.append(FusedPointwise.symbols(len(externals))[externals.index(operand)])
        steps.append((expression_of(ctx.node.op, ctx.attrs, args), ctx.out_key()))
    last = ctxs[-1]
    from ..cache import digest
    tag = "_" + digest(repr([(c.node.op, sorted(c.attrs.items())) for c in ctxs]))[:6]
    what = "_".join(dict.fromkeys(c.node.op for c in ctxs))
    kernel = pointwise_steps(last, steps, shapes, externals, last.outs[0].shape, what, tag)
    kernel.nodes = tuple(members)
    kernel.layers = tuple(dict.fromkeys(c.layer for c in ctxs))
    kernel.shapes = "; ".join(c.shapes_text() for c in ctxs)
    return Lowered(kernels=[kernel])


# ---- one update rule over many tensors, one launch ----------------------------------------------------
MAX_TENSORS = 32     # tensors per multi-tensor launch
PARAM_BYTES = 4096   # a launch's kernel parameters: CUDA's limit before 12.1 (Adam: 56 bytes a tensor)


def param_bytes(spec, shared=True) -> int:
    """The kernel parameter bytes a pointwise kernel's tensor takes in a multi-tensor launch: its
    per-element operands and results (8-byte pointers), plus, with `shared`, the scalar operands and the
    batch every segment shares."""
    p = spec.params
    per_tensor = 8 * (sum(not load["scalar"] for load in p["loads"]) + len(p["steps"]))
    return per_tensor + (8 * sum(load["scalar"] for load in p["loads"]) + 4 if shared else 0)


def multi_tensor_key(spec):
    """What two pointwise kernels must share to run as one multi-tensor launch (the same expression,
    loads, scalar operands and element type over tensors of static sizes), or None where one cannot
    join any: a kernel whose operands are broadcast per channel, or whose size grows with the batch."""
    p = spec.params
    if spec.template != "pointwise.cu.j2" or "family" not in p or p["segments"] or not str(p["total"]).isdigit() \
            or p["store_index"] != "j":
        return None
    if any(not load["scalar"] and load["expr"] != f"a{load['var'][1:]}[j]" for load in p["loads"]):
        return None
    scalars = {f"a{load['var'][1:]}" for load in p["loads"] if load["scalar"]}
    return (p["family"], p["T"], repr(p["loads"]), repr(p["steps"]), tuple(p["invariants"]), p["prelude"],
            tuple(a.name for a in spec.args), tuple((a.name, a.value) for a in spec.args if a.name in scalars))


def multi_tensor(specs) -> KernelSpec:
    """One KernelSpec running the kernels `specs` (equal multi_tensor_key) over their own tensors:
    each gets a range of blocks (as many as its own launch had), the segment's pointers are arguments
    `a0_<t>`, `out0_<t>`, ..., and the scalar operands they share are passed once."""
    first = specs[0]
    p = first.params
    inputs = [f"a{load['var'][1:]}" for load in p["loads"] if not load["scalar"]]
    scalars = {f"a{load['var'][1:]}" for load in p["loads"] if load["scalar"]}
    outputs = [step["out"] for step in p["steps"]]
    segments, args, begin, segment_of = [], [], 0, {}
    for t, spec in enumerate(specs):
        total = int(spec.params["total"])
        blocks = min(math.ceil(total / (THREADS * UNROLL)), MAX_BLOCKS)
        by_name = {a.name: a for a in spec.args}
        for name in inputs + outputs:
            value = by_name[name].value
            args.append(Arg(by_name[name].ctype, f"{name}_{t}", value))
            # a value two tensors' segments read belongs to neither: no result is written over it in place
            segment_of[value] = t if segment_of.get(value, t) == t else None
        segments.append({"first": begin, "end": begin + blocks, "blocks": blocks, "total": total,
                         "pointers": " ".join(f"{name} = {name}_{t};" for name in inputs + outputs)})
        begin += blocks
    args += [a for a in first.args if a.name in scalars] + [Arg("int", "batch")]
    what, dtype, tag = p["family"]
    sizes = ", ".join(f"{spec.shapes.split(' -> ')[-1].split(';')[0]}" for spec in specs)
    params = {**p, "segments": segments, "seg_inputs": inputs, "seg_outputs": outputs, "segment_of": segment_of}
    return KernelSpec(name=f"{what}_{dtype}_{len(specs)}tensors{tag}", template="pointwise.cu.j2", params=params,
                      args=args, grid=(begin, 1, 1), block=(THREADS, 1, 1), restrict=False,
                      nodes=tuple(n for spec in specs for n in spec.nodes),
                      layers=tuple(dict.fromkeys(layer for spec in specs for layer in spec.layers)),
                      shapes=f"{len(specs)} tensors: {sizes}; each as the first: {first.shapes}")


# ---- concat and slice: copies between a tensor and a run of another's channels -------------------------
def split_dims(shape, axis):
    """(outer, size, inner) of a shape around one axis: the elements before, along and after it."""
    return numel(shape[:axis]), sp.sympify(shape[axis]), numel(shape[axis + 1:])


def run_index(outer_size, offset, inner, whole, i="j"):
    """Where element `i` of a tensor of `outer_size` x inner values per outer index (an [outer, size,
    inner] block) lies in another with `whole` x inner values per outer index, at `offset` along the axis."""
    span = outer_size * inner
    return f"({i} / ({c_int(span)})) * ({c_int(whole * inner)}) + ({c_int(offset * inner)}) + {i} % ({c_int(span)})"


@lowering("concat")
def lower_concat(ctx):
    """One copy kernel per input, each writing its run of the result's channels (coalesced along the
    inner axes on both sides; 4 elements a thread, loads first, as every pointwise kernel)."""
    out_shape = ctx.outs[0].shape
    axis = ctx.attrs["dim"] % len(out_shape)
    _, whole, inner = split_dims(out_shape, axis)
    a0 = sp.Symbol("a0", real=True)
    kernels, offset = [], sp.Integer(0)
    for i, (operand, value) in enumerate(zip(ctx.operands, ctx.ins)):
        _, size, _ = split_dims(value.shape, axis)
        spec = pointwise_kernel(ctx, a0, [value.shape], [operand], ctx.out_key(), value.shape,
                                f"concat{i}_of{len(ctx.operands)}_d{axis}", f"_at{dim_name(offset)}_of{dim_name(whole)}")
        spec.params["store_index"] = run_index(size, offset, inner, whole)
        kernels.append(spec)
        offset = offset + size
    return Lowered(kernels=kernels)


@lowering("slice")
def lower_slice(ctx):
    """out = x[..., start:stop, ...]: a copy of a run of x's channels (coalesced along the inner axes)."""
    x = ctx.ins[0]
    axis = ctx.attrs["dim"] % len(x.shape)
    _, whole, inner = split_dims(x.shape, axis)
    size = sp.Integer(ctx.attrs["stop"] - ctx.attrs["start"])
    a0 = sp.Symbol("a0", real=True)
    spec = pointwise_kernel(ctx, a0, [ctx.outs[0].shape], [ctx.operands[0]], ctx.out_key(), ctx.outs[0].shape,
                            f"slice_d{axis}", f"_{ctx.attrs['start']}to{ctx.attrs['stop']}_of{dim_name(whole)}")
    spec.params["loads"][0]["expr"] = f"a0[{run_index(size, sp.Integer(ctx.attrs['start']), inner, whole)}]"
    return Lowered(kernels=[spec])
