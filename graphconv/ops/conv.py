"""conv1d / conv2d / conv3d: PyTorch's semantics (stride, padding incl. 'same', dilation, groups,
padding modes), weight [C_out, C_in/groups, K...], optional bias [C_out]."""
from __future__ import annotations

import math

import numpy as np
import sympy as sp

from ..errors import GraphError, OpError
from ..shapes import as_shape, fmt_dim, fmt_shape, numel, provably_ne, provably_true
from .base import REQUIRED, Op, register, rank_error
from .window import (AXES, LAYOUT, offset_slices, pad_array, padding_pairs, per_axis, resolve_same, sliding_windows,
                     unpad_adjoint, window_shape)

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

    def grad(self, e, dy, needs):
        x, w = e.inputs[0], e.inputs[1]
        common = {**e.attrs, "padding": self.pads(e.attrs, w.shape)}
        return [
            e.emit(f"{self.name}_backward_data", [dy, w], {**common, "input_size": x.shape[2:]}, wrt=0)
            if needs[0] else None,
            e.emit(f"{self.name}_backward_weight", [x, dy], {**common, "kernel_size": self.kernel(w.shape)}, wrt=1)
            if needs[1] else None,
            *([e.emit("reduce_sum", [dy], {"axes": (0, *range(2, self.nd + 2))}, wrt=2) if needs[2] else None]
              if len(needs) > 2 else []),
        ]


def im2col(x, kernel, stride, pads, dilation, groups, padding_mode="zeros"):
    """Columns (G, N*P, C/G * prod K) of the padded input: one row per output position."""
    nd = x.ndim - 2
    win = sliding_windows(pad_array(x, pads, padding_mode), kernel, stride, dilation)   # N, C, O..., K...
    n, c = x.shape[:2]
    out_sp = win.shape[2:2 + nd]
    win = win.reshape(n, groups, c // groups, *out_sp, *kernel)
    perm = (1, 0, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd))
    return win.transpose(perm).reshape(groups, n * math.prod(out_sp), -1), out_sp


