"""Elementwise ops: the activations (relu, leaky_relu, sigmoid, tanh) and add (residual connections)."""
from __future__ import annotations

import numpy as np

from ..errors import OpError
from ..shapes import fmt_shape, provably_ne
from .base import Op, register


class Activation(Op):
    kind = "elementwise"
    operands = ("input",)

    def shape(self, ins, attrs):
        return ins[0].shape


@register
class ReLU(Activation):
    name = "relu"

    def reference(self, xs, attrs):
        return np.maximum(xs[0], 0)


@register
class LeakyReLU(Activation):
    name = "leaky_relu"
    attrs = {"negative_slope": 0.01}

    def normalize(self, a):
        return {"negative_slope": float(a["negative_slope"])}

    def reference(self, xs, attrs):
        x = xs[0]
        return np.where(x > 0, x, x * x.dtype.type(attrs["negative_slope"]))


@register
class Sigmoid(Activation):
    name = "sigmoid"

    def reference(self, xs, attrs):
        x = xs[0]
        e = np.exp(-np.abs(x))  # never overflows
        return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype)


@register
class Tanh(Activation):
    name = "tanh"

    def reference(self, xs, attrs):
        return np.tanh(xs[0])


@register
class Add(Op):
    name = "add"
    kind = "elementwise"
    operands = ("lhs", "rhs")

    def shape(self, ins, attrs):
        a, b = ins[0].shape, ins[1].shape
        if len(a) != len(b) or any(provably_ne(x, y) for x, y in zip(a, b)):
            raise OpError(f"cannot add {fmt_shape(a)} and {fmt_shape(b)}: shapes differ", 1)
        return a

    def reference(self, xs, attrs):
        return xs[0] + xs[1]
