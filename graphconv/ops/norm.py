"""batch_norm over axis 1 (PyTorch's BatchNorm1d/2d/3d): training mode normalises with the batch's
statistics (biased variance), eval mode with the running statistics.

Operands: input, running_mean, running_var, then weight and bias when affine."""
from __future__ import annotations

import numpy as np

from ..errors import OpError
from ..shapes import fmt_dim, fmt_shape, numel, provably_ne
from .base import REQUIRED, GradientOp, Op, as_bool, as_float, register


@register
class BatchNorm(Op):
    name = "batch_norm"
    operands = ("input", "running_mean", "running_var", "weight", "bias")
    optional = ("weight", "bias")
    param_operands = ("weight", "bias")
    attrs = {"eps": 1e-5, "momentum": 0.1, "training": True}

    def normalize(self, a):
        return {"eps": as_float(a["eps"], "eps", positive=True), "momentum": as_float(a["momentum"], "momentum"),
                "training": as_bool(a["training"], "training")}

    def shape(self, ins, attrs):
        x = ins[0]
        check_eps(attrs["eps"], x.dtype)
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

    def reference(self, xs, attrs):
        x = xs[0]
        if attrs["training"] and x.size == x.shape[1]:
            raise OpError(f"batch statistics need more than one value per channel, got input {list(x.shape)} "
                          f"(as in PyTorch; use eval mode or a larger batch)")
        y, _ = normalized(x, xs[1], xs[2], attrs["eps"], attrs["training"])
        bshape = (1, -1) + (1,) * (x.ndim - 2)
        if len(xs) == 5:                                # in place: y is a fresh array
            y *= xs[3].reshape(bshape)
            y += xs[4].reshape(bshape)
        return y.astype(x.dtype, copy=False)

    def macs(self, ins, out, attrs):
        return numel(out.shape)  # one multiply-add per element once folded to scale and shift

    def grad(self, e, dy, needs):
        x, mean, var = e.inputs[:3]
        axes = (0, *range(2, len(x.shape)))
        flags = {"eps": e.attrs["eps"], "training": e.attrs["training"]}
        grads = [e.emit("batch_norm_grad_input", [x, mean, var, dy, *e.inputs[3:4]], flags, wrt=0) if needs[0] else None,
                 None, None]
        if len(needs) == 5:
            grads.append(e.emit("batch_norm_grad_weight", [x, mean, var, dy], flags, wrt=3) if needs[3] else None)
            grads.append(e.emit("reduce_sum", [dy], {"axes": axes}, wrt=4) if needs[4] else None)
        return grads


def check_eps(eps, dtype):
    """eps must survive the cast to the tensor's dtype (1e-50 is 0 in float32: 0/0 on a constant channel)."""
    if dtype in ("float32", "float64") and np.dtype(dtype).type(eps) == 0:
        raise OpError(f"eps {eps:g} is 0 in {dtype}; use at least {np.finfo(dtype).tiny:g}")


def channel_sum(a3):
    """[N, C, P] -> [C]: pairwise sums along the contiguous P, then over N (NumPy's accurate order).
    Where a float32 sum of finite terms overflows (squares of deviations near 1e19), the sum is taken
    again in float64, as the kernels add, and rounded once: the result overflows only if it must."""
    with np.errstate(over="ignore"):
        total = a3.sum(axis=2).sum(axis=0)
    if a3.dtype == np.float32 and not np.isfinite(total).all() and np.isfinite(a3).all():
        with np.errstate(over="ignore"):
            total = a3.sum(axis=2, dtype=np.float64).sum(axis=0).astype(np.float32)
    return total


def batch_stats(x):
    """(mean, biased variance) per channel of [N, C, ...], and the deviations x - mean as [N, C, P]:
    the variance from the deviations (no cancellation), two passes over x."""
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    m = x3.shape[0] * x3.shape[2]
    with np.errstate(over="ignore"):
        mean = channel_sum(x3) / x.dtype.type(m)
    if x.dtype == np.float32 and not np.isfinite(mean).all() and np.isfinite(x3).all():
        mean = (x3.sum(axis=2, dtype=np.float64).sum(axis=0) / m).astype(np.float32)   # divided before rounding
    d = x3 - mean[None, :, None]
    with np.errstate(over="ignore"):
        var = channel_sum(np.square(d)) / x.dtype.type(m)
    if x.dtype == np.float32 and not np.isfinite(var).all() and np.isfinite(d).all():
        # finite deviations whose squares (or their sum) pass float32's range (|d| near 1e19): added
        # in float64, as the kernels add them, and rounded once (inf only if the variance itself is)
        with np.errstate(over="ignore"):
            var = (channel_sum(np.square(d, dtype=np.float64)) / m).astype(np.float32)
    return mean, var, d


