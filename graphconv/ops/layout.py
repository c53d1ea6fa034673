"""Ops that only move elements: flatten, reshape, concat."""
from __future__ import annotations

import numbers

import numpy as np
import sympy as sp

from ..errors import GraphError, OpError
from ..shapes import as_dim, fmt_dim, fmt_shape, numel, provably_ne
from .base import REQUIRED, Op, register


def _axis(dim, rank, what):
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise OpError(f"{what} must be an int, got {dim!r}", kind=GraphError)
    if not -rank <= dim < rank:
        raise OpError(f"{what}={dim} is out of range for a {rank}-D input")
    return dim % rank


@register
class Flatten(Op):
    name = "flatten"
    kind = "injective"
    attrs = {"start_dim": 1, "end_dim": -1}

    def span(self, rank, attrs):
        lo = _axis(attrs["start_dim"], rank, "start_dim")
        hi = _axis(attrs["end_dim"], rank, "end_dim")
        if lo > hi:
            raise OpError(f"start_dim={attrs['start_dim']} comes after end_dim={attrs['end_dim']}")
        return lo, hi

    def shape(self, ins, attrs):
        s = ins[0].shape
        lo, hi = self.span(len(s), attrs)
        return (*s[:lo], numel(s[lo:hi + 1]), *s[hi + 1:])

    def reference(self, xs, attrs):
        x = xs[0]
        lo, hi = self.span(x.ndim, attrs)
        return x.reshape(x.shape[:lo] + (-1,) + x.shape[hi + 1:])


@register
class Reshape(Op):
    name = "reshape"
    kind = "injective"
    attrs = {"shape": REQUIRED}

    def normalize(self, a):
        dims = a["shape"]
        if isinstance(dims, (numbers.Integral, str)):
            dims = (dims,)
        out = []
        for i, d in enumerate(dims):
            if isinstance(d, numbers.Integral) and not isinstance(d, bool) and d == -1:
                out.append(-1)
            elif isinstance(d, numbers.Integral) and not isinstance(d, bool) and d <= 0:
                raise OpError(f"reshape dims must be positive (or one -1), got {tuple(dims)}", kind=GraphError)
            else:
                out.append(as_dim(d, f"reshape dim {i}"))
        if out.count(-1) > 1:
            raise OpError(f"reshape may infer only one dim (-1), got {tuple(dims)}", kind=GraphError)
        return {"shape": tuple(out)}

    def shape(self, ins, attrs):
        total, target = numel(ins[0].shape), attrs["shape"]
        known = numel([d for d in target if not (isinstance(d, int) and d == -1)])
        if -1 in target:
            inferred = sp.simplify(total / known)
            if inferred.is_integer is False or (inferred.is_number and not inferred.is_integer):
                raise OpError(f"cannot reshape {fmt_shape(ins[0].shape)} ({fmt_dim(total)} elements) to "
                              f"{fmt_shape(target)}: the inferred dim would be {fmt_dim(inferred)}, not an integer")
            return tuple(inferred if isinstance(d, int) and d == -1 else d for d in target)
        if provably_ne(total, known):
            raise OpError(f"cannot reshape {fmt_shape(ins[0].shape)} ({fmt_dim(total)} elements) to "
                          f"{fmt_shape(target)} ({fmt_dim(known)} elements)")
        return target

    def reference(self, xs, attrs):
        return xs[0].reshape(tuple(int(d) for d in attrs["shape"]))

    def evaluate(self, xs, attrs, out_shape):
        return xs[0].reshape(out_shape)  # symbolic target dims are bound by the interpreter


@register
class Concat(Op):
    name = "concat"
    kind = "injective"
    variadic = True
    attrs = {"dim": 1}

    def shape(self, ins, attrs):
        first = ins[0].shape
        axis = _axis(attrs["dim"], len(first), "dim")
        for i, t in enumerate(ins[1:], 1):
            if len(t.shape) != len(first):
                raise OpError(f"input {i} is {len(t.shape)}-D {fmt_shape(t.shape)} but input 0 is "
                              f"{len(first)}-D {fmt_shape(first)}", i)
            for j, (a, b) in enumerate(zip(first, t.shape)):
                if j != axis and provably_ne(a, b):
                    raise OpError(f"input {i} {fmt_shape(t.shape)} does not match input 0 {fmt_shape(first)} "
                                  f"along dim {j} (only dim {axis} may differ)", i)
        size = sum((t.shape[axis] for t in ins), sp.Integer(0))
        return (*first[:axis], size, *first[axis + 1:])

    def reference(self, xs, attrs):
        return np.concatenate(xs, axis=attrs["dim"])
