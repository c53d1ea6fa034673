"""adaptive pooling with windows of two sizes (graphconv.ops.adaptive): forward one thread per output
scanning its window, backward one thread per input gathering from the windows that hold it (max: a
first kernel records each window's argmax as the forward scan finds it, once per window). Bounds
from integer formulas."""
from __future__ import annotations

import math

import sympy as sp

from graphconv.ops import OPS
from graphconv.ops.adaptive import largest_window
from graphconv.ops.pool import AVG_EXACT_WINDOW

from ..cprinter import c_neg_inf
from ..spec import Arg, KernelSpec, Lowered, Value
from . import c_int, flat, lowering, numel, short_dtype
from .pointwise import MAX_BLOCKS, THREADS


def decode(sizes):
    """Lines splitting the flat index i into p0..p{nd-1} (row-major) and the plane nc."""
    lines = ["long long r = i;"]
    for k in range(len(sizes) - 1, -1, -1):
        lines.append(f"const int p{k} = (int)(r % {sizes[k]}); r /= {sizes[k]};")
    return lines + ["const long long nc = r;"]


def bounds(o, k, n_in, n_out):
    """C lines: the window [st{k}, en{k}) of output o along axis k."""
    return [f"const int st{k} = ({o} * {n_in}) / {n_out};", f"const int en{k} = (({o} + 1) * {n_in} + {n_out - 1}) / {n_out};"]


def scan(nd, n_in, mode, T, indent="", where=False, A=None):
    """C lines: m (and with `where` best, the flat index PyTorch's scan picks) or acc (of type A) over
    the window st..en."""
    lines = [f"{T} m = {c_neg_inf(T)};"] + ([f"long long best = {flat([f'st{k}' for k in range(nd)], n_in)};"]
                                           if where else []) if mode == "max" else [f"{A or T} acc = 0;"]
    for k in range(nd):
        lines.append("    " * k + f"for (int a{k} = st{k}; a{k} < en{k}; ++a{k}) {{")
    idx = flat([f"a{k}" for k in range(nd)], n_in)
    inner = "    " * nd
    if mode == "max":
        lines += ([inner + f"const long long at = {idx};", inner + f"const {T} v = xs[at];",
                   inner + "if (v > m || v != v) { m = v; best = at; }"] if where else
                  [inner + f"const {T} v = xs[{idx}];", inner + "if (v > m || v != v) m = v;"])
    else:
        lines.append(inner + f"acc += xs[{idx}];")
    lines += ["    " * k + "}" for k in range(nd - 1, -1, -1)]
    return [indent + line for line in lines]


