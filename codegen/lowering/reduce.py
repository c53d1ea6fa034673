"""The reduction family: reduce_sum, mean and batch norm (training statistics, normalisation,
gradients, running-statistics updates), all built on one deterministic two-pass scheme in one kernel.

A tensor is seen as [A, K, B]: K the kept values (channels), A and B the reduced axes before and
after them. The first pass adds, per k, a few terms (x, x*x, dy, dy*x, ...) over one chunk of the
A*B reduced positions per block, in double, and writes per-block partial sums to scratch; the second
adds each k's partials in a fixed order and runs an epilogue (a mean, a variance, the coefficients
of a normalisation), in the block (or thread) that finds itself the last of k's to arrive, by an
integer counter per k (LAST_BLOCK_FINISHES; else a finish kernel of its own). No float atomics:
the same bits on every run, whichever block arrives last. Where B > 1 the
threads of a block run along B (contiguous) for one k; where B == 1 ([N, F] summed over N) they run
along K instead, one column each, so every row read is coalesced either way.

What remains elementwise (normalising with the statistics, eval mode) is the pointwise family's
kernel over per-channel [C] vectors, with the expression written here in sympy.
"""
from __future__ import annotations

import math
import types

import sympy as sp

from graphconv.ops.fused import expression_of

from ..cprinter import c_function_prelude
from ..spec import Arg, KernelSpec, Lowered, Value
from . import advance_lines, c_int, dim_name, digit_lines, lowering, numel, short_dtype
from .prologue import derivative_c, gathered_gradient, operand_loads
from .pointwise import MAX_BLOCKS, pointwise_kernel, pointwise_steps, tag_of
from .window import literal

THREADS = 256
# reduced positions per block (B > 1): 4 per thread, all loads issued before the first add (the loop
# is unrolled), and blocks enough to keep every multiprocessor's loads in flight: with 16 per thread in
# a rolled loop, LeNet-5's bias gradients ran 200 blocks at batch 256 and reached 11-29% of the H200's
# copy bandwidth (latency-bound: one load per thread in flight)
PER_THREAD = 4
CHUNK = THREADS * PER_THREAD
ROWS = 64                # rows per block (B == 1)
# the chunks' partial sums added by the last block (B > 1) or thread (B == 1) of each k to arrive, in the
# same kernel: one launch where a finish kernel of its own (False) is two; the same bits either way
LAST_BLOCK_FINISHES = True


def dims_text(shape) -> str:
    return "x".join(dim_name(d) for d in shape[1:]) or "1"


def view_of(ctx, x, axes):
    """(A, K, B) for reducing `axes` of x: the kept axes must be one contiguous run."""
    kept = [i for i in range(len(x.shape)) if i not in axes]
    if kept and kept != list(range(kept[0], kept[-1] + 1)):
        raise ctx.fail(f"reduce_sum over axes {tuple(axes)} of a {len(x.shape)}-D tensor keeps axes {tuple(kept)}, "
                       f"which are not contiguous; only reductions whose kept axes form one run have a kernel")
    lo, hi = (kept[0], kept[-1] + 1) if kept else (0, 0)
    return numel(x.shape[:lo]), numel(x.shape[lo:hi]), numel(x.shape[hi:])


