"""dropout: in training, each element is kept with probability 1 - p and scaled by 1 / (1 - p), or
zeroed; in eval mode the identity (nn.Dropout).

The mask is a pure function of (seed, the layer's salt, the step counter, the element's index): a
counter-based hash (SplitMix64's finalizer), so the NumPy reference and every kernel draw the same
mask bit for bit, a step can be replayed exactly, and the gradient needs no saved mask (it draws it
again: the gradient of dropout is dropout of dy with the same key). The step counter is a scalar
buffer (`dropout.step`) that each training step increments, so a captured step draws a new mask
every replay and a checkpoint resumes the sequence.
"""
from __future__ import annotations

import numbers

import numpy as np
import sympy as sp

from ..errors import GraphError, OpError
from ..shapes import fmt_shape
from .base import Cost, Op, as_bool, as_float, nbytes, register

GOLDEN = 0x9E3779B97F4A7C15
M1, M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
BITS = 24                       # the uniform draw: the top 24 bits of the hash
STEP_BUFFER = "dropout.step"


def mix64(z):
    """SplitMix64's finalizer on uint64 (arrays wrap as C's unsigned long long does)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(M2)
        return z ^ (z >> np.uint64(31))


def threshold(p) -> int:
    """Elements whose 24-bit draw is below this are dropped: round(p * 2^24), so p acts at a
    resolution of 2^-24 (dropping with probability threshold / 2^24)."""
    return int(round(p * (1 << BITS)))


def base_key(seed, salt) -> int:
    """What the layer contributes to the key (a constant of its kernel): seed * golden ^ salt << 32."""
    return ((seed * GOLDEN) % 2**64) ^ (salt << 32)


def keep_mask(n, seed, salt, step, p) -> np.ndarray:
    """The keep mask of n elements for one (seed, salt, step)."""
    with np.errstate(over="ignore"):
        key = mix64(np.array([base_key(seed, salt) ^ (int(step) % 2**64)], np.uint64))[0]
        idx = np.arange(1, n + 1, dtype=np.uint64)
        z = mix64(key + idx * np.uint64(GOLDEN))
    return (z >> np.uint64(64 - BITS)) >= np.uint64(threshold(p))


@register
class Dropout(Op):
    name = "dropout"
    kind = "opaque"
    operands = ("input", "step")
    attrs = {"p": 0.5, "training": True, "seed": 0, "salt": 0}

    def normalize(self, a):
        p = as_float(a["p"], "p")
        if not 0 <= p < 1:
            raise OpError(f"p must be in [0, 1) (the probability of dropping an element), got {a['p']!r}",
                          kind=GraphError)
        if 0 < p and threshold(p) == 0:
            raise OpError(f"p={p:g} is below the mask's resolution of 2^-{BITS} (it would drop nothing); use p=0 "
                          f"or at least {2.0 ** -(BITS + 1):.2g}", kind=GraphError)
        out = {"p": p, "training": as_bool(a["training"], "training")}
        for key in ("seed", "salt"):
            v = a[key]
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < 2**32:
                raise OpError(f"{key} must be an int in [0, 2^32), got {v!r}", kind=GraphError)
            out[key] = int(v)
        return out

    def shape(self, ins, attrs):
        if ins[1].shape != ():
            raise OpError(f"step must be a scalar counter, got {fmt_shape(ins[1].shape)}", 1)
        return ins[0].shape

    def scale(self, attrs) -> float:
        return 1.0 / (1.0 - attrs["p"])

    def reference(self, xs, attrs):
        x, step = xs
        if not attrs["training"] or attrs["p"] == 0:
            return x.copy()
        mask = keep_mask(x.size, attrs["seed"], attrs["salt"], float(step), attrs["p"]).reshape(x.shape)
        return np.where(mask, x * x.dtype.type(self.scale(attrs)), x.dtype.type(0))

    def grad(self, e, dy, needs):
        return [e.emit("dropout", [dy, e.inputs[1]], e.attrs, wrt=0) if needs[0] else None, None]

    def cost(self, ins, out, attrs):
        zero = sp.Integer(0)
        if not attrs["training"]:
            return Cost(zero, zero, zero, zero)      # the identity: a view of its input
        return Cost(zero, zero, nbytes(ins[0]), nbytes(out))      # elementwise: no multiply-adds counted
