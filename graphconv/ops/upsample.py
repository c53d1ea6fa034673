"""upsample (F.interpolate) to a static size: nearest, or (bi/tri)linear with PyTorch's
align_corners rule, and its gradient.

Every mode is separable: along each spatial axis an output index o reads input indices i0(o) and
i1(o) with weights 1 - w(o) and w(o) (nearest: one index, weight 1). `axis_table` is that rule, the
one place it is written: the NumPy reference applies it, the gradient applies its transpose, and code
generation bakes the same numbers into the kernels' constant tables.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import sympy as sp

from ..errors import GraphError, OpError
from ..shapes import fmt_shape, numel
from .base import REQUIRED, Cost, GradientOp, Op, as_bool, nbytes, register

# mode -> the number of spatial axes it needs (PyTorch's names); nearest takes 1 to 3
MODES = {"nearest": None, "linear": 1, "bilinear": 2, "trilinear": 3}


def axis_table(n_in: int, n_out: int, mode: str, align_corners: bool):
    """(i0, i1, w) per output index along one axis: out[o] = in[i0] * (1 - w) + in[i1] * w."""
    i0, i1, w = [], [], []
    for o in range(n_out):
        if mode == "nearest":                     # PyTorch's 'nearest': floor(o * in / out)
            a = min(o * n_in // n_out, n_in - 1)
            i0.append(a), i1.append(a), w.append(0.0)
            continue
        if align_corners:
            src = o * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        else:
            src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        a = min(int(math.floor(src)), n_in - 1)
        i0.append(a), i1.append(min(a + 1, n_in - 1)), w.append(src - a)
    return i0, i1, w


def axis_reads(n_in: int, n_out: int, mode: str, align_corners: bool, backward: bool = False):
    """The (output index, input index, weight) reads of one axis. Forward, every corner of the table
    (a weight of 0 included, as the kernels and PyTorch multiply it: 0 * inf is NaN there too);
    backward, the transpose as the gradient kernels sum it: an exact grid point's zero weight is no
    read, and an edge whose two corners are one input is one read of weight 1."""
    reads = []
    for o, (a, b, w) in enumerate(zip(*axis_table(n_in, n_out, mode, align_corners))):
        if mode == "nearest" or (backward and a == b):
            reads.append((o, a, 1.0))
            continue
        reads += [(o, i, wt) for i, wt in ((a, 1.0 - w), (b, w)) if not backward or wt != 0.0]
    return reads


def apply_reads(x, reads_per_axis, sizes, backward=False):
    """x (float64) with each spatial axis k (axis 2 + k) resampled by its reads to sizes[k]: forward,
    out[o] = the sum of weight * x[i] over o's reads; backward, dx[i] = the sum over the reads of i.
    Only the reads are multiplied, so an inf spreads where the kernels spread it, not along whole rows."""
    for k, (reads, n) in enumerate(zip(reads_per_axis, sizes)):
        o, i, w = (np.asarray(v) for v in zip(*reads))
        src, dst = (o, i) if backward else (i, o)
        moved = np.moveaxis(x, 2 + k, 0)
        out = np.zeros((n,) + moved.shape[1:])
        np.add.at(out, dst, moved[src] * w.reshape((-1,) + (1,) * (moved.ndim - 1)))
        x = np.moveaxis(out, 0, 2 + k)
    return x


def check_sizes(what, sizes):
    """A tuple of positive ints."""
    if not isinstance(sizes, (tuple, list)) or not sizes or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise OpError(f"{what} must be positive ints, got {sizes!r}", kind=GraphError)
    return tuple(int(s) for s in sizes)


def static_spatial(shape, what) -> tuple:
    """The spatial sizes of an [N, C, *S] shape as ints; a symbolic one is refused, naming `what` needs it."""
    for d in shape[2:]:
        if not sp.sympify(d).is_Integer:
            raise OpError(f"the spatial size {d} is symbolic; {what} needs it known (give it a size: --dim on the "
                          f"command line, graphconv.passes.bind_dims in Python)")
    return tuple(int(d) for d in shape[2:])


class UpsampleBase(Op):
    kind = "opaque"
    resamples = True

    def normalize(self, a):
        out = dict(a)
        out["size"] = check_sizes("size", a["size"])
        if a["mode"] not in MODES:
            raise OpError(f"mode must be one of {', '.join(MODES)}, got {a['mode']!r}", kind=GraphError)
        out["align_corners"] = as_bool(a["align_corners"], "align_corners")
        if a["mode"] == "nearest" and out["align_corners"]:
            raise OpError("align_corners applies to the linear modes only, not to 'nearest'", kind=GraphError)
        if "input_size" in a:
            out["input_size"] = check_sizes("input_size", a["input_size"])
        return out

    def spatial(self, t, attrs, static=True):
        """The static spatial sizes of an [N, C, *S] operand, checked against the mode (static=False:
        the check alone, the sizes may be symbolic: upsampling to a given size)."""
        nd, mode = len(attrs["size"]), attrs["mode"]
        if len(t.shape) != nd + 2:
            raise OpError(f"{self.name} to size {attrs['size']} expects an input [N, C, {', '.join('S' * nd)}], "
                          f"got {len(t.shape)}-D {fmt_shape(t.shape)}")
        if MODES[mode] not in (None, nd):
            raise OpError(f"mode {mode!r} is for {MODES[mode]}-D inputs (3-D: linear, 4-D: bilinear, 5-D: "
                          f"trilinear), got {len(t.shape)}-D {fmt_shape(t.shape)}")
        return static_spatial(t.shape, "upsampling") if static else None

    def reads(self, n_in, n_out, attrs, backward=False):
        return [axis_reads(i, o, attrs["mode"], attrs["align_corners"], backward) for i, o in zip(n_in, n_out)]


@register
class Upsample(UpsampleBase):
    name = "upsample"
    attrs = {"size": REQUIRED, "mode": "nearest", "align_corners": False}

    def shape(self, ins, attrs):
        self.spatial(ins[0], attrs, static=False)     # a symbolic input size is bound later (--dim)
        return (*ins[0].shape[:2], *map(sp.Integer, attrs["size"]))

    def reference(self, xs, attrs):
        x = xs[0]
        if attrs["mode"] == "nearest":            # a gather: exact
            for k, n_out in enumerate(attrs["size"]):
                x = np.take(x, axis_table(x.shape[2 + k], n_out, "nearest", False)[0], axis=2 + k)
            return np.ascontiguousarray(x)
        return apply_reads(x.astype(np.float64), self.reads(x.shape[2:], attrs["size"], attrs),
                           attrs["size"]).astype(x.dtype)

    def grad(self, e, dy, needs):
        if not needs[0]:
            return [None]
        sizes = self.spatial(e.inputs[0], e.attrs)
        return [e.emit("upsample_backward", [dy], {**e.attrs, "input_size": sizes}, wrt=0)]

    def macs(self, ins, out, attrs):
        return sp.Integer(0) if attrs["mode"] == "nearest" else numel(out.shape) * 2 ** len(attrs["size"])


@register
class UpsampleBackward(GradientOp, UpsampleBase):
    """The transpose: each input position sums the output gradients that read it, with their weights."""
    name = "upsample_backward"
    operands = ("grad_output",)
    attrs = {"size": REQUIRED, "mode": "nearest", "align_corners": False, "input_size": REQUIRED}

    def shape(self, ins, attrs):
        if self.spatial(ins[0], attrs) != attrs["size"]:
            raise OpError(f"grad_output {fmt_shape(ins[0].shape)} must have the upsampled size {attrs['size']}")
        return (*ins[0].shape[:2], *map(sp.Integer, attrs["input_size"]))

    def reference(self, xs, attrs):
        dy = xs[0]
        reads = self.reads(attrs["input_size"], attrs["size"], attrs, backward=True)
        return apply_reads(dy.astype(np.float64), reads, attrs["input_size"], backward=True).astype(dy.dtype)

    def cost(self, ins, out, attrs):
        macs = numel(ins[0].shape) * (1 if attrs["mode"] == "nearest" else 2 ** len(attrs["size"]))
        return Cost(sp.Integer(0), macs, nbytes(ins[0]), nbytes(out))