def channel_sums(ctx, name, *, A, K, B, loads, terms, in_args, epilogue, out_args, scratch=None, finish_tag=""):
    """The kernel adding `terms` per k of a tensor seen as [A, K, B]: partial sums per chunk, then the
    finish of each k by the last of its chunks to arrive (LAST_BLOCK_FINISHES; else two kernels).

    loads:    lines reading element `idx` (and per-channel values of `k`), double or T
    terms:    double C expressions of the loaded values, summed as tot0, tot1, ...
    epilogue: lines of the finish kernel, per k, from tot0.. and the count `m` of reduced values
    in_args / out_args: the arguments of the partial / finish kernel besides the scratch
    finish_tag: added to the name of the kernel that runs the epilogue (what the epilogue alone adds)
    """
    NT = len(terms)
    A, K, B = sp.sympify(A), sp.sympify(K), sp.sympify(B)
    partial_key = ctx.scratch_key("partial")
    if B == 1:
        lanes = THREADS if not K.is_Integer else max(32, min(THREADS, 1 << (int(K) - 1).bit_length()))
        S = sp.ceiling(A / ROWS)
        S_text = c_int(S)
        template, grid, block = "column_partial.cu.j2", (sp.ceiling(K / lanes), S, 1), (lanes, 1, 1)
        params = {"threads": lanes, "rows": ROWS, "A": c_int(A), "S": S_text}
        barrier = False
    else:
        S = sp.ceiling(A * B / CHUNK)
        S_text = c_int(S)
        # one block per (k, chunk), both on grid x: k can grow with the batch past grid y's 65535
        template, grid, block = "channel_partial.cu.j2", (S * K, 1, 1), (THREADS, 1, 1)
        params = {"threads": THREADS, "chunk": CHUNK, "per_thread": PER_THREAD, "M": c_int(A * B), "B": c_int(B),
                  "S": S_text, "start": [], "advance": []}
        if B.is_Integer:    # (a, b) of j kept as digits, advanced by the block's stride with carries
            params["start"] = digit_lines("j0", (None, int(B)), lambda d: f"int jd{d}")
            params["advance"] = advance_lines("jd", (None, int(B)), THREADS)
        barrier = True
    params.update(prelude="", K=c_int(K), NT=NT, loads=loads, terms=terms, what=", ".join(terms), view=f"[{c_int(A)}, {c_int(K)}, {c_int(B)}]")
    values = {partial_key: Value((S * K * NT,), "float64"), **(scratch or {})}
    if LAST_BLOCK_FINISHES:
        arrived = ctx.scratch_key("arrived")
        args = in_args + [Arg("double*", "partial", partial_key)] + out_args + \
            [Arg("unsigned*", "arrived", arrived), Arg("int", "batch")]
        names = [arg.name for arg in args]
        assert len(set(names)) == len(names), names
        params["finish"] = epilogue
        values[arrived] = Value((K,), "uint32", zeroed=True)
        return [KernelSpec(name=name + finish_tag, template=template, params=params, args=args, grid=grid,
                           block=block, barrier=barrier)], values
    params["finish"] = []
    partial = KernelSpec(name=name + "_partial", template=template, params=params,
                         args=in_args + [Arg("double*", "partial", partial_key), Arg("int", "batch")],
                         grid=grid, block=block, barrier=barrier)
    finish = KernelSpec(name=name + finish_tag + "_finish", template="channel_finish.cu.j2",
                        params={"threads": THREADS, "K": c_int(K), "S": S_text, "NT": NT, "m": c_int(A * B),
                                "epilogue": epilogue},
                        args=[Arg("const double*", "partial", partial_key)] + out_args + [Arg("int", "batch")],
                        grid=(sp.Min(sp.ceiling(K / THREADS), MAX_BLOCKS), 1, 1), block=(THREADS, 1, 1))
    return [partial, finish], values


