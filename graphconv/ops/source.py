"""Source nodes: graph inputs (bound at run time) and parameters/buffers (bound from a params dict)."""
from __future__ import annotations

import math

import numpy as np

from ..errors import GraphError, OpError
from ..shapes import as_shape
from .base import REQUIRED, Op, as_bool, as_dtype, register

# How a parameter is initialised, after PyTorch's defaults:
#   ("uniform", bound)  U(-bound, bound); conv/linear weight and bias use bound = 1/sqrt(fan_in)
#   ("constant", value) batch-norm weight (1), bias (0), running mean (0), running var (1)
INIT_KINDS = ("uniform", "constant")


class Source(Op):
    kind = "source"
    operands = ()

    def check_arity(self, count):
        if count:
            raise OpError(f"{self.name} takes no operands, got {count}", kind=GraphError)

    def dtype(self, ins, attrs):
        return attrs["dtype"]

    def shape(self, ins, attrs):
        return attrs["shape"]

    def normalize(self, a):
        return {**a, "dtype": as_dtype(a["dtype"], "dtype"), "shape": as_shape(a["shape"])}

    def reference(self, xs, attrs):
        raise RuntimeError("source nodes are bound, not computed")


@register
class Input(Source):
    name = "input"
    attrs = {"shape": REQUIRED, "dtype": "float32"}


@register
class Param(Source):
    name = "param"
    attrs = {"shape": REQUIRED, "dtype": "float32", "init": REQUIRED, "trainable": True}

    def normalize(self, a):
        a = super().normalize(a)
        init = tuple(a["init"])
        if len(init) != 2 or init[0] not in INIT_KINDS:
            raise OpError(f"init must be one of {INIT_KINDS} with a value, got {a['init']!r}", kind=GraphError)
        try:
            value = float(init[1])
        except (TypeError, ValueError):
            raise OpError(f"init {init[0]!r} takes a number, got {init[1]!r}", kind=GraphError) from None
        if not math.isfinite(value) or (init[0] == "uniform" and value < 0):
            what = "a finite number" if not math.isfinite(value) else "a bound >= 0 (U(-bound, bound))"
            raise OpError(f"init {init[0]!r} takes {what}, got {init[1]!r}", kind=GraphError)
        largest = float(np.finfo(a["dtype"]).max) if np.dtype(a["dtype"]).kind == "f" else math.inf
        if abs(value) > largest:
            raise OpError(f"init {init[0]!r} value {value:g} is past the largest {a['dtype']} ({largest:.3g})",
                          kind=GraphError)
        symbolic = [d for d in a["shape"] if not getattr(d, "is_Integer", isinstance(d, int))]
        if symbolic:
            raise OpError(f"a parameter's shape is known when the graph is built (it is allocated and trained); "
                          f"got {[str(d) for d in a['shape']]} with the symbol {symbolic[0]}", kind=GraphError)
        return {**a, "init": (init[0], value), "trainable": as_bool(a["trainable"], "trainable")}


@register
class Constant(Source):
    """A tensor filled with one value (the seed gradient dL/dL = 1)."""
    name = "constant"
    attrs = {"shape": REQUIRED, "dtype": "float32", "value": REQUIRED}

    def normalize(self, a):
        return {**super().normalize(a), "value": float(a["value"])}

    def reference(self, xs, attrs):
        return np.full(tuple(int(d) for d in attrs["shape"]), attrs["value"], dtype=attrs["dtype"])

    def evaluate(self, xs, attrs, out_shape):
        return np.full(out_shape, attrs["value"], dtype=attrs["dtype"])
