"""The window family: pooling forward (max, avg), its backward passes (max, avg, and the fused
activation + max-pool backward that routes through saved argmax codes), and the two weight
transforms of the fusion passes: fold_batch_norm and compose_conv_weights.

Every kernel is one thread per element of the tensor it writes, looping over a small window. The
backward passes are gathers: each input element visits the windows that can contain it, in the
order of the window's kernel offsets (row-major), and adds what each routes to it. That is the
order in which the NumPy reference (Pool.route) adds them, so no atomics are needed and the sums
come out the same on every run.

The window index map is the reference's (ops/pool.py): output o of an axis reads input
o*stride - pad_lo + r*dilation for kernel offset r, anything outside [0, size) being padding (-inf
for max, 0 for avg), the ceil_mode overhang included.
"""
from __future__ import annotations

import math

import sympy as sp

from graphconv.ops import OPS
from graphconv.ops.fused import expression_of
from graphconv.ops.pool import AVG_EXACT_WINDOW

from ..cprinter import c_expression, c_function_prelude, c_neg_inf as neg_inf
from ..spec import Arg, KernelSpec, Lowered
from .prologue import gathered_gradient
from . import c_int, lowering, numel, short_dtype
from .gemm import flat, in_bounds, ints, unflatten
from .pointwise import MAX_BLOCKS, THREADS

FULL_UNROLL = 64     # windows up to this many offsets are unrolled completely


def literal(value, T) -> str:
    return repr(float(value)) + ("f" if T == "float" else "")


class Window:
    """The geometry of one pooling op, as plain ints per spatial axis."""

    def __init__(self, pool_op, attrs, Si, So):
        nd = OPS[pool_op].nd
        self.mode = "max" if pool_op.startswith("max") else "avg"
        self.nd, self.Si, self.So = nd, list(Si), list(So)
        self.k, self.s = list(attrs["kernel_size"]), list(attrs["stride"])
        self.lo = [lo for lo, _ in attrs["padding"]]
        self.hi = [hi for _, hi in attrs["padding"]]
        self.d = list(attrs.get("dilation", (1,) * nd))
        self.ceil = attrs["ceil_mode"]
        self.count_include_pad = attrs.get("count_include_pad", True)
        self.divisor_override = attrs.get("divisor_override")
        self.G = math.prod(self.k)

    def disjoint(self) -> bool:
        """Whether no two windows share an element: each spans at most its stride on every axis."""
        return all((k - 1) * d + 1 <= s for k, d, s in zip(self.k, self.d, self.s))

    def whole_plane(self) -> bool:
        """Whether the one window of each plane is the plane itself: its elements are consecutive."""
        return (all(o == 1 for o in self.So) and self.k == self.Si and not any(self.lo) and not any(self.hi)
                and all(d == 1 for d in self.d))

    def leaves(self, axis) -> bool:
        """Whether some window reaches outside the input along `axis` (padding or ceil overhang)."""
        last = (self.So[axis] - 1) * self.s[axis] - self.lo[axis] + (self.k[axis] - 1) * self.d[axis]
        return self.lo[axis] > 0 or last >= self.Si[axis]

    def tag(self) -> str:
        """The kernel-name suffix for what differs from a plain window."""
        j = "x".join
        t = f"_k{j(map(str, self.k))}_s{j(map(str, self.s))}"
        if any(self.lo) or any(self.hi):
            same = self.lo == self.hi
            t += f"_p{j(map(str, self.lo))}" + ("" if same else f"-{j(map(str, self.hi))}")
        if any(d != 1 for d in self.d):
            t += f"_d{j(map(str, self.d))}"
        if self.ceil:
            t += "_ceil"
        if self.mode == "avg" and not self.count_include_pad:
            t += "_nopad"
        if self.mode == "avg" and self.divisor_override:
            t += f"_div{self.divisor_override}"
        return t

    def text(self) -> str:
        return (f"kernel {self.k}, stride {self.s}, padding lo {self.lo} hi {self.hi}, dilation {self.d}"
                f"{', ceil_mode' if self.ceil else ''}")

    # ---- C text -------------------------------------------------------------------------------
    def origin(self, out, prefix) -> list:
        """Lines: the window of output coordinates out[d] starts at input prefix{d}."""
        return [f"const int {prefix}{d} = {times(out[d], self.s[d])}{f' - {self.lo[d]}' if self.lo[d] else ''};"
                for d in range(self.nd)]

    def offset(self, var, origin, prefix) -> tuple:
        """(lines, inside): input coordinates prefix{d} of window offset `var` from `origin`, and the C
        test that they lie inside the input."""
        lines = unflatten(var, self.k, f"{prefix}r")
        lines += [f"const int {prefix}{d} = {origin}{d} + {times(f'{prefix}r{d}', self.d[d])};" for d in range(self.nd)]
        coords = [f"{prefix}{d}" for d in range(self.nd)]
        inside = in_bounds([coords[d] for d in range(self.nd) if self.leaves(d)],
                           [self.Si[d] for d in range(self.nd) if self.leaves(d)])
        return lines, inside, flat(coords, self.Si)

    def divisor(self, origin) -> tuple:
        """(lines, C divisor) of the avg window starting at `origin`: the padding counts iff
        count_include_pad, the ceil_mode overhang never (Pool.divisor)."""
        if self.divisor_override:
            return [], str(self.divisor_override)
        lines, factors = [], []
        for d in range(self.nd):
            lo, hi = (-self.lo[d], self.Si[d] + self.hi[d]) if self.count_include_pad else (0, self.Si[d])
            lines.append(f"const int n{d} = min({origin}{d} + {self.k[d]}, {hi}) - max({origin}{d}, {lo});")
            factors.append(f"n{d}")
        return lines, " * ".join(factors)

    def first_max(self, origin, src, T) -> list:
        """Lines: best and code = the value and kernel offset of the first maximum of the window at
        `origin` in `src` (NaN wins, as NumPy's argmax; padding is -inf)."""
        lines, inside, index = self.offset("f", origin, "m")
        load = f"{src}[{index}]" if inside == "true" else f"{inside} ? {src}[{index}] : {neg_inf(T)}"
        return [f"{T} best = {neg_inf(T)};", "int code = 0;", unroll(self.G), f"for (int f = 0; f < {self.G}; ++f) {{"] + \
               ["    " + line for line in lines] + \
               [f"    const {T} v = {load};",
                "    if (v > best || (v != v && best == best)) { best = v; code = f; }", "}"]