# ---- reduce_sum -------------------------------------------------------------------------------------
@lowering("reduce_sum")
def lower_reduce_sum(ctx):
    x = ctx.ins[0]
    axes = ctx.attrs["axes"]
    T = ctx.float_type
    gathered = gathered_gradient(ctx.graph, ctx.operands[0])
    if gathered:
        # the bias gradient of a fused conv-activation-maxpool: each pooled gradient lands on exactly
        # one position of its window, so the channel's sum is the sum of act'(aux) * dy over the
        # pooled tensor; the full-size gradient is never read (it is never written either)
        P = sp.Integer(math.prod(gathered["Sp"]))
        temps, result, used = derivative_c(gathered, ctx.dtype)
        loads = operand_loads(temps, result, T, "idx") + temps + [f"const double xv = {result};"]
        name = f"reduce_sum_{gathered['act'][0]}_grad_gathered_{short_dtype(ctx.dtype)}_{dims_text(x.shape)}"
        kernels, scratch = channel_sums(ctx, name, A=x.shape[0], K=x.shape[1], B=P, loads=loads, terms=["xv"],
                                        in_args=[Arg(f"const {T}*", "gdy", gathered["dpool"]),
                                                 Arg(f"const {T}*", "gaux", gathered["aux"])],
                                        epilogue=[f"out[k] = ({T})tot0;"], out_args=[ctx.arg_out(0, "out")])
        kernels[0].params["prelude"] = c_function_prelude(used, ctx.dtype)
        return Lowered(kernels=kernels, scratch=scratch)
    return sum_over_axes(ctx, "reduce_sum", axes, f"out[k] = ({T})tot0;")


def sum_over_axes(ctx, what, axes, finish):
    """The kernel(s) summing operand 0 over `axes` (kept axes one run), `finish` storing each k."""
    x = ctx.ins[0]
    A, K, B = view_of(ctx, x, axes)
    name = f"{what}_{short_dtype(ctx.dtype)}_{dims_text(x.shape)}_a{''.join(map(str, axes))}"
    kernels, scratch = channel_sums(ctx, name, A=A, K=K, B=B, loads=["const double xv = x[idx];"], terms=["xv"],
                                    in_args=[ctx.arg_in(0, "x")], epilogue=[finish], out_args=[ctx.arg_out(0, "out")])
    return Lowered(kernels=kernels, scratch=scratch)


# ---- mean -------------------------------------------------------------------------------------------
@lowering("mean")
def lower_mean(ctx):
    """reduce_sum's kernel(s) with the finish dividing by the count of reduced values."""
    from graphconv.ops.layout import mean_axes
    return sum_over_axes(ctx, "mean", mean_axes(ctx.attrs, len(ctx.ins[0].shape)),
                         f"out[k] = ({ctx.float_type})(tot0 / (double)m);")


@lowering("mean_grad")
def lower_mean_grad(ctx):
    """dy / count broadcast over the reduced axes: element i of the [A, K, B] result reads dy[(i / B) % K]."""
    from graphconv.ops.layout import mean_axes
    x = ctx.ins[0]
    axes = mean_axes(ctx.attrs, len(x.shape))
    A, K, B = view_of(ctx, x, axes)
    a0 = sp.Symbol("a0", real=True)
    spec = pointwise_kernel(ctx, a0 / (A * B) if (A * B).is_Integer else a0 * sp.Symbol("inv_count", real=True),
                            [(K,)], [ctx.operands[1]], ctx.out_key(), x.shape,
                            f"mean_grad_a{''.join(map(str, axes))}")
    index = "0" if K == 1 else (f"(j / ({c_int(B)})) % ({c_int(K)})" if B != 1 else f"j % ({c_int(K)})")
    spec.params["loads"][0]["expr"] = f"a0[{index}]"
    if not (A * B).is_Integer:       # a count that grows with the batch: computed once per thread
        spec.params["loads"].append({"var": "inv_count", "scalar": True,
                                     "expr": f"(({spec.params['T']})1 / ({spec.params['T']})({c_int(A * B)}))"})
    return Lowered(kernels=[spec])


# ---- batch norm -----------------------------------------------------------------------------------------
def bn_view(x):
    """(A, C, B) of an [N, C, ...] tensor, statistics per channel."""
    return x.shape[0], x.shape[1], numel(x.shape[2:])


def bn_name(ctx, what):
    x = ctx.ins[0]
    return f"{what}_{short_dtype(ctx.dtype)}_c{c_int(x.shape[1])}" + \
        (f"_i{'x'.join(dim_name(d) for d in x.shape[2:])}" if len(x.shape) > 2 else "")


