"""conv1d / conv2d / conv3d: PyTorch's semantics (stride, padding incl. 'same', dilation, groups,
padding modes), weight [C_out, C_in/groups, K...], optional bias [C_out]; their gradients; and
conv_transpose1d / 2d / 3d, the adjoint of a conv, built from the same three passes."""
from __future__ import annotations

import math

import numpy as np
import sympy as sp

from ..errors import GraphError, OpError
from ..shapes import as_shape, fmt_dim, fmt_shape, numel, provably_ne, provably_true
from .base import REQUIRED, GradientOp, Op, register, rank_error
from .window import (AXES, LAYOUT, offset_slices, pad_array, padding_pairs, per_axis, resolve_same, unpad_adjoint,
                     window_shape)

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def check_ranks(op, ins, weight_layout):
    """(input, weight) types of a conv-like op: both nd + 2 dims, the weight's sizes concrete."""
    x, w = ins[0], ins[1]
    if len(x.shape) != op.nd + 2:
        raise rank_error(op.name, op.nd + 2, LAYOUT[op.nd], x)
    if len(w.shape) != op.nd + 2:
        raise rank_error(op.name, op.nd + 2, weight_layout, w, 1)
    if not all(sp.sympify(k).is_Integer for k in w.shape):
        raise OpError(f"weight shape {fmt_shape(w.shape)} must be concrete", 1)
    return x, w


class Conv(Op):
    kind = "out_elementwise"
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
        x, w = check_ranks(self, ins, "weight [C_out, C_in/groups, K...]")
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

    def scratch_bytes(self, in_shapes, out_shape, attrs, itemsize):
        return im2col_bytes(in_shapes[0], in_shapes[1][2:], out_shape[2:], itemsize)

    def window(self, in_shapes, attrs):
        return self.kernel(in_shapes[1]), attrs["stride"], attrs["dilation"]

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


def im2col_bytes(x_shape, kernel, out_spatial, itemsize):
    """Size of the column matrix `columns` builds (twice: it is built, then regrouped), the
    largest temporary of a convolution and of both its gradients."""
    n, c = x_shape[:2]
    return 2 * math.prod(kernel) * c * n * math.prod(out_spatial) * itemsize