def times(var, factor) -> str:
    return var if factor == 1 else f"{var} * {factor}"


def unroll(G) -> str:
    return "#pragma unroll" if G <= FULL_UNROLL else "#pragma unroll 4"


def grid_for(total):
    return (sp.Min(sp.ceiling(total / THREADS), MAX_BLOCKS), 1, 1)


def dims(sizes) -> str:
    return "x".join(str(s) for s in sizes)


# ---- forward ------------------------------------------------------------------------------------
@lowering(*[f"{mode}_pool{nd}d" for mode in ("max", "avg") for nd in (1, 2, 3)])
def lower_pool(ctx):
    x, y = ctx.ins[0], ctx.outs[0]
    T = ctx.float_type
    w = Window(ctx.node.op, ctx.attrs, ints(x.shape[2:]), ints(y.shape[2:]))
    SiN, SoN = math.prod(w.Si), math.prod(w.So)
    if w.whole_plane() and SiN > AVG_EXACT_WINDOW:
        return Lowered(kernels=[plane_spec(ctx, w)])
    out_coords = unflatten("p", w.So, "o") + w.origin([f"o{d}" for d in range(w.nd)], "w")
    offset, inside, index = w.offset("e", "w", "i")
    if w.mode == "max":
        init = [f"{T} best = {neg_inf(T)};"]
        load = f"src[{index}]" if inside == "true" else f"{inside} ? src[{index}] : {neg_inf(T)}"
        element = [f"const {T} v = {load};",
                   "if (v > best || (v != v && best == best)) best = v;   // NaN wins, as in np.maximum"]
        finish = ["y[i] = best;"]
    else:
        wide = w.G > AVG_EXACT_WINDOW        # many terms: added in double, as the reference adds them
        A = "double" if wide else T
        init = [f"{A} sum = 0;"]
        element = [f"sum += src[{index}];" if inside == "true" else f"if ({inside}) sum += src[{index}];"]
        lines, divisor = w.divisor("w")
        finish = lines + [f"y[i] = ({T})(sum / (double)({divisor}));" if wide else f"y[i] = sum / ({T})({divisor});"]
    name = f"{ctx.node.op}_{short_dtype(ctx.dtype)}_c{c_int(x.shape[1])}_i{dims(w.Si)}{w.tag()}"
    total = numel(y.shape)
    spec = KernelSpec(name=name, template="pool.cu.j2",
                      params={"T": T, "threads": THREADS, "total": c_int(total), "in_size": SiN, "out_size": SoN,
                              "out_coords": out_coords, "init": init, "G": w.G, "unroll": unroll(w.G),
                              "offset": offset, "element": element, "finish": finish,
                              "what": f"{w.mode} over each window ({w.text()})",
                              "pad_value": "-inf" if w.mode == "max" else "0"},
                      args=[ctx.arg_in(0, "x"), ctx.arg_out(0, "y"), Arg("int", "batch")],
                      grid=grid_for(total), block=(THREADS, 1, 1))
    return Lowered(kernels=[spec])


