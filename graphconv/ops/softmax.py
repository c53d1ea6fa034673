"""softmax and log_softmax along one axis (the classes of [N, classes], or the channels of a map),
and their gradients, written with the forward's output y (what PyTorch saves too):

softmax:      y = exp(x - max) / sum exp(x - max)        dx = y * (dy - sum(dy * y))
log_softmax:  y = (x - max) - log(sum exp(x - max))      dx = dy - exp(y) * sum(dy)
"""
from __future__ import annotations

import numbers

import numpy as np
import sympy as sp

from ..errors import GraphError, OpError
from ..shapes import fmt_shape, numel
from .base import Cost, GradientOp, Op, nbytes, register


def axis_of(dim, rank, what="dim"):
    """A dim in -rank..rank-1 as its non-negative axis."""
    if not -rank <= dim < rank:
        raise OpError(f"{what} {dim} is out of range for a {rank}-D input (valid: {-rank}..{rank - 1})")
    return dim % rank


class SoftmaxBase(Op):
    kind = "opaque"
    attrs = {"dim": 1}

    def normalize(self, a):
        dim = a["dim"]
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise OpError(f"dim must be an int, got {dim!r}", kind=GraphError)
        return {"dim": int(dim)}

    def shape(self, ins, attrs):
        s = ins[0].shape
        if len(s) == 0:
            raise OpError(f"{self.name} needs at least a 1-D input, got a scalar {fmt_shape(s)}")
        axis_of(attrs["dim"], len(s))
        return s

    def cost(self, ins, out, attrs):
        # an exp, a compare, an add and a divide or subtract per element: counted as 2 multiply-adds
        return Cost(sp.Integer(0), 2 * numel(out.shape), sum((nbytes(t) for t in ins), sp.Integer(0)), nbytes(out))


@register
class Softmax(SoftmaxBase):
    name = "softmax"

    def reference(self, xs, attrs):
        x = xs[0]
        e = np.exp(x - x.max(axis=attrs["dim"], keepdims=True))
        return (e / e.sum(axis=attrs["dim"], keepdims=True)).astype(x.dtype)

    def grad(self, e, dy, needs):
        return [e.emit("softmax_grad", [e.output, dy], e.attrs, wrt=0) if needs[0] else None]


@register
class LogSoftmax(SoftmaxBase):
    name = "log_softmax"

    def reference(self, xs, attrs):
        x = xs[0]
        shifted = x - x.max(axis=attrs["dim"], keepdims=True)
        return (shifted - np.log(np.exp(shifted).sum(axis=attrs["dim"], keepdims=True))).astype(x.dtype)

    def grad(self, e, dy, needs):
        return [e.emit("log_softmax_grad", [e.output, dy], e.attrs, wrt=0) if needs[0] else None]


class SoftmaxGradBase(GradientOp, SoftmaxBase):
    operands = ("output", "grad_output")

    def shape(self, ins, attrs):
        if ins[1].shape != ins[0].shape:
            raise OpError(f"grad_output {fmt_shape(ins[1].shape)} must have the output's shape "
                          f"{fmt_shape(ins[0].shape)}", 1)
        return super().shape(ins, attrs)


@register
class SoftmaxGrad(SoftmaxGradBase):
    name = "softmax_grad"

    def reference(self, xs, attrs):
        y, dy = xs
        return (y * (dy - (dy * y).sum(axis=attrs["dim"], keepdims=True))).astype(y.dtype)


@register
class LogSoftmaxGrad(SoftmaxGradBase):
    name = "log_softmax_grad"

    def reference(self, xs, attrs):
        y, dy = xs
        return (dy - np.exp(y) * dy.sum(axis=attrs["dim"], keepdims=True)).astype(y.dtype)
