"""Every op, registered in OPS on import. One module per op family."""
from . import adaptive, conv, dropout, fused, layout, linear, loss, norm, optim, pointwise, pool, softmax, source, upsample  # noqa: F401  (fills OPS)
from .base import OPS, REQUIRED, Cost, Op, TensorType, TupleType, as_float_dtype, lookup, register

__all__ = ["OPS", "REQUIRED", "Cost", "Op", "TensorType", "TupleType", "lookup", "register"]
