"""The lecture's linear-classifier losses, averaged over the batch:

softmax_cross_entropy:  L_i = -log(exp(s_{y_i}) / sum_j exp(s_j))
hinge (multiclass SVM): L_i = sum_{j != y_i} max(0, s_j - s_{y_i} + margin)

(PyTorch's MultiMarginLoss also divides L_i by the number of classes; the lecture's form does not.)
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from ..errors import OpError
from ..shapes import fmt_dim, fmt_shape, provably_ne
from .base import FLOAT_DTYPES, GradientOp, Op, as_float, register


def hinge_margins(s, y, margin):
    """max(0, s_j - s_y + margin) per example and class, 0 for the true class."""
    rows = np.arange(len(y))
    margins = np.maximum(0, s - s[rows, y][:, None] + s.dtype.type(margin))
    margins[rows, y] = 0
    return margins


class ClassifierLoss(Op):
    kind = "reduction"
    operands = ("scores", "target")

    def dtype(self, ins, attrs):
        if ins[0].dtype not in FLOAT_DTYPES:
            raise OpError(f"scores must be float32 or float64, got {ins[0].dtype}")
        if ins[1].dtype != "int64":
            raise OpError(f"target must hold int64 class indices, got {ins[1].dtype}", 1)
        return ins[0].dtype

    def shape(self, ins, attrs):
        s, t = ins[0].shape, ins[1].shape
        if len(s) != 2:
            raise OpError(f"{self.name} expects scores [N, classes], got {len(s)}-D {fmt_shape(s)}")
        if len(t) != 1 or provably_ne(t[0], s[0]):
            raise OpError(f"target must have shape [{fmt_dim(s[0])}] (one class per example), got {fmt_shape(t)}", 1)
        if sp.simplify(t[0] - s[0]) != 0:  # e.g. M and N: two symbols bound separately could differ
            raise OpError(f"target has {fmt_dim(t[0])} entries but scores have {fmt_dim(s[0])} rows; give the target "
                          f"the scores' batch dim [{fmt_dim(s[0])}] (one class per example)", 1)
        return ()

    def check_target(self, scores, target):
        if target.size and (target.min() < 0 or target.max() >= scores.shape[1]):
            bad = target[(target < 0) | (target >= scores.shape[1])][0]
            raise OpError(f"target holds class {bad}, outside 0..{scores.shape[1] - 1}", 1)


@register
class SoftmaxCrossEntropy(ClassifierLoss):
    name = "softmax_cross_entropy"

    def reference(self, xs, attrs):
        s, y = xs
        self.check_target(s, y)
        shifted = s - s.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(shifted).sum(axis=1))
        return np.asarray((log_z - shifted[np.arange(len(y)), y]).mean(), dtype=s.dtype)

    def grad(self, e, dy, needs):
        return [e.emit("softmax_cross_entropy_grad", [*e.inputs, dy], {}, wrt=0) if needs[0] else None, None]


@register
class Hinge(ClassifierLoss):
    name = "hinge_loss"
    attrs = {"margin": 1.0}

    def normalize(self, a):
        return {"margin": as_float(a["margin"], "margin")}

    def reference(self, xs, attrs):
        s, y = xs
        self.check_target(s, y)
        return np.asarray(hinge_margins(s, y, attrs["margin"]).sum(axis=1).mean(), dtype=s.dtype)

    def grad(self, e, dy, needs):
        return [e.emit("hinge_loss_grad", [*e.inputs, dy], e.attrs, wrt=0) if needs[0] else None, None]


class LossGrad(GradientOp, ClassifierLoss):
    """dL/d(scores) of a classifier loss, scaled by the upstream scalar gradient."""
    operands = ("scores", "target", "grad_output")

    def shape(self, ins, attrs):
        super().shape(ins[:2], attrs)
        if ins[2].shape != ():
            raise OpError(f"grad_output must be a scalar, got {fmt_shape(ins[2].shape)}", 2)
        return ins[0].shape

    def dtype(self, ins, attrs):
        return super().dtype(ins[:2], attrs)


@register
class SoftmaxCrossEntropyGrad(LossGrad):
    """(softmax(s) - onehot(y)) / N."""
    name = "softmax_cross_entropy_grad"

    def reference(self, xs, attrs):
        s, y, dl = xs
        self.check_target(s, y)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(y)), y] -= 1
        return (p * (dl / len(y))).astype(s.dtype)


@register
class HingeLossGrad(LossGrad):
    """+1/N for every class j != y whose margin is active, -(their count)/N for the true class."""
    name = "hinge_loss_grad"
    attrs = {"margin": 1.0}

    def normalize(self, a):
        return {"margin": float(a["margin"])}

    def reference(self, xs, attrs):
        s, y, dl = xs
        self.check_target(s, y)
        rows = np.arange(len(y))
        active = (hinge_margins(s, y, attrs["margin"]) > 0).astype(s.dtype)
        active[rows, y] = -active.sum(axis=1)
        return (active * (dl / len(y))).astype(s.dtype)