def to_groups(y, groups):
    """(N, C, O...) -> (G, N*P, C/G): the layout of im2col's matmul result."""
    n, c = y.shape[:2]
    return np.moveaxis(y.reshape(n, groups, c // groups, -1), 2, 3).transpose(1, 0, 2, 3).reshape(groups, -1, c // groups)


def from_groups(y, n, out_sp):
    """(G, N*P, C/G) -> (N, C, O...)."""
    groups, _, cg = y.shape
    y = y.reshape(groups, n, math.prod(out_sp), cg).transpose(1, 0, 3, 2)
    return np.ascontiguousarray(y).reshape(n, groups * cg, *out_sp)


def conv_nd(x, w, b, stride, pads, dilation, groups, padding_mode="zeros"):
    """N-d cross-correlation as im2col + one batched matmul per group (BLAS, no pixel loops)."""
    cols, out_sp = im2col(x, w.shape[2:], stride, pads, dilation, groups, padding_mode)
    wm = w.reshape(groups, w.shape[0] // groups, -1).transpose(0, 2, 1)
    y = from_groups(np.matmul(cols, wm), x.shape[0], out_sp)
    if b is not None:
        y += b.reshape((1, -1) + (1,) * len(out_sp))
    return y.astype(x.dtype, copy=False)


def conv_backward_weight(x, dy, kernel, stride, pads, dilation, groups, padding_mode="zeros"):
    """dL/dW = columns^T @ dy per group."""
    cols, _ = im2col(x, kernel, stride, pads, dilation, groups, padding_mode)
    dw = np.matmul(cols.transpose(0, 2, 1), to_groups(dy, groups))          # G, C/G*K, C_out/G
    c_out = dy.shape[1]
    return np.ascontiguousarray(dw.transpose(0, 2, 1)).reshape(c_out, x.shape[1] // groups, *kernel)


def conv_backward_data(dy, w, input_spatial, stride, pads, dilation, groups, padding_mode="zeros"):
    """dL/dx, a transposed convolution: per kernel offset, W_k^T @ dy (one batched matmul gives all
    offsets at once, laid out offset-major), added onto the strided positions that offset read in
    the forward pass; then folded through the padding."""
    n, c_out = dy.shape[:2]
    kernel, out_sp = w.shape[2:], dy.shape[2:]
    cg, cog = w.shape[1], c_out // groups
    wk = w.reshape(groups, cog, cg, math.prod(kernel)).transpose(0, 3, 2, 1)          # G, K, C/G, C_out/G
    dyg = np.ascontiguousarray(dy.reshape(n, groups, cog, -1).transpose(1, 2, 0, 3))  # G, C_out/G, N, P
    dcols = np.matmul(wk, dyg.reshape(groups, 1, cog, -1))                             # G, K, C/G, N*P
    padded = [size + lo + hi for size, (lo, hi) in zip(input_spatial, pads)]
    dxp = np.zeros((groups, cg, n, *padded), dy.dtype)                                 # channel-major
    for k, offset in enumerate(np.ndindex(*kernel)):
        dxp[(slice(None),) + offset_slices(offset, stride, dilation, out_sp)] += \
            dcols[:, k].reshape(groups, cg, n, *out_sp)
    dxp = dxp.reshape(groups * cg, n, *padded).swapaxes(0, 1)
    return unpad_adjoint(dxp, pads, padding_mode, input_spatial)


class ConvBackwardData(Op):
    """dL/d(input) of conv{nd}d: operands (grad_output, weight)."""
    operands = ("grad_output", "weight")

    def __init__(self, nd):
        self.nd, self.name = nd, f"conv{nd}d_backward_data"
        self.attrs = {"stride": REQUIRED, "padding": REQUIRED, "dilation": REQUIRED, "groups": REQUIRED,
                      "padding_mode": REQUIRED, "input_size": REQUIRED}

    def normalize(self, a):
        return {**Conv(self.nd).normalize(a), "input_size": as_shape(a["input_size"], "input_size")}

    def shape(self, ins, attrs):
        dy, w = ins
        spatial = window_shape(self.name, attrs["input_size"], Conv(self.nd).kernel(w.shape), attrs["stride"],
                               attrs["padding"], attrs["dilation"])
        if any(provably_ne(a, b) for a, b in zip(spatial, dy.shape[2:])):
            raise OpError(f"grad_output {fmt_shape(dy.shape)} does not match a conv of input size "
                          f"{fmt_shape(attrs['input_size'])} (which gives {fmt_shape(spatial)})")
        return (dy.shape[0], w.shape[1] * attrs["groups"], *attrs["input_size"])

    def reference(self, xs, attrs):
        a = attrs
        return conv_backward_data(xs[0], xs[1], [int(d) for d in a["input_size"]], a["stride"], a["padding"],
                                  a["dilation"], a["groups"], a["padding_mode"])

    def macs(self, ins, out, attrs):
        return numel(ins[0].shape) * numel(ins[1].shape[1:])


class ConvBackwardWeight(Op):
    """dL/d(weight) of conv{nd}d: operands (input, grad_output)."""
    operands = ("input", "grad_output")

    def __init__(self, nd):
        self.nd, self.name = nd, f"conv{nd}d_backward_weight"
        self.attrs = {"stride": REQUIRED, "padding": REQUIRED, "dilation": REQUIRED, "groups": REQUIRED,
                      "padding_mode": REQUIRED, "kernel_size": REQUIRED}

    def normalize(self, a):
        return {**Conv(self.nd).normalize(a), "kernel_size": per_axis(a["kernel_size"], self.nd, "kernel_size", 1)}

    def shape(self, ins, attrs):
        x, dy = ins
        return (dy.shape[1], x.shape[1] // attrs["groups"], *attrs["kernel_size"])

    def reference(self, xs, attrs):
        a = attrs
        return conv_backward_weight(xs[0], xs[1], a["kernel_size"], a["stride"], a["padding"], a["dilation"],
                                    a["groups"], a["padding_mode"])

    def macs(self, ins, out, attrs):
        return numel(ins[1].shape) * numel(out.shape[1:])


for _nd in (1, 2, 3):
    register(Conv(_nd))
    register(ConvBackwardData(_nd))
    register(ConvBackwardWeight(_nd))