def normalized(x, mean, var, eps, training):
    """(x_hat, 1/sqrt(var + eps)) broadcast over axis 1, with batch or running statistics."""
    bshape = (1, -1) + (1,) * (x.ndim - 2)
    if training:
        mean, var, d = batch_stats(x)
    else:
        d = x.reshape(x.shape[0], x.shape[1], -1) - mean[None, :, None]
    inv_std = 1 / np.sqrt(var + x.dtype.type(eps))
    d *= inv_std[None, :, None]                         # x_hat, in the deviations' array
    return d.reshape(x.shape), inv_std.reshape(bshape)


class BatchNormGradBase(GradientOp):
    operands = ("input", "running_mean", "running_var", "grad_output")
    attrs = {"eps": REQUIRED, "training": REQUIRED}

    def normalize(self, a):
        return {"eps": as_float(a["eps"], "eps", positive=True), "training": as_bool(a["training"], "training")}


@register
class BatchNormGradInput(BatchNormGradBase):
    """dL/dx of batch_norm. Training: dx = inv_std/M * (M*g - sum(g) - x_hat*sum(g*x_hat)), g = dy*weight;
    eval: dx = dy * weight * inv_std."""
    name = "batch_norm_grad_input"
    operands = BatchNormGradBase.operands + ("weight",)
    optional = ("weight",)

    def shape(self, ins, attrs):
        return ins[0].shape

    def reference(self, xs, attrs):
        x, mean, var, dy = xs[:4]
        x_hat, inv_std = normalized(x, mean, var, attrs["eps"], attrs["training"])
        g = dy * xs[4].reshape((1, -1) + (1,) * (x.ndim - 2)) if len(xs) > 4 else dy
        if not attrs["training"]:
            return (g * inv_std).astype(x.dtype)
        m = x.size // x.shape[1]
        n, c = x.shape[:2]
        g3, x_hat3 = g.reshape(n, c, -1), x_hat.reshape(n, c, -1)
        sum_g, sum_gx = channel_sum(g3), channel_sum(g3 * x_hat3)
        # inv_std / m * (m * g - sum(g) - x_hat * sum(g * x_hat)), written in place into one array
        dx = x_hat3 * -sum_gx[None, :, None]
        dx += m * g3
        dx -= sum_g[None, :, None]
        dx *= inv_std.reshape(1, c, 1) / m
        return dx.reshape(x.shape).astype(x.dtype, copy=False)


@register
class BatchNormGradWeight(BatchNormGradBase):
    """dL/d(weight) of batch_norm: sum over N and space of dy * x_hat."""
    name = "batch_norm_grad_weight"

    def shape(self, ins, attrs):
        return (ins[0].shape[1],)

    def reference(self, xs, attrs):
        x, mean, var, dy = xs
        x_hat, _ = normalized(x, mean, var, attrs["eps"], attrs["training"])
        x_hat *= dy
        return channel_sum(x_hat.reshape(x.shape[0], x.shape[1], -1)).astype(x.dtype)


@register
class BatchNormUpdateStats(Op):
    """The running statistic after one training step, as PyTorch updates it:
    (1 - momentum) * running + momentum * batch statistic (the variance unbiased)."""
    name = "batch_norm_update_stats"
    operands = ("input", "running_stat")
    attrs = {"momentum": REQUIRED, "stat": REQUIRED}

    def normalize(self, a):
        if a["stat"] not in ("mean", "var"):
            raise OpError(f"stat must be 'mean' or 'var', got {a['stat']!r}")
        return {"momentum": float(a["momentum"]), "stat": a["stat"]}

    def shape(self, ins, attrs):
        return ins[1].shape

    def reference(self, xs, attrs):
        x, running = xs
        m = x.size // x.shape[1]
        if attrs["stat"] == "mean":
            batch = channel_sum(x.reshape(x.shape[0], x.shape[1], -1)) / x.dtype.type(m)
        else:
            batch = batch_stats(x)[1] * (m / max(m - 1, 1))
        mom = attrs["momentum"]
        return ((1 - mom) * running + mom * batch).astype(running.dtype)