STATS = ["const double xv = x[idx];"]
MEAN_VAR = ["const double mean = tot0 / m;",
            "const double var = fmax(tot1 / m - mean * mean, 0.0);   // biased; sums in double: no cancellation to speak of"]


def vectors(ctx, *names):
    """Per-channel scratch vectors [C] of the node's float type: {name: key}, and their Values."""
    C = ctx.ins[0].shape[1]
    keys = {n: ctx.scratch_key(n) for n in names}
    return keys, {k: Value((C,), ctx.dtype) for k in keys.values()}


def a(i):
    return sp.Symbol(f"a{i}", real=True)


def activation_after(ctx):
    """The elementwise node of one operand (an activation) reading this node's result that the same
    kernel can compute too: of the result's shape and type, in no pointwise group (that kernel computes
    it). It comes after this node, since it reads it."""
    from .pointwise import is_pointwise, pointwise_groups
    graph = ctx.graph
    users = [u for u, _ in graph.users(ctx.node.name) if is_pointwise(graph, u)]
    if not users:
        return None
    grouped = {m for members in pointwise_groups(graph).values() for m in members}
    for user in users:
        node = graph.node(user)
        if (list(graph.operands(user)) == [ctx.node.name] and user not in grouped and node.dtype == ctx.dtype
                and tuple(map(str, node.shape)) == tuple(map(str, ctx.node.shape))):
            return user
    return None


def bn_update_siblings(ctx) -> dict:
    """The running-statistics updates a training batch_norm's sums already hold: {"mean" / "var":
    (the batch_norm_update_stats node of the same input and of the batch norm's own running buffer,
    that buffer, its momentum)}, where they come after it in the graph's order (the buffer is an
    operand of the batch norm: there before it runs). Each would otherwise read the input again in
    two kernels of its own (vgg_small: 24 launches a step and two more passes over each batch-norm
    layer's input)."""
    graph, name = ctx.graph, ctx.node.name
    order = {n.name: i for i, n in enumerate(graph.topo())}
    own = {"mean": ctx.operands[1], "var": ctx.operands[2]}      # the batch norm's own running buffers
    found = {}
    for user, _ in graph.users(ctx.operands[0]):
        node = graph.node(user)
        if (node.op == "batch_norm_update_stats" and order[user] > order[name] and node.dtype == ctx.dtype
                and list(graph.operands(user)) == [ctx.operands[0], own[node.attrs["stat"]]]):
            found.setdefault(node.attrs["stat"], (user, own[node.attrs["stat"]], float(node.attrs["momentum"])))
    return dict(sorted(found.items()))


