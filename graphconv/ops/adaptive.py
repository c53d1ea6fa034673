"""adaptive_avg_pool{1,2,3}d / adaptive_max_pool{1,2,3}d where the input size is not a multiple of
the output size (the builder uses a plain pool where it is): PyTorch's windows, output o of an axis
covering [floor(o * in / out), ceil((o + 1) * in / out)), so neighbouring windows may overlap and
differ in size by one. Max scans the window in row-major order as PyTorch does (the first of equal
maxima, the last NaN) and its gradient goes to that element.
"""
from __future__ import annotations

import math

import numpy as np
import sympy as sp

from ..errors import OpError
from ..shapes import fmt_shape
from .base import REQUIRED, Cost, GradientOp, Op, nbytes, register
from .pool import AVG_EXACT_WINDOW
from .upsample import check_sizes, static_spatial


def windows(n_in: int, n_out: int) -> list:
    """[(start, end)] of every output index along one axis."""
    return [(o * n_in // n_out, -(-(o + 1) * n_in // n_out)) for o in range(n_out)]


def even_windows(n_in, n_out):
    """The kernel (= stride) of a plain pool that pools sizes `n_in` to `n_out` exactly as adaptive
    pooling does, where every input size is known and a multiple of its output size; else None."""
    if not all(getattr(sp.sympify(i), "is_Integer", False) for i in n_in):
        return None
    if any(int(i) % o for i, o in zip(n_in, n_out)):
        return None
    return tuple(int(i) // o for i, o in zip(n_in, n_out))


def first_argmax(block):
    """Index of each row's maximum in `block` [R, K] as PyTorch's scan finds it (`v > max || isnan(v)`):
    the first of equal maxima, or the last NaN."""
    nan = np.isnan(block)
    last_nan = block.shape[1] - 1 - nan[:, ::-1].argmax(axis=1)
    return np.where(nan.any(axis=1), last_nan, block.argmax(axis=1))


class AdaptiveBase(Op):
    kind = "opaque"

    def __init__(self, nd, mode, backward=False):
        self.nd, self.mode = nd, mode
        self.name = f"adaptive_{mode}_pool{nd}d" + ("_backward" if backward else "")
        self.attrs = {"output_size": REQUIRED}

    def normalize(self, a):
        return {"output_size": check_sizes("output_size", a["output_size"])}

    def spatial(self, t, attrs, what="input", known=True):
        """The spatial sizes of `t` (ints; with known=False symbols are allowed: the output size of
        adaptive pooling does not depend on them, and a run binds them)."""
        if len(t.shape) != self.nd + 2 or len(attrs["output_size"]) != self.nd:
            raise OpError(f"{self.name} expects an {what} [N, C, {', '.join('S' * self.nd)}] and {self.nd} output sizes, "
                          f"got {fmt_shape(t.shape)} and {attrs['output_size']}")
        return static_spatial(t.shape, f"{self.name}'s gradient") if known else tuple(t.shape[2:])

    def boxes(self, n_in, n_out):
        """Every output position's window, as slices per axis, in row-major order of the outputs."""
        per_axis = [windows(i, o) for i, o in zip(n_in, n_out)]
        for index in np.ndindex(*n_out):
            yield index, tuple(slice(*per_axis[k][o]) for k, o in enumerate(index))


def largest_window(n_in, n_out) -> int:
    """The longest of PyTorch's adaptive windows [o*in/out, ceil((o+1)*in/out)) along one axis."""
    return max((((o + 1) * n_in + n_out - 1) // n_out) - (o * n_in) // n_out for o in range(n_out))


class AdaptivePool(AdaptiveBase):
    def shape(self, ins, attrs):
        self.spatial(ins[0], attrs, known=False)
        return (*ins[0].shape[:2], *map(sp.Integer, attrs["output_size"]))

    def reference(self, xs, attrs):
        x = xs[0]
        out = np.empty(x.shape[:2] + attrs["output_size"], x.dtype)
        # where the largest window has more than AVG_EXACT_WINDOW elements every window adds in float64,
        # as the kernel does (one accumulator type for the op)
        wide = math.prod(largest_window(i, o) for i, o in zip(x.shape[2:], attrs["output_size"])) > AVG_EXACT_WINDOW
        for index, box in self.boxes(x.shape[2:], attrs["output_size"]):
            block = x[(slice(None), slice(None)) + box].reshape(x.shape[0], x.shape[1], -1)
            if self.mode == "avg":
                out[(slice(None), slice(None)) + index] = block.mean(axis=2, dtype=np.float64 if wide else None)
            else:
                flat = block.reshape(-1, block.shape[2])
                out[(slice(None), slice(None)) + index] = flat[np.arange(len(flat)), first_argmax(flat)].reshape(
                    x.shape[:2])
        return out

    def grad(self, e, dy, needs):
        if not needs[0]:
            return [None]
        if self.mode == "avg":
            sizes = self.spatial(e.inputs[0], e.attrs)
            return [e.emit(f"{self.name}_backward", [dy], {**e.attrs, "input_size": sizes}, wrt=0)]
        return [e.emit(f"{self.name}_backward", [e.inputs[0], dy], e.attrs, wrt=0)]

    def macs(self, ins, out, attrs):
        return sp.Integer(0)


class AdaptivePoolBackward(GradientOp, AdaptiveBase):
    """avg: operand grad_output, each input gets dy / count of every window holding it (the input size
    is an attribute); max: operands (input, grad_output), each window's dy to its first maximum."""

    def __init__(self, nd, mode):
        super().__init__(nd, mode, backward=True)
        if mode == "avg":
            self.operands = ("grad_output",)
            self.attrs = {"output_size": REQUIRED, "input_size": REQUIRED}
        else:
            self.operands = ("input", "grad_output")

    def normalize(self, a):
        out = super().normalize(a)
        if "input_size" in a:
            out["input_size"] = check_sizes("input_size", a["input_size"])
        return out

    def shape(self, ins, attrs):
        dy = ins[-1]
        if self.spatial(dy, attrs, "output gradient") != attrs["output_size"]:
            raise OpError(f"grad_output {fmt_shape(dy.shape)} must have the pooled size {attrs['output_size']}", len(ins) - 1)
        if self.mode == "avg":
            return (*dy.shape[:2], *map(sp.Integer, attrs["input_size"]))
        self.spatial(ins[0], attrs, known=False)
        return ins[0].shape

    def reference(self, xs, attrs):
        dy = xs[-1]
        n_in = attrs["input_size"] if self.mode == "avg" else xs[0].shape[2:]
        dx = np.zeros(dy.shape[:2] + tuple(n_in), dy.dtype)
        rows = np.arange(dy.shape[0] * dy.shape[1])
        for index, box in self.boxes(n_in, attrs["output_size"]):
            g = dy[(slice(None), slice(None)) + index]
            if self.mode == "avg":
                dx[(slice(None), slice(None)) + box] += (g / math.prod(s.stop - s.start for s in box))[
                    (...,) + (None,) * self.nd]
                continue
            x = xs[0]
            block = x[(slice(None), slice(None)) + box].reshape(len(rows), -1)
            local = np.unravel_index(first_argmax(block), [s.stop - s.start for s in box])
            where = tuple(s.start + l for s, l in zip(box, local))
            flat = dx.reshape(len(rows), *n_in)
            np.add.at(flat, (rows, *where), g.reshape(-1))
        return dx

    def cost(self, ins, out, attrs):
        zero = sp.Integer(0)
        return Cost(zero, zero, sum((nbytes(t) for t in ins), zero), nbytes(out))


for _nd in (1, 2, 3):
    for _mode in ("avg", "max"):
        register(AdaptivePool(_nd, _mode))
        register(AdaptivePoolBackward(_nd, _mode))
