"""linear: y = x @ W + b with W stored [in_features, out_features], the lecture's orientation
(its LeNet-5 table lists `2450 x 500`). PyTorch stores the transpose."""
from __future__ import annotations

from ..errors import OpError
from ..shapes import fmt_dim, fmt_shape, provably_ne
from .base import Op, as_bool, register


def linear_rank_error(x):
    """A linear layer reads [N, in_features]; a feature map must be flattened first."""
    hint = "; flatten it first (g.flatten)" if len(x.shape) > 2 else ""
    return OpError(f"linear expects a 2-D input [N, in_features], got {len(x.shape)}-D {fmt_shape(x.shape)}{hint}")


@register
class Linear(Op):
    name = "linear"
    kind = "out_elementwise"
    mixes_all = True
    operands = ("input", "weight", "bias")
    optional = ("bias",)
    param_operands = ("weight", "bias")

    def shape(self, ins, attrs):
        x, w = ins[0], ins[1]
        if len(x.shape) != 2:
            raise linear_rank_error(x)
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

    def grad(self, e, dy, needs):
        x, w = e.inputs[0], e.inputs[1]
        grads = [e.emit("matmul", [dy, w], {"transpose_b": True}, wrt=0) if needs[0] else None,
                 e.emit("matmul", [x, dy], {"transpose_a": True}, wrt=1) if needs[1] else None]
        if len(needs) > 2:
            grads.append(e.emit("reduce_sum", [dy], {"axes": (0,)}, wrt=2) if needs[2] else None)
        return grads


@register
class MatMul(Op):
    """2-D matrix product with optional transposes (the gradient of linear)."""
    name = "matmul"
    kind = "out_elementwise"
    operands = ("a", "b")
    attrs = {"transpose_a": False, "transpose_b": False}

    def normalize(self, a):
        return {k: as_bool(v, k) for k, v in a.items()}

    def dims(self, ins, attrs):
        a, b = ins[0].shape, ins[1].shape
        for i, s in enumerate((a, b)):
            if len(s) != 2:
                raise OpError(f"matmul needs 2-D operands, got {fmt_shape(s)}", i)
        m, k = (a[1], a[0]) if attrs["transpose_a"] else (a[0], a[1])
        k2, n = (b[1], b[0]) if attrs["transpose_b"] else (b[0], b[1])
        return m, k, k2, n

    def shape(self, ins, attrs):
        m, k, k2, n = self.dims(ins, attrs)
        if provably_ne(k, k2):
            raise OpError(f"inner dims differ: {fmt_dim(k)} vs {fmt_dim(k2)}", 1)
        return (m, n)

    def reference(self, xs, attrs):
        a = xs[0].T if attrs["transpose_a"] else xs[0]
        b = xs[1].T if attrs["transpose_b"] else xs[1]
        return a @ b

    def macs(self, ins, out, attrs):
        m, k, _, n = self.dims(ins, attrs)
        return m * k * n
