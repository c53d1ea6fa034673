"""Ops that move elements (flatten, reshape, concat, slice, part) and the sums over axes (reduce_sum, mean)."""
from __future__ import annotations

import numbers

import numpy as np
import sympy as sp

from ..errors import GraphError, OpError
from ..shapes import as_dim, fmt_dim, fmt_shape, numel, provably_ne, provably_true
from .base import REQUIRED, Cost, GradientOp, Op, TupleType, as_bool, nbytes, register


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
    mixes_all = True      # for the receptive field: what follows sees the whole input
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

    def grad(self, e, dy, needs):
        return [e.emit("reshape", [dy], {"shape": e.inputs[0].shape}, wrt=0)]


@register
class Reshape(Op):
    name = "reshape"
    kind = "injective"
    mixes_all = True
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

    def grad(self, e, dy, needs):
        return [e.emit("reshape", [dy], {"shape": e.inputs[0].shape}, wrt=0)]


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

    def grad(self, e, dy, needs):
        axis = e.attrs["dim"] % len(e.output.shape)
        grads, start = [], sp.Integer(0)
        for i, (x, need) in enumerate(zip(e.inputs, needs)):
            stop = start + x.shape[axis]
            if need and not (sp.sympify(start).is_Integer and sp.sympify(stop).is_Integer):
                # the slice of the gradient would need bounds in the symbols (N, 2N), which slice,
                # the interpreter and the copy kernels take only as integers
                sizes = ", ".join(fmt_dim(t.shape[axis]) for t in e.inputs)
                raise OpError(f"a concat along dim {axis}{', the batch dim,' if axis == 0 else ''} of symbolic "
                              f"sizes ({sizes}) has no gradient: input {i}'s part of it would start at "
                              f"{fmt_dim(start)} and stop at {fmt_dim(stop)}, and slices take integer bounds; "
                              f"it runs forward only (concatenate along a dim of fixed size to train through it)",
                              i, kind=GraphError)
            grads.append(e.emit("slice", [dy], {"dim": axis, "start": start, "stop": stop}, wrt=i)
                         if need else None)
            start = stop
        return grads


@register
class Slice(Op):
    """x[..., start:stop, ...] along one dim (the gradient of concat)."""
    name = "slice"
    kind = "injective"
    attrs = {"dim": REQUIRED, "start": REQUIRED, "stop": REQUIRED}

    def normalize(self, a):
        for key in ("start", "stop"):
            if not sp.sympify(a[key]).is_Integer:
                raise OpError(f"slice {key} must be a concrete integer, got {a[key]}", kind=GraphError)
        return {"dim": int(a["dim"]), "start": int(a["start"]), "stop": int(a["stop"])}

    def shape(self, ins, attrs):
        s = ins[0].shape
        axis = _axis(attrs["dim"], len(s), "dim")
        if not 0 <= attrs["start"] < attrs["stop"] or provably_true(sp.Gt(attrs["stop"], s[axis])):
            raise OpError(f"slice {attrs['start']}:{attrs['stop']} is out of range for dim {axis} of {fmt_shape(s)}")
        return (*s[:axis], sp.Integer(attrs["stop"] - attrs["start"]), *s[axis + 1:])

    def reference(self, xs, attrs):
        index = [slice(None)] * xs[0].ndim
        index[attrs["dim"]] = slice(attrs["start"], attrs["stop"])
        return np.ascontiguousarray(xs[0][tuple(index)])


@register
class ReduceSum(Op):
    """Sum over the given axes (the gradient of a broadcast bias)."""
    name = "reduce_sum"
    kind = "reduction"
    attrs = {"axes": REQUIRED}

    def normalize(self, a):
        return {"axes": tuple(sorted(int(v) for v in a["axes"]))}

    def shape(self, ins, attrs):
        s = ins[0].shape
        for axis in attrs["axes"]:
            if not 0 <= axis < len(s):
                raise OpError(f"axis {axis} is out of range for {fmt_shape(s)}")
        return tuple(d for i, d in enumerate(s) if i not in attrs["axes"])

    def reference(self, xs, attrs):
        return xs[0].sum(axis=attrs["axes"])


