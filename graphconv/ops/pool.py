"""max_pool{1,2,3}d and avg_pool{1,2,3}d with PyTorch's semantics (kernel, stride defaulting to the
kernel, padding, dilation for max, ceil_mode, count_include_pad for avg)."""
from __future__ import annotations

import math

import numpy as np

from ..errors import GraphError, OpError
from ..shapes import as_shape
from .base import REQUIRED, GradientOp, Op, as_bool, register, rank_error, select
from .window import (LAYOUT, ceil_extra, offset_slices, pad_array, padding_pairs, per_axis, unpad_adjoint,
                     window_reduce, window_shape)


class Pool(Op):
    kind = "window"
    operands = ("input",)

    def __init__(self, mode, nd):
        self.mode, self.nd = mode, nd
        self.name = f"{mode}_pool{nd}d"
        self.attrs = {"kernel_size": REQUIRED, "stride": None, "padding": 0, "ceil_mode": False}
        if mode == "max":
            self.attrs["dilation"] = 1
        else:
            self.attrs["count_include_pad"] = True
            self.attrs["divisor_override"] = None

    def normalize(self, a):
        nd = self.nd
        out = dict(a)
        out["kernel_size"] = per_axis(a["kernel_size"], nd, "kernel_size", 1)
        out["stride"] = out["kernel_size"] if a["stride"] is None else per_axis(a["stride"], nd, "stride", 1)
        if isinstance(a["padding"], str):
            raise OpError(f"{self.name} padding must be an int or a tuple, got {a['padding']!r}", kind=GraphError)
        out["padding"] = padding_pairs(a["padding"], nd)
        if "dilation" in a:
            out["dilation"] = per_axis(a["dilation"], nd, "dilation", 1)
        for k, (lo, hi) in zip(out["kernel_size"], out["padding"]):
            if max(lo, hi) > k // 2:
                raise OpError(f"padding {max(lo, hi)} must be at most half the kernel size {k} (as in PyTorch)",
                              kind=GraphError)
        out["ceil_mode"] = as_bool(a["ceil_mode"], "ceil_mode")
        if "count_include_pad" in a:
            out["count_include_pad"] = as_bool(a["count_include_pad"], "count_include_pad")
        if a.get("divisor_override") is not None:
            out["divisor_override"] = per_axis(a["divisor_override"], 1, "divisor_override", 1)[0]
        return out

    def dilation(self, attrs):
        return attrs.get("dilation", (1,) * self.nd)

    def window(self, in_shapes, attrs):
        return attrs["kernel_size"], attrs["stride"], self.dilation(attrs)

    def scratch_bytes(self, in_shapes, out_shape, attrs, itemsize):
        """The padded copy of the input (ceil_mode may pad far past a huge kernel's input)."""
        return self.padded_bytes(in_shapes[0], out_shape[2:], attrs, itemsize)

    def padded_bytes(self, x_shape, pooled_spatial, attrs, itemsize):
        pairs = self.padded_pairs(x_shape[2:], pooled_spatial, attrs)
        return 2 * x_shape[0] * x_shape[1] * math.prod(s + lo + hi for s, (lo, hi) in zip(x_shape[2:], pairs)) * itemsize

    def shape(self, ins, attrs):
        x = ins[0]
        if len(x.shape) != self.nd + 2:
            raise rank_error(self.name, self.nd + 2, LAYOUT[self.nd], x)
        spatial = window_shape(self.name, x.shape[2:], attrs["kernel_size"], attrs["stride"], attrs["padding"],
                               self.dilation(attrs), attrs["ceil_mode"])
        return (x.shape[0], x.shape[1], *spatial)

    def padded_pairs(self, spatial, out_spatial, attrs):
        """Explicit padding plus the right overhang that ceil_mode windows need."""
        pairs = []
        for size, k, s, (lo, hi), d, o in zip(spatial, attrs["kernel_size"], attrs["stride"], attrs["padding"],
                                               self.dilation(attrs), out_spatial):
            pairs.append((lo, hi + ceil_extra(size, k, s, lo, hi, d, o)))
        return pairs

    def reference(self, xs, attrs):
        x = xs[0]
        out_sp = [int(o) for o in self.shape([_Static(x)], attrs)[2:]]
        pairs = self.padded_pairs(x.shape[2:], out_sp, attrs)
        k, s, d = attrs["kernel_size"], attrs["stride"], self.dilation(attrs)
        if self.mode == "max":
            return window_reduce(pad_array(x, pairs, value=-np.inf), k, s, d, out_sp, np.maximum)
        if math.prod(k) > AVG_EXACT_WINDOW:          # a sum of many float32 terms drifts: add in float64
            if tiles_exactly(x.shape[2:], out_sp, pairs, k, s, d):
                # windows that tile the input exactly (a global average): one reshape, summed pairwise
                tiles = x.reshape(*x.shape[:2], *[v for o, kk in zip(out_sp, k) for v in (o, kk)])
                total = tiles.sum(axis=tuple(3 + 2 * i for i in range(len(k))), dtype=np.float64)
            else:
                total = window_reduce(pad_array(x.astype(np.float64), pairs), k, s, d, out_sp, np.add)
        else:
            total = window_reduce(pad_array(x, pairs), k, s, d, out_sp, np.add)
        return (total / self.divisor(x.shape[2:], out_sp, attrs)).astype(x.dtype)

    # ---- the window index map, stated once: the max-pool backward, the fused training forward
    #      (which saves the argmax codes) and the fused backward (which routes through them) use it
    def max_with_argmax(self, x, attrs, out_sp):
        """(pooled, code) where code is the kernel offset (row-major, 0..K-1) of each window's first
        maximum: the element PyTorch routes the gradient to on ties."""
        k, s, d = attrs["kernel_size"], attrs["stride"], self.dilation(attrs)
        xp = pad_array(x, self.padded_pairs(x.shape[2:], out_sp, attrs), value=-np.inf)
        views = [xp[offset_slices(o, s, d, out_sp)] for o in np.ndindex(*k)]
        codes = np.zeros(views[0].shape, np.uint8 if len(views) <= 256 else np.int64)
        best = np.array(views[0])
        nans = bool(np.isnan(xp).any())
        # one running pass per offset (np.argmax's choice: the first of equal maxima; a NaN beats
        # every number, the first NaN staying), each a branch-free select
        for i, view in enumerate(views[1:], 1):
            take = view > best
            if nans:
                take |= np.isnan(view) & ~np.isnan(best)
            best = select(take, view, best)
            codes = select(take, codes.dtype.type(i), codes)
        return best, codes

    def gather(self, z, codes, attrs, out_sp):
        """z (same size as the pooled input) at each window's argmax position."""
        k, s, d = attrs["kernel_size"], attrs["stride"], self.dilation(attrs)
        zp = pad_array(z, self.padded_pairs(z.shape[2:], out_sp, attrs))
        out = np.zeros(codes.shape, z.dtype)
        for i, offset in enumerate(np.ndindex(*k)):
            part = zp[offset_slices(offset, s, d, out_sp)]
            np.copyto(out, part, where=codes == i)
        return out

    def route(self, g, codes, spatial, attrs):
        """The adjoint of max pooling: each pooled gradient g added at its window's argmax position
        (windows that overlap add), then folded back through the padding; full input size."""
        k, s, d = attrs["kernel_size"], attrs["stride"], self.dilation(attrs)
        out_sp = g.shape[2:]
        pairs = self.padded_pairs(spatial, out_sp, attrs)
        dxp = np.zeros((*g.shape[:2], *[size + lo + hi for size, (lo, hi) in zip(spatial, pairs)]), g.dtype)
        disjoint = all(st >= dd * (kk - 1) + 1 for kk, st, dd in zip(k, s, d))   # windows do not overlap
        for i, offset in enumerate(np.ndindex(*k)):
            part = select(codes == i, g, g.dtype.type(0))
            if disjoint:       # each position in one window at most: a store, not a read-add-write
                dxp[offset_slices(offset, s, d, out_sp)] = part
            else:
                dxp[offset_slices(offset, s, d, out_sp)] += part
        return unpad_adjoint(dxp, pairs, "zeros", spatial)

    def divisor(self, spatial, out_sp, attrs):
        """Elements each window averages over: padding counts iff count_include_pad; the ceil_mode
        overhang never does (PyTorch's rule); divisor_override replaces the count."""
        if attrs.get("divisor_override"):
            return attrs["divisor_override"]
        if not any(lo or hi for lo, hi in self.padded_pairs(spatial, out_sp, attrs)):
            return math.prod(attrs["kernel_size"])       # every window inside the input, whole
        mask = np.ones((1, 1) + tuple(spatial))
        explicit = attrs["padding"]
        mask = pad_array(mask, explicit, value=1.0 if attrs["count_include_pad"] else 0.0)
        pairs = self.padded_pairs(spatial, out_sp, attrs)
        extra = [(0, hi - e_hi) for (_, hi), (_, e_hi) in zip(pairs, explicit)]
        mask = pad_array(mask, extra, value=0.0)
        return window_reduce(mask, attrs["kernel_size"], attrs["stride"], (1,) * self.nd, out_sp, np.add)

    def grad(self, e, dy, needs):
        if self.mode == "max":
            return [e.emit(f"{self.name}_backward", [e.inputs[0], dy], e.attrs, wrt=0)]
        return [e.emit(f"{self.name}_backward", [dy], {**e.attrs, "input_size": e.inputs[0].shape[2:]}, wrt=0)]