@lowering("batch_norm")
def lower_batch_norm(ctx):
    """Training: statistics (two-pass), then y = (x - mean) * scale + bias with scale = inv_std * w.
    Eval: one pointwise kernel with the running statistics."""
    x = ctx.ins[0]
    T = ctx.float_type
    eps = ctx.attrs["eps"]
    affine = len(ctx.operands) == 5
    if not ctx.attrs["training"]:
        expr = (a(0) - a(1)) / sp.sqrt(a(2) + sp.Float(eps))
        if affine:
            expr = expr * a(3) + a(4)
        shapes = [v.shape for v in ctx.ins]
        k = pointwise_kernel(ctx, expr, shapes, ctx.operands, ctx.out_key(), x.shape, "batch_norm_eval",
                             f"_eps{eps:g}".replace("-", "m").replace(".", "p"))
        return Lowered(kernels=[k])
    A, C, B = bn_view(x)
    keys, vecs = vectors(ctx, "mean", "scale")
    epilogue = MEAN_VAR + [f"const double inv_std = 1.0 / sqrt(var + (double)({literal(eps, T)}));",
                           f"mean_out[k] = ({T})mean;",
                           f"scale_out[k] = ({T})(inv_std{' * w[k]' if affine else ''});"]
    out_args = ([ctx.arg_in(3, "w")] if affine else []) + [Arg(f"{T}*", "mean_out", keys["mean"]),
                                                           Arg(f"{T}*", "scale_out", keys["scale"])]
    # the running statistics' updates from the same sums, where the training step asks for them
    updates = bn_update_siblings(ctx)
    for stat, (node, running, mom) in updates.items():
        value = "mean" if stat == "mean" else "(var * (m / fmax(m - 1.0, 1.0)))"
        epilogue.append(f"running_{stat}_out[k] = ({T})((1.0 - {mom!r}) * running_{stat}[k] + {mom!r} * {value});"
                        f"   // batch_norm_update_stats{', unbiased' if stat == 'var' else ''}")
        out_args += [Arg(f"const {T}*", f"running_{stat}", running), Arg(f"{T}*", f"running_{stat}_out", node)]
    tag = "".join(f"_r{stat}{mom:g}".replace(".", "p").replace("-", "m") for stat, (_, _, mom) in updates.items())
    kernels, scratch = channel_sums(ctx, bn_name(ctx, "batch_norm_stats"), A=A, K=C, B=B, loads=STATS,
                                    terms=["xv", "xv * xv"], in_args=[ctx.arg_in(0, "x")], epilogue=epilogue,
                                    out_args=out_args, scratch=vecs, finish_tag=tag)
    stat_nodes = tuple(node for node, _, _ in updates.values())
    scratch.update({node: Value((C,), ctx.dtype) for node in stat_nodes})
    finish = kernels[-1]                 # the kernel that writes the running statistics
    if stat_nodes:
        finish.nodes = (ctx.node.name,) + stat_nodes
    expr = (a(0) - a(1)) * a(2) + (a(3) if affine else 0)
    operands = [ctx.operands[0], keys["mean"], keys["scale"]] + ([ctx.operands[4]] if affine else [])
    shapes = [x.shape, (C,), (C,)] + ([(C,)] if affine else [])
    act = activation_after(ctx)
    if act is None:
        kernels.append(pointwise_kernel(ctx, expr, shapes, operands, ctx.out_key(), x.shape, "batch_norm_apply",
                                        "" if affine else "_noaffine"))
        return Lowered(kernels=kernels, scratch=scratch, absorbs=stat_nodes)
    # the activation after it in the same pass: y is stored (the backward pass reads it) and handed on
    # in a register, so the activation does not read it back
    node = ctx.graph.node(act)
    steps = [(expr, ctx.out_key()), (expression_of(node.op, node.attrs, [sp.Symbol("r0", real=True)]), act)]
    tag = ("" if affine else "_noaffine") + tag_of(types.SimpleNamespace(attrs=node.attrs))
    kernels.append(pointwise_steps(ctx, steps, shapes, operands, x.shape, f"batch_norm_apply_{node.op}", tag))
    for kernel in kernels:
        kernel.nodes = (ctx.node.name, act) + (stat_nodes if kernel is finish else ())
        kernel.layers = tuple(dict.fromkeys([ctx.layer, node.layer or ctx.layer]))
    scratch[act] = ctx.outs[0]
    return Lowered(kernels=kernels, scratch=scratch, absorbs=(act,) + stat_nodes)


GRAD_LOADS = ["const double xv = x[idx];", "const double gv = dy[idx];"]
GRAD_TERMS = ["xv", "xv * xv", "gv", "gv * xv"]


