"""conv1d / conv2d / conv3d: PyTorch's semantics (stride, padding incl. 'same', dilation, groups,
padding modes), weight [C_out, C_in/groups, K...], optional bias [C_out]."""
from __future__ import annotations

import math

import numpy as np
import sympy as sp

from ..errors import GraphError, OpError
from ..shapes import fmt_dim, fmt_shape, numel, provably_ne, provably_true
from .base import Op, register, rank_error
from .window import AXES, LAYOUT, pad_array, padding_pairs, per_axis, resolve_same, sliding_windows, window_shape

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class Conv(Op):
    kind = "opaque"
    operands = ("input", "weight", "bias")
    optional = ("bias",)
    param_operands = ("weight", "bias")

    def __init__(self, nd):
        self.nd = nd
        self.name = f"conv{nd}d"
        self.attrs = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "padding_mode": "zeros"}

    def normalize(self, a):
        nd = self.nd
        out = {
            "stride": per_axis(a["stride"], nd, "stride", 1),
            "padding": padding_pairs(a["padding"], nd),
            "dilation": per_axis(a["dilation"], nd, "dilation", 1),
            "groups": per_axis(a["groups"], 1, "groups", 1)[0],
            "padding_mode": a["padding_mode"],
        }
        if out["padding_mode"] not in PADDING_MODES:
            raise OpError(f"padding_mode must be one of {', '.join(PADDING_MODES)}, got {a['padding_mode']!r}",
                          kind=GraphError)
        if out["padding"] == "same" and any(s != 1 for s in out["stride"]):
            raise OpError("padding='same' needs stride 1 (as in PyTorch), got stride "
                          f"{a['stride']}", kind=GraphError)
        return out

    def kernel(self, weight_shape):
        return tuple(int(k) for k in weight_shape[2:])

    def pads(self, attrs, weight_shape):
        return resolve_same(attrs["padding"], self.kernel(weight_shape), attrs["dilation"])

    def shape(self, ins, attrs):
        nd, x, w = self.nd, ins[0], ins[1]
        if len(x.shape) != nd + 2:
            raise rank_error(self.name, nd + 2, LAYOUT[nd], x)
        if len(w.shape) != nd + 2:
            raise rank_error(self.name, nd + 2, "weight [C_out, C_in/groups, K...]", w, 1)
        if not all(sp.sympify(k).is_Integer for k in w.shape):
            raise OpError(f"weight shape {fmt_shape(w.shape)} must be concrete", 1)
        groups = attrs["groups"]
        c_in, c_out, c_per_group = x.shape[1], w.shape[0], w.shape[1]
        if provably_ne(c_in, c_per_group * groups):
            per = f" ({fmt_dim(c_per_group)} per group x {groups} groups)" if groups != 1 else ""
            raise OpError(f"input has {fmt_dim(c_in)} channels, weight expects {fmt_dim(c_per_group * groups)}{per}")
        if int(c_out) % groups:
            raise OpError(f"groups={groups} does not divide out_channels={c_out}", 1)
        if len(ins) > 2 and (len(ins[2].shape) != 1 or provably_ne(ins[2].shape[0], c_out)):
            raise OpError(f"bias must have shape [{c_out}], got {fmt_shape(ins[2].shape)}", 2)
        kernel, pads = self.kernel(w.shape), self.pads(attrs, w.shape)
        if attrs["padding_mode"] != "zeros":
            self._check_mode_padding(x.shape[2:], pads, attrs["padding_mode"])
        spatial = window_shape(self.name, x.shape[2:], kernel, attrs["stride"], pads, attrs["dilation"])
        return (x.shape[0], c_out, *spatial)

    def _check_mode_padding(self, spatial, pads, mode):
        for axis, size, (lo, hi) in zip(AXES[self.nd], spatial, pads):
            limit = size - 1 if mode == "reflect" else size
            if provably_true(sp.Gt(max(lo, hi), limit)):
                raise OpError(f"{mode} padding {max(lo, hi)} along {axis} needs an input of at least "
                              f"{max(lo, hi) + (mode == 'reflect')}, got {fmt_dim(size)}")

    def reference(self, xs, attrs):
        x, w = xs[0], xs[1]
        b = xs[2] if len(xs) > 2 else None
        return conv_nd(x, w, b, attrs["stride"], self.pads(attrs, w.shape), attrs["dilation"],
                       attrs["groups"], attrs["padding_mode"])

    def macs(self, ins, out, attrs):
        w = ins[1].shape
        per_output = numel(w[1:])  # C_in/groups * prod(K)
        return numel(out.shape) * per_output


def conv_nd(x, w, b, stride, pads, dilation, groups, padding_mode="zeros"):
    """N-d cross-correlation as im2col + one batched matmul per group (BLAS, no pixel loops)."""
    nd = x.ndim - 2
    kernel = w.shape[2:]
    xp = pad_array(x, pads, padding_mode)
    win = sliding_windows(xp, kernel, stride, dilation)           # N, C, O..., K...
    n, c = x.shape[:2]
    out_sp = win.shape[2:2 + nd]
    c_out, cg = w.shape[0], c // groups
    win = win.reshape(n, groups, cg, *out_sp, *kernel)
    perm = (1, 0, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd))
    cols = win.transpose(perm).reshape(groups, n * math.prod(out_sp), cg * math.prod(kernel))
    wm = w.reshape(groups, c_out // groups, cg * math.prod(kernel)).transpose(0, 2, 1)
    y = np.matmul(cols, wm)                                        # G, N*P, C_out/G
    y = y.reshape(groups, n, *out_sp, c_out // groups)
    y = np.moveaxis(y, -1, 1)                                      # G, C_out/G, N, O...
    y = y.transpose(2, 0, 1, *range(3, 3 + nd)).reshape(n, c_out, *out_sp)
    if b is not None:
        y = y + b.reshape((1, c_out) + (1,) * nd)
    return np.ascontiguousarray(y, dtype=x.dtype)


for _nd in (1, 2, 3):
    register(Conv(_nd))