def mean_axes(attrs, rank) -> tuple:
    """The axes a mean reduces: all for dim=None, else each dim in -rank..rank-1, once."""
    if attrs["dim"] is None:
        return tuple(range(rank))
    axes = tuple(_axis(d, rank, "dim") for d in attrs["dim"])
    if len(set(axes)) != len(axes):
        raise OpError(f"dim {attrs['dim']} names an axis twice")
    return tuple(sorted(axes))


class MeanBase(Op):
    attrs = {"dim": None, "keepdim": False}

    def normalize(self, a):
        dim = a["dim"]
        if dim is not None:
            dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
            for d in dims:
                if isinstance(d, bool) or not isinstance(d, numbers.Integral):
                    raise OpError(f"dim must be None, an int or a tuple of ints, got {dim!r}", kind=GraphError)
            dim = tuple(int(d) for d in dims)
            if not dim:
                raise OpError("dim=() reduces nothing; give None for the mean of every element", kind=GraphError)
        return {"dim": dim, "keepdim": as_bool(a["keepdim"], "keepdim")}

    def reduced_shape(self, s, attrs):
        axes = mean_axes(attrs, len(s))
        if attrs["keepdim"]:
            return tuple(sp.Integer(1) if i in axes else d for i, d in enumerate(s))
        return tuple(d for i, d in enumerate(s) if i not in axes)


@register
class Mean(MeanBase):
    """The mean over `dim` (all elements when None), as torch.mean."""
    name = "mean"
    kind = "reduction"

    def shape(self, ins, attrs):
        return self.reduced_shape(ins[0].shape, attrs)

    def reference(self, xs, attrs):
        x = xs[0]
        return np.asarray(x.mean(axis=mean_axes(attrs, x.ndim), keepdims=attrs["keepdim"]), dtype=x.dtype)

    def grad(self, e, dy, needs):
        return [e.emit("mean_grad", [e.inputs[0], dy], e.attrs, wrt=0) if needs[0] else None]


@register
class MeanGrad(GradientOp, MeanBase):
    """dy / count, broadcast back over the reduced axes (the input is read for its shape only)."""
    name = "mean_grad"
    operands = ("input", "grad_output")

    def shape(self, ins, attrs):
        want = self.reduced_shape(ins[0].shape, attrs)
        if len(ins[1].shape) != len(want) or any(provably_ne(a, b) for a, b in zip(ins[1].shape, want)):
            raise OpError(f"grad_output {fmt_shape(ins[1].shape)} must have the mean's shape {fmt_shape(want)}", 1)
        return ins[0].shape

    def reference(self, xs, attrs):
        x, dy = xs
        axes = mean_axes(attrs, x.ndim)
        count = int(np.prod([x.shape[a] for a in axes]))
        kept = dy.reshape([1 if i in axes else n for i, n in enumerate(x.shape)])
        return np.broadcast_to(kept / count, x.shape).astype(x.dtype)     # a copy, contiguous; a 0-d stays 0-d

    def cost(self, ins, out, attrs):
        zero = sp.Integer(0)
        return Cost(zero, zero, nbytes(ins[1]), nbytes(out))


@register
class Part(Op):
    """Output `index` of a node with several outputs (XLA's get-tuple-element). It computes nothing:
    code generation maps it to the buffer the producing kernel writes."""
    name = "part"
    kind = "injective"
    attrs = {"index": REQUIRED}

    def normalize(self, a):
        if isinstance(a["index"], bool) or not isinstance(a["index"], numbers.Integral) or a["index"] < 0:
            raise OpError(f"index must be a non-negative int, got {a['index']!r}", kind=GraphError)
        return {"index": int(a["index"])}

    def infer(self, ins, attrs):
        t = ins[0]
        if not isinstance(t, TupleType):
            raise OpError(f"part reads a node with several outputs, got a single {t}")
        if attrs["index"] >= len(t.parts):
            raise OpError(f"index {attrs['index']} is out of range: the operand has {len(t.parts)} outputs")
        return t.parts[attrs["index"]]

    def reference(self, xs, attrs):
        return xs[0][attrs["index"]]

    def cost(self, ins, out, attrs):
        zero = sp.Integer(0)
        return Cost(zero, zero, zero, zero)    # a view of a buffer the producer wrote