def bn_grad_siblings(ctx) -> dict:
    """The nodes whose values a training batch_norm_grad_input's four sums already hold: {"weight":
    the batch_norm_grad_weight of the same x, statistics, dy and eps, "bias": a reduce_sum of dy over
    every axis but the channels}, where they come after it in the graph's order (so their readers do
    too). Each would otherwise read x and dy again (vgg_small: two more passes over each batch-norm
    layer's 8-67 MB)."""
    graph, name = ctx.graph, ctx.node.name
    order = {n.name: i for i, n in enumerate(graph.topo())}
    x, mean, var, dy = ctx.operands[:4]
    rank, C = len(ctx.ins[0].shape), ctx.ins[0].shape[1]
    found = {}
    for user, _ in graph.users(dy):
        node = graph.node(user)
        if order[user] <= order[name] or node.role != "op" or node.dtype != ctx.dtype:
            continue
        if (node.op == "batch_norm_grad_weight" and node.attrs.get("training") and node.attrs.get("eps") == ctx.attrs["eps"]
                and list(graph.operands(user)[:4]) == [x, mean, var, dy]):
            found.setdefault("weight", user)
        elif (node.op == "reduce_sum" and tuple(sorted(node.attrs["axes"])) == tuple(a for a in range(rank) if a != 1)
              and tuple(node.shape) == (C,)):
            found.setdefault("bias", user)
    return found


@lowering("batch_norm_grad_input")
def lower_batch_norm_grad_input(ctx):
    """Training: dx = w * inv_std * (dy - sum(dy)/m - (x - mean) * inv_std^2 * sum(dy * (x - mean))/m),
    the four sums (x, x^2, dy, dy*x) in one pass. Eval: dx = dy * w / sqrt(running_var + eps)."""
    x = ctx.ins[0]
    T = ctx.float_type
    eps = ctx.attrs["eps"]
    affine = len(ctx.operands) == 5
    if not ctx.attrs["training"]:
        expr = a(0) / sp.sqrt(a(1) + sp.Float(eps)) * (a(2) if affine else 1)
        operands = [ctx.operands[3], ctx.operands[2]] + ([ctx.operands[4]] if affine else [])
        shapes = [x.shape, (x.shape[1],)] + ([(x.shape[1],)] if affine else [])
        k = pointwise_kernel(ctx, expr, shapes, operands, ctx.out_key(), x.shape, "batch_norm_grad_input_eval",
                             f"_eps{eps:g}".replace("-", "m").replace(".", "p"))
        return Lowered(kernels=[k])
    A, C, B = bn_view(x)
    keys, vecs = vectors(ctx, "mean", "gain", "shift", "slope")
    epilogue = MEAN_VAR + [
        f"const double inv_std = 1.0 / sqrt(var + (double)({literal(eps, T)}));",
        "const double sum_dy_xc = tot3 - mean * tot2;   // sum of dy * (x - mean)",
        f"mean_out[k] = ({T})mean;",
        f"gain_out[k] = ({T})(inv_std{' * w[k]' if affine else ''});",
        f"shift_out[k] = ({T})(tot2 / m);",
        f"slope_out[k] = ({T})(inv_std * inv_std * sum_dy_xc / m);"]
    out_args = ([ctx.arg_in(4, "w")] if affine else []) + \
        [Arg(f"{T}*", f"{n}_out", keys[n]) for n in ("mean", "gain", "shift", "slope")]
    # the weight's and the bias's gradients from the same sums, where the graph asks for them
    siblings = bn_grad_siblings(ctx)
    if "weight" in siblings:
        epilogue.append(f"dweight_out[k] = ({T})(inv_std * sum_dy_xc);   // batch_norm_grad_weight, from the same sums")
        out_args.append(Arg(f"{T}*", "dweight_out", siblings["weight"]))
    if "bias" in siblings:
        epilogue.append(f"dbias_out[k] = ({T})tot2;   // the bias gradient: the sum of dy")
        out_args.append(Arg(f"{T}*", "dbias_out", siblings["bias"]))
    tag = "".join(f"_d{k[0]}" for k in ("weight", "bias") if k in siblings)
    kernels, scratch = channel_sums(ctx, bn_name(ctx, "batch_norm_grad_stats") + tag, A=A, K=C, B=B, loads=GRAD_LOADS,
                                    terms=GRAD_TERMS, in_args=[ctx.arg_in(0, "x"), ctx.arg_in(3, "dy")],
                                    epilogue=epilogue, out_args=out_args, scratch=vecs)
    absorbs = tuple(siblings.values())
    for kernel in kernels:
        kernel.nodes = (ctx.node.name,) + absorbs
        kernel.layers = tuple(dict.fromkeys([ctx.layer] + [ctx.graph.node(n).layer or ctx.layer for n in absorbs]))
    scratch.update({node: Value((C,), ctx.dtype) for node in absorbs})
    # a0 = dy, a1 = x, a2 = mean, a3 = gain, a4 = shift, a5 = slope
    expr = a(3) * (a(0) - a(4) - (a(1) - a(2)) * a(5))
    operands = [ctx.operands[3], ctx.operands[0]] + [keys[n] for n in ("mean", "gain", "shift", "slope")]
    shapes = [x.shape, x.shape] + [(C,)] * 4
    kernels.append(pointwise_kernel(ctx, expr, shapes, operands, ctx.out_key(), x.shape, "batch_norm_grad_input_apply"))
    return Lowered(kernels=kernels, scratch=scratch, absorbs=absorbs)


