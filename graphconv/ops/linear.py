"""linear: y = x @ W + b with W stored [in_features, out_features], the lecture's orientation
(its LeNet-5 table lists `2450 x 500`). PyTorch stores the transpose."""
from __future__ import annotations

import numpy as np

from ..errors import OpError
from ..shapes import fmt_dim, fmt_shape, provably_ne
from .base import Op, register


@register
class Linear(Op):
    name = "linear"
    operands = ("input", "weight", "bias")
    optional = ("bias",)
    param_operands = ("weight", "bias")

    def shape(self, ins, attrs):
        x, w = ins[0], ins[1]
        if len(x.shape) != 2:
            hint = "; flatten it first (g.flatten)" if len(x.shape) > 2 else ""
            raise OpError(f"linear expects a 2-D input [N, in_features], got {len(x.shape)}-D "
                          f"{fmt_shape(x.shape)}{hint}")
        if len(w.shape) != 2:
            raise OpError(f"weight must be 2-D [in_features, out_features], got {fmt_shape(w.shape)}", 1)
        if provably_ne(x.shape[1], w.shape[0]):
            raise OpError(f"input has {fmt_dim(x.shape[1])} features, weight expects {fmt_dim(w.shape[0])}")
        if len(ins) > 2 and (len(ins[2].shape) != 1 or provably_ne(ins[2].shape[0], w.shape[1])):
            raise OpError(f"bias must have shape [{fmt_dim(w.shape[1])}], got {fmt_shape(ins[2].shape)}", 2)
        return (x.shape[0], w.shape[1])

    def reference(self, xs, attrs):
        y = xs[0] @ xs[1]
        if len(xs) > 2:
            y = y + xs[2]
        return y

    def macs(self, ins, out, attrs):
        return out.shape[0] * ins[1].shape[0] * ins[1].shape[1]
