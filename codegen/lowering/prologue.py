"""Prologue fusion at the kernel level: the gradient a fused conv-activation-maxpool sends back
(pool_act_backward: act'(z at the argmax) * dy, routed to the argmax position) is never written at
full size when every reader can gather it on the fly from the pooled gradient, the uint8 argmax
codes and `aux`: the conv backward-data and backward-weight GEMMs (and the bias gradient's
reduction) compute

    g[b, c, o] = code[b, c, o / k] == (o % k) ? act'(aux[b, c, o / k]) * dy[b, c, o / k] : 0

while loading their tiles. With non-overlapping windows (stride = kernel, no padding, dilation 1)
every pre-pool position belongs to at most one window, so this is exact. The pool_act_backward node
then gets no kernel and no buffer."""
from __future__ import annotations

import math
import re

import sympy as sp

from graphconv.ops import OPS

from ..cprinter import c_expression
from . import flat

GATHERERS = {**{f"conv{nd}d_backward_data": 0 for nd in (1, 2, 3)},
             **{f"conv{nd}d_backward_weight": 1 for nd in (1, 2, 3)}}


def gathered_gradient(graph, name):
    """For a pool_act_backward node every user of which can gather it: what the gather needs."""
    node = graph.node(name)
    if node.op != "pool_act_backward":
        return None
    pool_op, items = node.attrs["pool"]
    pa = dict(items)
    k = list(pa["kernel_size"])
    if (list(pa["stride"]) != k or any(lo or hi for lo, hi in pa["padding"])
            or any(d != 1 for d in pa.get("dilation", (1,) * len(k)))):
        return None
    users = graph.users(name)
    rank = len(node.shape)
    whole_channel = (0, *range(2, rank))          # a bias gradient: everything but the channel summed

    def gathers(user, i):
        op = graph.node(user)
        if op.op == "reduce_sum":                 # the sum of g over a channel is the sum of act' * dy
            return tuple(op.attrs["axes"]) == whole_channel
        if GATHERERS.get(op.op) != i:
            return False
        # a data gradient under reflect / replicate / circular padding reads dy at several positions per
        # input position (padded_sources_load): it reads a stored g
        return i == 1 or op.attrs.get("padding_mode", "zeros") == "zeros"
    if not users or not all(gathers(u, i) for u, i in users):
        return None
    dpool, codes, aux = graph.operands(name)
    return {"node": name, "dpool": dpool, "codes": codes, "aux": aux, "act": node.attrs["act"], "k": k,
            "Sp": [int(d) for d in graph.node(dpool).shape[2:]], "So": [int(d) for d in node.shape[2:]],
            "C": int(node.shape[1])}


def gather_lines(info, dtype, plane, coords) -> tuple[list, set]:
    """Lines setting `v` to g at (plane = b * C + c, spatial coords), and the device functions used."""
    shared, lines, used = gather_shared_lines(info, dtype, plane, coords)
    return shared + lines, used


def gather_shared_lines(info, dtype, plane, coords) -> tuple[list, list, set]:
    """gather_lines in two parts: what depends on the coordinates alone (the pooled position, whether
    it exists, the window offset the code must name), which load slots reading the same coordinates
    for different planes compute once, and the lines per plane."""
    k, Sp = info["k"], info["Sp"]
    P = math.prod(Sp)
    shared = [f"const int gp{d} = ({c}) / {k[d]};" for d, c in enumerate(coords)]
    offset = " + ".join(f"(({c}) % {k[d]}) * {math.prod(k[d + 1:])}" for d, c in enumerate(coords))
    shared += [f"const int gpos = {flat([f'gp{d}' for d in range(len(coords))], Sp)};", f"const bool gin = {' && '.join(f'gp{d} < {Sp[d]}' for d in range(len(coords)))};",
               f"const int gwant = {offset};"]
    temps, result, used = derivative_c(info, dtype)
    T = "float" if dtype == "float32" else "double"
    # the code, aux and dy of a pooled position are loaded together (one round trip to memory, not two:
    # aux and dy used to wait for the code's comparison; the window's other positions read the same
    # three values, from cache), then the derivative only where the code names this position
    lines = [f"const long long gi = ({plane}) * {P}LL + gpos;", "if (gin) {", "    const int gcv = gcode[gi];"]
    lines += [f"    {line}" for line in operand_loads(temps, result, T, "gi")]
    lines += ["    if (gcv == gwant) {"] + [f"        {t}" for t in temps] + [f"        v = {result};", "    }", "}"]
    return shared, lines, used


def gather_window_lines(info, dtype, plane, pooled) -> tuple[list, set]:
    """Lines setting `gcv` (the argmax code, -1 outside the pooled grid) and `gval` (act'(aux) * dy)
    of the pooled position `pooled` (coords) of plane `plane`: a whole window's gradient, the value at
    offset `gcv` and 0 at the others, from one load of each array (a stager writing the window's
    k0 x k1 positions does one gather, not one per position)."""
    Sp = info["Sp"]
    temps, result, used = derivative_c(info, dtype)
    T = "float" if dtype == "float32" else "double"
    inside = " && ".join(f"{c} < {Sp[d]}" for d, c in enumerate(pooled))
    lines = ["int gcv = -1;", f"{T} gval = 0;", f"if ({inside}) {{",
             f"    const long long gi = ({plane}) * {math.prod(Sp)}LL + {flat(pooled, Sp)};", "    gcv = gcode[gi];"]
    lines += [f"    {line}" for line in operand_loads(temps, result, T, "gi")]
    lines += [f"    {t}" for t in temps] + [f"    gval = {result};", "}"]
    return lines, used


def derivative_c(info, dtype, x="ga", dy="gd"):
    """act'(x) * dy as C (temporaries, expression, device functions used)."""
    op, items = info["act"]
    derivative = OPS[op].derivative(0)
    expr = derivative.expr.subs({s: sp.Float(v) for s, v in zip(derivative.param_symbols, dict(items).values())})
    return c_expression(expr, dtype, {"x": x, "dy": dy})


def operand_loads(temps, result, T, index):
    """The loads of aux and dy at `index` that the derivative's C text reads (a derivative such as
    that of 2*x reads no aux), one declaration per line."""
    text = " ".join(temps) + " " + result
    return [f"const {T} {var} = {array}[{index}];" for var, array in (("ga", "gaux"), ("gd", "gdy"))
            if re.search(rf"\b{var}\b", text)]