@lowering(*[f"adaptive_{m}_pool{nd}d{b}" for m in ("avg", "max") for nd in (1, 2, 3) for b in ("", "_backward")])
def lower_adaptive_pool(ctx):
    op = OPS[ctx.node.op]
    nd, mode, T = op.nd, op.mode, ctx.float_type
    backward = ctx.node.op.endswith("_backward")
    n_out = list(ctx.attrs["output_size"])
    n_in = [int(d) for d in (ctx.outs[0].shape[2:] if backward else ctx.ins[0].shape[2:])]
    in_plane, out_plane = math.prod(n_in), math.prod(n_out)
    sizes = ", ".join(f"{i}->{o}" for i, o in zip(n_in, n_out))
    name = (f"{ctx.node.op}_{short_dtype(ctx.dtype)}_c{c_int(ctx.outs[0].shape[1])}_i{'x'.join(map(str, n_in))}"
            f"_o{'x'.join(map(str, n_out))}")
    # where the largest window has more than AVG_EXACT_WINDOW elements, every window adds in double (a
    # float32 running sum drifts), as the reference adds them
    wide = math.prod(largest_window(i, o) for i, o in zip(n_in, n_out)) > AVG_EXACT_WINDOW

    def forward_scan(store, where=False):
        """One thread per output: its window's bounds and scan, then `store`."""
        body = decode(n_out) + [f"const {T}* xs = x + nc * {in_plane}LL;"]
        for k in range(nd):
            body += bounds(f"p{k}", k, n_in[k], n_out[k])
        return body + scan(nd, n_in, mode, T, where=where, A="double" if wide else T) + [store]

    if not backward:
        count = " * ".join(f"(en{k} - st{k})" for k in range(nd))
        body = forward_scan("out[i] = m;" if mode == "max" else
                            f"out[i] = ({T})(acc / (double)({count}));" if wide else f"out[i] = acc / ({T})({count});")
        formula = "out[nc, o] = " + ("max over the window (a NaN propagates)" if mode == "max"
                                     else "mean over the window")
        return Lowered(kernels=[spec(name, body, formula, sizes, [ctx.arg_in(0, "x"), ctx.arg_out(0, "out")],
                                     numel(ctx.outs[0].shape), False)])
    kernels, scratch = [], {}
    body = decode(n_in) + [f"const {T}* g = dy + nc * {out_plane}LL;", f"{T} total_g = 0;"]
    if mode == "max":
        # each window's argmax once (per output), then each input gathers the windows that chose it:
        # an input no longer rescans every window that holds it
        key = ctx.scratch_key("argmax")
        scratch[key] = Value(ctx.ins[1].shape, "int64")
        kernels.append(spec(name + "_argmax", forward_scan("idx[i] = best;", where=True),
                            "idx[nc, o] = the position of the window's maximum (the first of equal maxima, the last NaN)",
                            sizes, [ctx.arg_in(0, "x"), Arg("long long*", "idx", key)], numel(ctx.ins[1].shape), False))
        body += [f"const long long* chosen = idx + nc * {out_plane}LL;",
                 f"const long long me = {flat([f'p{k}' for k in range(nd)], n_in)};"]
    for k in range(nd):
        body.append("    " * k + f"for (int o{k} = (p{k} * {n_out[k]}) / {n_in[k]}; "
                                f"o{k} < ((p{k} + 1) * {n_out[k]} + {n_in[k] - 1}) / {n_in[k]}; ++o{k}) {{")
        if mode == "avg":
            body += ["    " * (k + 1) + line for line in bounds(f"o{k}", k, n_in[k], n_out[k])]
    inner = "    " * nd
    gidx = flat([f"o{k}" for k in range(nd)], n_out)
    if mode == "max":
        body.append(inner + f"if (chosen[{gidx}] == me) total_g += g[{gidx}];")
        args = [Arg("const long long*", "idx", key), ctx.arg_in(1, "dy")]
    else:
        count = " * ".join(f"(en{k} - st{k})" for k in range(nd))
        body.append(inner + f"total_g += g[{gidx}] / ({T})({count});")
        args = [ctx.arg_in(0, "dy")]
    body += ["    " * k + "}" for k in range(nd - 1, -1, -1)] + ["dx[i] = total_g;"]
    formula = ("dx[nc, s] = sum of dy over the windows whose maximum is s (the first of equal maxima, the last NaN)"
               if mode == "max" else "dx[nc, s] = sum over the windows holding s of dy / window size")
    kernels.append(spec(name, body, formula, sizes, args + [ctx.arg_out(0, "dx")], numel(ctx.outs[0].shape), True))
    return Lowered(kernels=kernels, scratch=scratch)


def spec(name, body, formula, sizes, args, total, backward):
    params = {"threads": THREADS, "total": c_int(total), "body": body, "formula": formula, "sizes": sizes,
              "backward": backward}
    grid = (sp.Min(sp.ceiling(sp.sympify(total) / THREADS), MAX_BLOCKS), 1, 1)
    return KernelSpec(name=name, template="adaptive_pool.cu.j2", params=params, args=args + [Arg("int", "batch")],
                      grid=grid, block=(THREADS, 1, 1))