def plane_spec(ctx, w):
    """A window that is the whole plane (a global pool): threads share a plane, reading it in
    consecutive runs, and combine their partial results in shared memory (pool_plane.cu.j2)."""
    x, y = ctx.ins[0], ctx.outs[0]
    T, P = ctx.float_type, w.G
    L = min(32, 1 << max(0, (P // 4).bit_length() - 1))      # at least 4 elements a thread, 32 at most
    if w.mode == "max":
        A, init = T, neg_inf(T)
        combine = "if (v > acc || (v != v && acc == acc)) acc = v;   // NaN wins, as in np.maximum"
        finish = "acc"
    else:
        A, init, combine = "double", "0", "acc += v;"
        finish = f"({T})(acc / (double)({w.divisor_override or P}))"
    total = numel(y.shape)
    name = f"{ctx.node.op}_{short_dtype(ctx.dtype)}_c{c_int(x.shape[1])}_i{dims(w.Si)}{w.tag()}_plane"
    return KernelSpec(name=name, template="pool_plane.cu.j2",
                      params={"T": T, "A": A, "threads": THREADS, "planes": c_int(total), "P": P, "L": L,
                              "PPB": THREADS // L, "init": init, "combine": combine, "finish": finish,
                              "size": 8 if T == "double" else 4, "wide": w.mode == "avg", "exact": AVG_EXACT_WINDOW,
                              "what": f"{w.mode} over each window ({w.text()}): the whole plane"},
                      args=[ctx.arg_in(0, "x"), ctx.arg_out(0, "y"), Arg("int", "batch")],
                      grid=(sp.Min(sp.ceiling(total / (THREADS // L)), MAX_BLOCKS), 1, 1), block=(THREADS, 1, 1),
                      barrier=True)


# ---- backward: gathers ----------------------------------------------------------------------------
def gather_spec(ctx, w, name, bases, contribution, args, what, prelude="", outer_unroll=None):
    """One thread per input element: for every kernel offset r (row-major), the window o with
    o*stride - pad + r*dilation == h, if it exists, adds `contribution` (lines reading window q).
    Where no two windows overlap (each spans at most its stride: 2 x 2 pools of stride 2) an element
    lies in at most one window, found by division instead of visiting every kernel offset, and its
    contribution's loads (dy, and the window or the saved code) issue together, once."""
    T = ctx.float_type
    SiN, SoN = math.prod(w.Si), math.prod(w.So)
    total = numel(ctx.outs[0].shape)
    disjoint = w.disjoint()
    visit = disjoint_visit(w) if disjoint else offsets_visit(w)
    window = [f"const int q = {flat([f'o{d}' for d in range(w.nd)], w.So)};"] + contribution
    return KernelSpec(name=name, template="pool_backward.cu.j2",
                      params={"T": T, "threads": THREADS, "total": c_int(total), "in_size": SiN, "out_size": SoN,
                              "in_coords": unflatten("h", w.Si, "h"), "bases": bases, "G": w.G, "disjoint": disjoint,
                              "unroll": "" if disjoint else outer_unroll or unroll(w.G), "visit": visit,
                              "window": window, "what": what, "window_text": w.text(), "prelude": prelude},
                      args=args, grid=grid_for(total), block=(THREADS, 1, 1))


def offsets_visit(w) -> list:
    """Lines of the loop over kernel offsets e: the window o holding element h at offset e, and hit."""
    visit, hit = unflatten("e", w.k, "r"), []
    for d in range(w.nd):
        visit.append(f"const int t{d} = h{d}{f' + {w.lo[d]}' if w.lo[d] else ''} - {times(f'r{d}', w.d[d])};")
        if w.s[d] > 1:
            visit.append(f"const int o{d} = t{d} / {w.s[d]};")
            hit.append(f"t{d} >= 0 && t{d} % {w.s[d]} == 0 && o{d} < {w.So[d]}")
        else:
            visit.append(f"const int o{d} = t{d};")
            hit.append(f"t{d} >= 0 && o{d} < {w.So[d]}")
    return visit + [f"const bool hit = {' && '.join(hit)};"]


def disjoint_visit(w) -> list:
    """Lines finding the one window o that may hold element h (no two overlap), hit, and its offset e."""
    visit, hit = [], []
    for d in range(w.nd):
        visit.append(f"const int t{d} = h{d}{f' + {w.lo[d]}' if w.lo[d] else ''};")
        visit.append(f"const int o{d} = t{d} / {w.s[d]};" if w.s[d] > 1 else f"const int o{d} = t{d};")
        extent = (w.k[d] - 1) * w.d[d] + 1
        if w.s[d] > 1:
            visit.append(f"const int u{d} = t{d} - o{d} * {w.s[d]};   // offset in the window's stride cell")
            visit.append(f"const int r{d} = u{d}{f' / {w.d[d]}' if w.d[d] > 1 else ''};")
            cell = ([f"u{d} < {extent}"] if extent < w.s[d] else []) + ([f"u{d} % {w.d[d]} == 0"] if w.d[d] > 1 else [])
        else:
            visit.append(f"const int r{d} = 0;")
            cell = []
        hit.append(" && ".join([f"o{d} < {w.So[d]}"] + cell))     # t >= 0: h and the padding are
    return visit + [f"const bool hit = {' && '.join(hit)};",
                    f"const int e = {flat([f'r{d}' for d in range(w.nd)], w.k)};   // the element's kernel offset"]


@lowering(*[f"{mode}_pool{nd}d_backward" for mode in ("max", "avg") for nd in (1, 2, 3)])
def lower_pool_backward(ctx):
    T = ctx.float_type
    dx, dy = ctx.outs[0], ctx.ins[-1]
    pool_op = ctx.node.op[:-len("_backward")]
    w = Window(pool_op, ctx.attrs, ints(dx.shape[2:]), ints(dy.shape[2:]))
    SiN, SoN = math.prod(w.Si), math.prod(w.So)
    bases = [f"const {T}* g = dy + nc * {SoN};"]
    if w.mode == "max":
        bases.append(f"const {T}* src = x + nc * {SiN};")
        contribution = [f"const {T} gq = g[q];   // loaded with the window, not after the search"] + \
            w.origin([f"o{d}" for d in range(w.nd)], "w") + w.first_max("w", "src", T)
        contribution.append("if (code == e) acc += gq;   // this element is the window's first maximum")
        args = [ctx.arg_in(0, "x"), ctx.arg_in(1, "dy")]
        what = "dy routed to each window's first maximum (recomputed from x)"
    else:
        lines, divisor = w.divisor("w")
        contribution = w.origin([f"o{d}" for d in range(w.nd)], "w") + lines + \
            [f"acc += g[q] / ({T})({divisor});"]
        args = [ctx.arg_in(0, "dy")]
        what = "dy / divisor spread over each window"
    args += [ctx.arg_out(0, "dx"), Arg("int", "batch")]
    name = f"{ctx.node.op}_{short_dtype(ctx.dtype)}_c{c_int(dx.shape[1])}_i{dims(w.Si)}{w.tag()}"
    # the max gather searches a whole window per offset: unrolling both loops (G x G bodies) only
    # bloats the code (and makes ptxas spill), so the outer loop stays a loop
    outer = "#pragma unroll 1" if w.mode == "max" else None
    return Lowered(kernels=[gather_spec(ctx, w, name, bases, contribution, args, what, outer_unroll=outer)])


@lowering("pool_act_backward")
def lower_pool_act_backward(ctx):
    """act'(aux) * dy at each window's saved argmax, routed to that position (Pool.route); no kernel
    when every reader gathers it while loading its own tiles (lowering/prologue.py)."""
    if gathered_gradient(ctx.graph, ctx.node.name):
        return Lowered()
    T = ctx.float_type
    dx, dy = ctx.outs[0], ctx.ins[0]
    act, act_items = ctx.attrs["act"]
    pool_op, pool_items = ctx.attrs["pool"]
    w = Window(pool_op, dict(pool_items), ints(dx.shape[2:]), ints(dy.shape[2:]))
    derivative = OPS[act].derivative(0)
    expr = expression_of(derivative.name, dict(act_items),
                         [sp.Symbol("av", real=True), sp.Symbol("gv", real=True)])
    temps, result, used = c_expression(expr, ctx.dtype, {})
    SoN = math.prod(w.So)
    bases = [f"const {T}* g = dy + nc * {SoN};", f"const unsigned char* codes = argmax + nc * {SoN};",
             f"const {T}* a = aux + nc * {SoN};"]
    contribution = ["const int code = codes[q];", f"const {T} av = a[q];", f"const {T} gv = g[q];   // all three loaded together",
                    "if (code == e) {   // the saved argmax of window q is this element"] + \
                   ["    " + t for t in temps] + [f"    acc += {result};", "}"]
    args = [ctx.arg_in(0, "dy"), ctx.arg_in(1, "argmax"), ctx.arg_in(2, "aux"), ctx.arg_out(0, "dx"),
            Arg("int", "batch")]
    name = f"pool_act_backward_{act}_{pool_op}_{short_dtype(ctx.dtype)}_c{c_int(dx.shape[1])}_i{dims(w.Si)}{w.tag()}"
    if act_items:
        from ..cache import digest
        name += "_" + digest(repr(act_items))[:6]
    what = f"{derivative.expr} (x = aux, dy) at each window's saved argmax, routed there"
    return Lowered(kernels=[gather_spec(ctx, w, name, bases, contribution, args, what,
                                        prelude=c_function_prelude(used, ctx.dtype))])


# ---- fold_batch_norm ------------------------------------------------------------------------------
@lowering("fold_batch_norm")
def lower_fold_batch_norm(ctx):
    """W' = W * scale[c], b' = (b - mean) * scale + beta, scale = gamma / sqrt(var + eps): one thread
    per weight element; the first element of each output channel also writes its bias."""
    T = ctx.float_type
    attrs = ctx.attrs
    names = ["w"] + (["b"] if attrs["conv_bias"] else []) + ["mean", "var"] + \
            (["gamma", "beta"] if attrs["affine"] else [])
    weight = ctx.ins[0]
    C = int(weight.shape[0])
    inner = int(numel(weight.shape[1:]))
    sqrt = "sqrtf" if T == "float" else "sqrt"
    scale = f"({T})1 / {sqrt}(var[c] + {literal(attrs['eps'], T)})"
    if attrs["affine"]:
        scale = f"gamma[c] * ({scale})"
    bias = ("(b[c] - mean[c])" if attrs["conv_bias"] else "(-mean[c])") + " * scale" + \
           (" + beta[c]" if attrs["affine"] else "")
    args = [ctx.arg_in(i, n) for i, n in enumerate(names)] + [ctx.arg_out(0, "w_out"), ctx.arg_out(1, "b_out"),
                                                               Arg("int", "batch")]
    name = (f"fold_batch_norm_{short_dtype(ctx.dtype)}_k{C}_r{inner}" + ("" if attrs["conv_bias"] else "_nobias")
            + ("" if attrs["affine"] else "_noaffine"))
    spec = KernelSpec(name=name, template="fold_batch_norm.cu.j2",
                      params={"T": T, "threads": THREADS, "total": C * inner, "inner": inner, "scale": scale,
                              "bias": bias, "eps": attrs["eps"]},
                      args=args, grid=(math.ceil(C * inner / THREADS), 1, 1), block=(THREADS, 1, 1))
    return Lowered(kernels=[spec])


# ---- compose_conv_weights -------------------------------------------------------------------------
@lowering("compose_conv_weights")
def lower_compose_conv_weights(ctx):
    """W[o, i, t] = sum over (j, m) with j*d2*s1 + k*d1 = t of w2[o, m, j] * w1[m, i, k] and
    b[o] = b2[o] + sum over (m, j) of w2[o, m, j] * b1[m] (ComposeConvWeights): one thread per
    composed weight, one running sum over j (outer) and m (inner); the reference sums over m per j
    first, so the results agree to rounding, not bit for bit. The first weight of each output
    channel also writes its bias."""
    T = ctx.float_type
    attrs = ctx.attrs
    op = OPS["compose_conv_weights"]
    names = ["w1"] + (["b1"] if attrs["bias1"] else []) + ["w2"] + (["b2"] if attrs["bias2"] else [])
    w1, _, w2, _ = op.split(ctx.ins, attrs)
    O, M, I = int(w2.shape[0]), int(w1.shape[0]), int(w1.shape[1])
    K1, K2 = ints(w1.shape[2:]), ints(w2.shape[2:])
    Kc = ints(ctx.outs[0].shape[2:])
    nd = len(K1)
    K1N, K2N, KcN = math.prod(K1), math.prod(K2), math.prod(Kc)
    step = [d2 * s1 for d2, s1 in zip(attrs["dilation2"], attrs["stride1"])]
    d1 = list(attrs["dilation1"])
    body = unflatten("t", Kc, "t") + [f"{T} acc = 0;", f"for (int j = 0; j < {K2N}; ++j) {{"]
    body += [f"    {line}" for line in unflatten("j", K2, "j")]
    for d in range(nd):
        body.append(f"    const int u{d} = t{d} - j{d} * {step[d]};   // w1's offset along axis {d}, times its dilation")
    ok = " && ".join(f"u{d} >= 0" + (f" && u{d} % {d1[d]} == 0" if d1[d] > 1 else "") + f" && u{d} < {d1[d] * K1[d]}"
                     for d in range(nd))
    k = flat([f"u{d} / {d1[d]}" if d1[d] > 1 else f"u{d}" for d in range(nd)], K1)
    body += [f"    if (!({ok})) continue;", f"    const int k = {k};",
             f"    for (int m = 0; m < {M}; ++m) acc += w2[(o * {M} + m) * {K2N} + j] * w1[(m * {I} + i) * {K1N} + k];",
             "}", "w_out[e] = acc;"]
    bias = ["b2[o]" if attrs["bias2"] else f"({T})0"]
    bias_body = [f"{T} bias = {bias[0]};"]
    if attrs["bias1"]:
        bias_body += [f"for (int m = 0; m < {M}; ++m) {{", f"    {T} tap = 0;",
                      f"    for (int j = 0; j < {K2N}; ++j) tap += w2[(o * {M} + m) * {K2N} + j];",
                      "    bias += tap * b1[m];", "}"]
    bias_body.append("b_out[o] = bias;")
    total = O * I * KcN
    args = [ctx.arg_in(i, n) for i, n in enumerate(names)] + [ctx.arg_out(0, "w_out"), ctx.arg_out(1, "b_out"),
                                                               Arg("int", "batch")]
    kdims = "x".join(map(str, Kc))
    name = (f"compose_conv_weights_{short_dtype(ctx.dtype)}_k{O}_m{M}_c{I}_r{'x'.join(map(str, K1))}"
            f"_r{'x'.join(map(str, K2))}_to{kdims}" + ("" if attrs["bias1"] else "_nob1") +
            ("" if attrs["bias2"] else "_nob2"))
    if any(s > 1 for s in step + d1):
        name += f"_j{'x'.join(map(str, step))}_d{'x'.join(map(str, d1))}"
    spec = KernelSpec(name=name, template="compose_conv_weights.cu.j2",
                      params={"T": T, "threads": THREADS, "total": total, "inner": I * KcN, "KcN": KcN, "I": I,
                              "body": body, "bias_body": bias_body, "step": step, "d1": d1, "M": M, "K2N": K2N},
                      args=args, grid=(min(math.ceil(total / THREADS), MAX_BLOCKS), 1, 1), block=(THREADS, 1, 1))
    return Lowered(kernels=[spec])