class PoolBackward(GradientOp, Pool):
    """dL/d(input) of a pooling op. Max routes each gradient to the first maximum of its window
    (PyTorch's choice on ties) and takes operands (input, grad_output); avg spreads it evenly over
    the window and takes (grad_output) plus the input size."""
    kind = "window"

    def __init__(self, mode, nd):
        super().__init__(mode, nd)
        self.name = f"{mode}_pool{nd}d_backward"
        if mode == "max":
            self.operands = ("input", "grad_output")
        else:
            self.operands = ("grad_output",)
            self.attrs = {**self.attrs, "input_size": REQUIRED}

    def scratch_bytes(self, in_shapes, out_shape, attrs, itemsize):
        return self.padded_bytes(out_shape, in_shapes[-1][2:], attrs, itemsize)

    def normalize(self, a):
        size = {"input_size": as_shape(a["input_size"], "input_size")} if "input_size" in a else {}
        return {**super().normalize({k: v for k, v in a.items() if k != "input_size"}), **size}

    def shape(self, ins, attrs):
        if self.mode == "max":
            return ins[0].shape
        dy = ins[0]
        return (dy.shape[0], dy.shape[1], *attrs["input_size"])

    def reference(self, xs, attrs):
        k, s, d = attrs["kernel_size"], attrs["stride"], self.dilation(attrs)
        dy = xs[-1]
        out_sp = dy.shape[2:]
        spatial = xs[0].shape[2:] if self.mode == "max" else [int(v) for v in attrs["input_size"]]
        pairs = self.padded_pairs(spatial, out_sp, attrs)
        if self.mode == "max":
            x = xs[0]
            per = max(1, CHUNK_BYTES // max(1, x[:1].nbytes))
            if len(x) <= per:
                _, codes = self.max_with_argmax(x, attrs, out_sp)
                return self.route(dy, codes, spatial, attrs)
            # a few images at a time: the argmax pass and the routing pass then find their data in
            # the cache (LeNet-5's pool1 at batch 256, 16 MB: 13.7 ms whole, 9.5 ms in 1-4 MB chunks)
            out = np.empty(x.shape, dy.dtype)
            for i in range(0, len(x), per):
                out[i:i + per] = self.reference([x[i:i + per], dy[i:i + per]], attrs)
            return out
        else:
            share = (dy / self.divisor(spatial, out_sp, attrs)).astype(dy.dtype)
            if tiles_exactly(spatial, out_sp, pairs, k, s, d):       # each element in one window: a repeat
                dx = share
                for axis, kk in enumerate(k):
                    dx = np.repeat(dx, kk, axis=2 + axis)
                return dx
            padded = [size + lo + hi for size, (lo, hi) in zip(spatial, pairs)]
            dxp = np.zeros((*dy.shape[:2], *padded), dy.dtype)
            for offset in np.ndindex(*k):
                dxp[offset_slices(offset, s, d, out_sp)] += share
        return unpad_adjoint(dxp, pairs, "zeros", spatial)


def tiles_exactly(spatial, out_sp, pairs, k, s, d) -> bool:
    """Windows that tile the input exactly: stride = kernel, no dilation, no padding or overhang."""
    return (tuple(s) == tuple(k) and all(v == 1 for v in d) and not any(lo or hi for lo, hi in pairs)
            and all(int(o) * kk == int(n) for o, kk, n in zip(out_sp, k, spatial)))


CHUNK_BYTES = 2 << 20      # max-pool backward works on about this much input at a time
# an average over more elements than this adds in float64 (the reference and the kernel alike): a
# float32 running sum of a 6000 x 6000 plane of values in [0, 1) gave a mean of 0.466, not 0.49996
# (PyTorch's avg_pool2d gives the same 0.466). Windows up to this size (every window a fused kernel
# pools in registers) add in the tensor's own type, as PyTorch does
AVG_EXACT_WINDOW = 32


class _Static:
    """A concrete array seen as a TensorType, to reuse the shape rule at run time."""

    def __init__(self, x):
        self.shape, self.dtype = x.shape, str(x.dtype)


for _mode in ("max", "avg"):
    for _nd in (1, 2, 3):
        register(Pool(_mode, _nd))
        register(PoolBackward(_mode, _nd))