@lowering("batch_norm_grad_weight")
def lower_batch_norm_grad_weight(ctx):
    """sum over N and space of dy * (x - mean) * inv_std, with the batch's statistics (training) or
    the running ones (eval): sum(dy * x) - mean * sum(dy), in double."""
    x = ctx.ins[0]
    T = ctx.float_type
    eps = ctx.attrs["eps"]
    A, C, B = bn_view(x)
    if ctx.attrs["training"]:
        terms, stats = GRAD_TERMS, MEAN_VAR
        dy_sum, dyx_sum = "tot2", "tot3"
        out_args = []
    else:
        terms, dy_sum, dyx_sum = ["gv", "gv * xv"], "tot0", "tot1"
        stats = ["const double mean = running_mean[k];", "const double var = running_var[k];"]
        out_args = [ctx.arg_in(1, "running_mean"), ctx.arg_in(2, "running_var")]
    epilogue = stats + [f"const double inv_std = 1.0 / sqrt(var + (double)({literal(eps, T)}));",
                        f"out[k] = ({T})(inv_std * ({dyx_sum} - mean * {dy_sum}));"]
    kernels, scratch = channel_sums(ctx, bn_name(ctx, "batch_norm_grad_weight" + ("" if ctx.attrs["training"] else "_eval")),
                                    A=A, K=C, B=B, loads=GRAD_LOADS,
                                    terms=terms, in_args=[ctx.arg_in(0, "x"), ctx.arg_in(3, "dy")], epilogue=epilogue,
                                    out_args=out_args + [ctx.arg_out(0, "out")])
    return Lowered(kernels=kernels, scratch=scratch)


@lowering("batch_norm_update_stats")
def lower_batch_norm_update_stats(ctx):
    """(1 - momentum) * running + momentum * the batch's mean or unbiased variance."""
    x = ctx.ins[0]
    T = ctx.float_type
    mom, stat = ctx.attrs["momentum"], ctx.attrs["stat"]
    A, C, B = bn_view(x)
    if stat == "mean":
        terms, value = ["xv"], ["const double value = tot0 / m;"]
    else:
        terms, value = ["xv", "xv * xv"], MEAN_VAR + ["const double value = var * (m / fmax(m - 1.0, 1.0));   // unbiased"]
    epilogue = value + [f"out[k] = ({T})((1.0 - {float(mom)!r}) * running[k] + {float(mom)!r} * value);"]
    name = bn_name(ctx, f"batch_norm_update_{stat}") + f"_m{mom:g}".replace(".", "p").replace("-", "m")
    kernels, scratch = channel_sums(ctx, name, A=A, K=C, B=B, loads=STATS, terms=terms,
                                    in_args=[ctx.arg_in(0, "x")], epilogue=epilogue,
                                    out_args=[ctx.arg_in(1, "running"), ctx.arg_out(0, "out")])
    return Lowered(kernels=kernels, scratch=scratch)
