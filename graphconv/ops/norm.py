"""batch_norm over axis 1 (PyTorch's BatchNorm1d/2d/3d): training mode normalises with the batch's
statistics (biased variance), eval mode with the running statistics.

Operands: input, running_mean, running_var, then weight and bias when affine."""
from __future__ import annotations

import numpy as np

from ..errors import OpError
from ..shapes import fmt_dim, fmt_shape, numel, provably_ne
from .base import Op, register


@register
class BatchNorm(Op):
    name = "batch_norm"
    operands = ("input", "running_mean", "running_var", "weight", "bias")
    optional = ("weight", "bias")
    param_operands = ("weight", "bias")
    attrs = {"eps": 1e-5, "momentum": 0.1, "training": True}

    def normalize(self, a):
        if not float(a["eps"]) > 0:
            raise OpError(f"eps must be positive, got {a['eps']!r}")
        return {"eps": float(a["eps"]), "momentum": float(a["momentum"]), "training": bool(a["training"])}

    def shape(self, ins, attrs):
        x = ins[0]
        if len(x.shape) < 2:
            raise OpError(f"batch_norm expects an input [N, C, ...], got {len(x.shape)}-D {fmt_shape(x.shape)}")
        if len(ins) == 4:
            raise OpError("batch_norm takes weight and bias together, got only weight", 3)
        for i in range(1, len(ins)):
            s = ins[i].shape
            if len(s) != 1 or provably_ne(s[0], x.shape[1]):
                raise OpError(f"input has {fmt_dim(x.shape[1])} channels, {self.operands[i]} has shape "
                              f"{fmt_shape(s)}", i)
        return x.shape

    def axes(self, x):
        return (0,) + tuple(range(2, x.ndim))

    def statistics(self, x, attrs, running_mean, running_var):
        if attrs["training"]:
            axes = self.axes(x)
            return x.mean(axis=axes), x.var(axis=axes)
        return running_mean, running_var

    def reference(self, xs, attrs):
        x = xs[0]
        mean, var = self.statistics(x, attrs, xs[1], xs[2])
        bshape = (1, -1) + (1,) * (x.ndim - 2)
        y = (x - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + x.dtype.type(attrs["eps"]))
        if len(xs) == 5:
            y = y * xs[3].reshape(bshape) + xs[4].reshape(bshape)
        return y.astype(x.dtype, copy=False)

    def macs(self, ins, out, attrs):
        return numel(out.shape)  # one multiply-add per element once folded to scale and shift