def columns(x, kernel, stride, pads, dilation, groups, padding_mode="zeros"):
    """im2col, offset-major: (G, K * C/G, N*P), row (k, c) holding input channel c as kernel offset k
    reads it at every output position. Built one kernel offset at a time from a channel-major copy
    of the padded input, so every write is contiguous."""
    n, c = x.shape[:2]
    if padding_mode == "zeros":        # padded and channel-major in one copy
        padded = [size + lo + hi for size, (lo, hi) in zip(x.shape[2:], pads)]
        xt = np.zeros((c, n, *padded), x.dtype)
        xt[(slice(None), slice(None)) + tuple(slice(lo, lo + size) for size, (lo, _) in zip(x.shape[2:], pads))] = \
            x.swapaxes(0, 1)
    else:
        xt = np.ascontiguousarray(pad_array(x, pads, padding_mode).swapaxes(0, 1))   # C, N, padded...
    out_sp = tuple((p - d * (k - 1) - 1) // s + 1 for p, k, s, d in zip(xt.shape[2:], kernel, stride, dilation))
    cols = np.empty((math.prod(kernel), c, n) + out_sp, x.dtype)
    for k, offset in enumerate(np.ndindex(*kernel)):
        cols[k] = xt[offset_slices(offset, stride, dilation, out_sp)]
    cols = cols.reshape(len(cols), groups, c // groups, -1).transpose(1, 0, 2, 3)
    return cols.reshape(groups, -1, cols.shape[-1]), out_sp


def channel_major(y, groups):
    """(N, C, O...) -> (G, C/G, N*P)."""
    n, c = y.shape[:2]
    return np.ascontiguousarray(y.swapaxes(0, 1)).reshape(groups, c // groups, -1)


def weight_rows(w, groups):
    """[C_out, C/G, K...] -> (G, C_out/G, K * C/G), matching the rows of `columns`."""
    c_out, cg = w.shape[:2]
    return w.reshape(groups, c_out // groups, cg, -1).transpose(0, 1, 3, 2).reshape(groups, c_out // groups, -1)


COLUMNS_BYTES = 32 << 20     # im2col matrices past this are built a few images at a time


def images_per_chunk(x, kernel, stride, pads, dilation):
    """How many images' im2col columns fit in COLUMNS_BYTES (at least one). Measured on the 2-core
    machine, training steps in alternating blocks: LeNet-5 at batch 256 (conv2's columns 100 MB)
    197 ms whole, 166 ms in 32 MB chunks, 179 in 16 MB, 189 in 8 MB (the products narrow);
    vgg_small at 32 level (117 / 118)."""
    out = [(size + lo + hi - d * (k - 1) - 1) // s + 1
           for size, (lo, hi), k, s, d in zip(x.shape[2:], pads, kernel, stride, dilation)]
    per_image = math.prod(kernel) * x.shape[1] * math.prod(out) * x.itemsize
    return max(1, COLUMNS_BYTES // max(1, per_image))


def conv_nd(x, w, b, stride, pads, dilation, groups, padding_mode="zeros"):
    """N-d cross-correlation as im2col + one batched matmul per group (BLAS, no pixel loops), a
    chunk of images at a time where the columns would be large."""
    per = images_per_chunk(x, w.shape[2:], stride, pads, dilation)
    if len(x) > per:
        return np.concatenate([conv_nd(x[i:i + per], w, b, stride, pads, dilation, groups, padding_mode)
                               for i in range(0, len(x), per)])
    cols, out_sp = columns(x, w.shape[2:], stride, pads, dilation, groups, padding_mode)
    y = np.matmul(weight_rows(w, groups), cols)                                # G, C_out/G, N*P
    y = y.reshape(w.shape[0], x.shape[0], *out_sp).swapaxes(0, 1)
    out = np.empty(y.shape, x.dtype)
    if b is None:
        np.copyto(out, y)
    else:                       # to batch-major and the bias added in one pass
        np.add(y, b.reshape((1, -1) + (1,) * len(out_sp)).astype(y.dtype, copy=False), out=out)
    return out


def conv_backward_weight(x, dy, kernel, stride, pads, dilation, groups, padding_mode="zeros"):
    """dL/dW = dy @ columns^T per group (summed over chunks of images where the columns are large)."""
    per = images_per_chunk(x, kernel, stride, pads, dilation)
    if len(x) > per:
        dw = None
        for i in range(0, len(x), per):
            part = conv_backward_weight(x[i:i + per], dy[i:i + per], kernel, stride, pads, dilation, groups,
                                        padding_mode)
            dw = part if dw is None else np.add(dw, part, out=dw)
        return dw
    cols, _ = columns(x, kernel, stride, pads, dilation, groups, padding_mode)
    dw = np.matmul(channel_major(dy, groups), cols.transpose(0, 2, 1))          # G, C_out/G, K * C/G
    c_out, cg = dy.shape[1], x.shape[1] // groups
    dw = dw.reshape(groups, c_out // groups, -1, cg).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(dw).reshape(c_out, cg, *kernel)


def conv_backward_data(dy, w, input_spatial, stride, pads, dilation, groups, padding_mode="zeros"):
    """dL/dx, a transposed convolution. Stride 1, one group, no more output than input channels: a
    convolution of dy with the flipped, transposed filter (im2col of dy, then one product whose depth
    is C_out * K: BLAS runs it several times faster than K products of depth C_out). Otherwise: per
    kernel offset, W_k^T @ dy (one batched matmul gives all offsets at once, laid out offset-major),
    added onto the strided positions that offset read in the forward pass. Then folded through the
    padding."""
    n, c_out = dy.shape[:2]
    kernel, out_sp = w.shape[2:], dy.shape[2:]
    per = max(1, COLUMNS_BYTES // max(1, math.prod(kernel) * max(c_out, w.shape[1]) * math.prod(input_spatial) * dy.itemsize))
    if n > per:             # a chunk of images at a time, as conv_nd
        return np.concatenate([conv_backward_data(dy[i:i + per], w, input_spatial, stride, pads, dilation, groups,
                                                  padding_mode) for i in range(0, n, per)])
    if all(s == 1 for s in stride) and groups == 1 and c_out <= w.shape[1]:
        flipped = np.ascontiguousarray(w[(slice(None), slice(None)) + (slice(None, None, -1),) * len(kernel)]
                                       .swapaxes(0, 1))                                # C, C_out, K...
        full = [(d * (k - 1), d * (k - 1)) for k, d in zip(kernel, dilation)]
        if padding_mode == "zeros":     # straight onto the input's positions
            inner = [(f - lo, f - hi) for (f, _), (lo, hi) in zip(full, pads)]
            if all(lo >= 0 and hi >= 0 for lo, hi in inner):
                return conv_nd(dy, flipped, None, stride, inner, dilation, 1)
        dxp = conv_nd(dy, flipped, None, stride, full, dilation, 1)                  # the padded input's gradient
        return unpad_adjoint(dxp, pads, padding_mode, input_spatial)
    cg, cog = w.shape[1], c_out // groups
    wk = w.reshape(groups, cog, cg, math.prod(kernel)).transpose(0, 3, 2, 1)          # G, K, C/G, C_out/G
    dcols = np.matmul(wk, channel_major(dy, groups)[:, None])                         # G, K, C/G, N*P
    padded = [size + lo + hi for size, (lo, hi) in zip(input_spatial, pads)]
    dxp = np.zeros((groups, cg, n, *padded), dy.dtype)                                 # channel-major
    for k, offset in enumerate(np.ndindex(*kernel)):
        dxp[(slice(None),) + offset_slices(offset, stride, dilation, out_sp)] += \
            dcols[:, k].reshape(groups, cg, n, *out_sp)
    dxp = dxp.reshape(groups * cg, n, *padded).swapaxes(0, 1)
    return unpad_adjoint(dxp, pads, padding_mode, input_spatial)


class ConvGradient(GradientOp):
    """The two gradient ops of conv{nd}d share the forward's attributes, plus the one size the
    gradient cannot infer: the input's spatial size (data) or the kernel size (weight)."""
    suffix, extra = "", ""

    def __init__(self, nd):
        self.nd, self.name = nd, f"conv{nd}d_{self.suffix}"
        self.attrs = {k: REQUIRED for k in ("stride", "padding", "dilation", "groups", "padding_mode", self.extra)}

    def normalize(self, a):
        size = (as_shape(a[self.extra], self.extra) if self.extra == "input_size"
                else per_axis(a[self.extra], self.nd, self.extra, 1))
        return {**Conv(self.nd).normalize(a), self.extra: size}

    def macs(self, ins, out, attrs):  # as many multiply-adds as the forward convolution
        dy = ins[0] if self.extra == "input_size" else ins[1]
        per_output = numel(ins[1].shape[1:]) if self.extra == "input_size" else numel(out.shape[1:])
        return numel(dy.shape) * per_output


class ConvBackwardData(ConvGradient):
    """dL/d(input) of conv{nd}d: operands (grad_output, weight)."""
    operands = ("grad_output", "weight")
    suffix, extra = "backward_data", "input_size"

    def scratch_bytes(self, in_shapes, out_shape, attrs, itemsize):
        return im2col_bytes(out_shape, in_shapes[1][2:], in_shapes[0][2:], itemsize)

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


class ConvBackwardWeight(ConvGradient):
    """dL/d(weight) of conv{nd}d: operands (input, grad_output)."""
    operands = ("input", "grad_output")
    suffix, extra = "backward_weight", "kernel_size"

    def scratch_bytes(self, in_shapes, out_shape, attrs, itemsize):
        return im2col_bytes(in_shapes[0], out_shape[2:], in_shapes[1][2:], itemsize)

    def shape(self, ins, attrs):
        x, dy = ins
        return (dy.shape[1], x.shape[1] // attrs["groups"], *attrs["kernel_size"])

    def reference(self, xs, attrs):
        a = attrs
        return conv_backward_weight(xs[0], xs[1], a["kernel_size"], a["stride"], a["padding"], a["dilation"],
                                    a["groups"], a["padding_mode"])


class ConvTranspose(Op):
    """conv_transpose{nd}d (nn.ConvTranspose{nd}d): the adjoint of conv{nd}d, computed as that conv's
    backward-data. weight [C_in, C_out/groups, K...] (PyTorch's layout: the conv's [out, in/groups]),
    optional bias [C_out]; output size (S - 1) * stride - 2 * padding + dilation * (K - 1) +
    output_padding + 1."""
    kind = "opaque"
    resamples = True
    operands = ("input", "weight", "bias")
    optional = ("bias",)
    param_operands = ("weight", "bias")

    def __init__(self, nd):
        self.nd = nd
        self.name = f"conv_transpose{nd}d"
        self.attrs = {"stride": 1, "padding": 0, "output_padding": 0, "dilation": 1, "groups": 1}

    def normalize(self, a):
        nd = self.nd
        pads = a["padding"]
        if isinstance(pads, str):
            raise OpError(f"padding must be ints (one, or one per axis) for a transposed convolution, got {pads!r}",
                          kind=GraphError)
        if isinstance(pads, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == 2 and p[0] == p[1]
                                                   for p in pads):
            pads = tuple(p[0] for p in pads)           # already normalised: (lo, hi) pairs, equal
        out = {"stride": per_axis(a["stride"], nd, "stride", 1),
               "padding": tuple((p, p) for p in per_axis(pads, nd, "padding", 0)),
               "output_padding": per_axis(a["output_padding"], nd, "output_padding", 0),
               "dilation": per_axis(a["dilation"], nd, "dilation", 1),
               "groups": per_axis(a["groups"], 1, "groups", 1)[0]}
        for op_, s in zip(out["output_padding"], out["stride"]):
            if op_ >= s:
                raise OpError(f"output_padding {out['output_padding']} must be smaller than the stride "
                              f"{out['stride']} on every axis", kind=GraphError)
        return out

    def conv_attrs(self, attrs, out_spatial=None):
        """The attributes of the conv{nd}d whose backward-data this is."""
        conv = {k: attrs[k] for k in ("stride", "padding", "dilation", "groups")}
        conv["padding_mode"] = "zeros"
        if out_spatial is not None:
            conv["input_size"] = tuple(out_spatial)
        return conv

    def shape(self, ins, attrs):
        x, w = check_ranks(self, ins, "weight [C_in, C_out/groups, K...]")
        groups = attrs["groups"]
        if provably_ne(x.shape[1], w.shape[0]):
            raise OpError(f"input has {fmt_dim(x.shape[1])} channels, weight expects {fmt_dim(w.shape[0])}")
        if int(w.shape[0]) % groups:
            raise OpError(f"groups={groups} does not divide in_channels={w.shape[0]}", 1)
        c_out = w.shape[1] * groups
        if len(ins) > 2 and (len(ins[2].shape) != 1 or provably_ne(ins[2].shape[0], c_out)):
            raise OpError(f"bias must have shape [{c_out}], got {fmt_shape(ins[2].shape)}", 2)
        spatial = []
        for axis, size, k, s, (p, _), op_, d in zip(AXES[self.nd], x.shape[2:], w.shape[2:], attrs["stride"],
                                                    attrs["padding"], attrs["output_padding"], attrs["dilation"]):
            o = (size - 1) * s - 2 * p + d * (int(k) - 1) + op_ + 1
            if provably_true(sp.Lt(o, 1)):
                raise OpError(f"the output along {axis} would have size {fmt_dim(sp.sympify(o))}: padding {p} is "
                              f"too large for an input of {fmt_dim(size)} and kernel {k}")
            spatial.append(o)
        return (x.shape[0], c_out, *spatial)

    def reference(self, xs, attrs):
        x, w = xs[0], xs[1]
        out_spatial = [(n - 1) * s - 2 * p + d * (k - 1) + op_ + 1 for n, k, s, (p, _), op_, d in zip(
            x.shape[2:], w.shape[2:], attrs["stride"], attrs["padding"], attrs["output_padding"], attrs["dilation"])]
        y = conv_backward_data(x, w, out_spatial, attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"])
        if len(xs) > 2:
            y = y + xs[2].reshape((1, -1) + (1,) * self.nd)
        return y.astype(x.dtype, copy=False)

    def scratch_bytes(self, in_shapes, out_shape, attrs, itemsize):
        return im2col_bytes(out_shape, in_shapes[1][2:], in_shapes[0][2:], itemsize)

    def macs(self, ins, out, attrs):
        return numel(ins[0].shape) * numel(ins[1].shape[1:])

    def grad(self, e, dy, needs):
        """The adjoint's gradients are the conv's own passes: d(input) = conv(dy, w), d(weight) = the
        conv's backward-weight with dy as its input and the input as its output gradient."""
        x, w = e.inputs[0], e.inputs[1]
        conv = self.conv_attrs(e.attrs)
        kernel = tuple(int(k) for k in w.shape[2:])
        return [
            e.emit(f"conv{self.nd}d", [dy, w], conv, wrt=0) if needs[0] else None,
            e.emit(f"conv{self.nd}d_backward_weight", [dy, x], {**conv, "kernel_size": kernel}, wrt=1)
            if needs[1] else None,
            *([e.emit("reduce_sum", [dy], {"axes": (0, *range(2, self.nd + 2))}, wrt=2) if needs[2] else None]
              if len(needs) > 2 else []),
        ]


for _nd in (1, 2, 3):
    register(Conv(_nd))
    register(ConvBackwardData(_nd))
    register(ConvBackwardWeight(_nd))
    register(ConvTranspose(_nd))
