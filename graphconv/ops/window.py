"""What convolution and pooling share: per-axis hyperparameters and NumPy sliding windows."""
from __future__ import annotations

import numbers

import numpy as np
import sympy as sp

from ..errors import GraphError, OpError
from ..shapes import fmt_dim, provably_true, window_out

AXES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}
LAYOUT = {1: "[N, C, L]", 2: "[N, C, H, W]", 3: "[N, C, D, H, W]"}


def per_axis(value, nd, what, minimum):
    """An int or a tuple of nd ints, each >= minimum, as a tuple of nd ints."""
    items = (value,) * nd if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        raise OpError(f"{what} must be an int or a tuple of {nd} ints, got {value!r}", kind=GraphError)
    if len(items) != nd:
        raise OpError(f"{what} must be an int or a tuple of {nd} ints, got {value!r}", kind=GraphError)
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise OpError(f"{what} must be integers, got {value!r}", kind=GraphError)
        if v < minimum:
            word = "positive" if minimum == 1 else f">= {minimum}"
            raise OpError(f"{what} must be {word}, got {value!r}", kind=GraphError)
    return tuple(int(v) for v in items)


def padding_pairs(value, nd, what="padding"):
    """padding: int, tuple of ints, tuple of (lo, hi) pairs, 'valid' or 'same' (kept as the string;
    it is resolved against the kernel by `resolve_same`)."""
    if isinstance(value, str):
        if value == "valid":
            return ((0, 0),) * nd
        if value == "same":
            return "same"
        raise OpError(f"{what} must be an int, a tuple, 'same' or 'valid', got {value!r}", kind=GraphError)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, (tuple, list)) for v in value):
        if len(value) != nd:
            raise OpError(f"{what} must give {nd} (lo, hi) pairs, got {value!r}", kind=GraphError)
        flat = [per_axis(tuple(p), 2, what, 0) for p in value]
        return tuple(flat)
    return tuple((p, p) for p in per_axis(value, nd, what, 0))


def resolve_same(padding, kernel, dilation):
    """PyTorch's 'same': total D*(K-1) per axis, the odd extra element on the right."""
    if padding != "same":
        return padding
    pairs = []
    for k, d in zip(kernel, dilation):
        total = d * (k - 1)
        pairs.append((total // 2, total - total // 2))
    return tuple(pairs)


def fmt_padding(padding):
    if isinstance(padding, str):
        return padding
    if all(lo == hi for lo, hi in padding):
        return "(" + ",".join(str(lo) for lo, _ in padding) + ")"
    return str(tuple(padding)).replace(" ", "")


def window_shape(op_name, spatial, kernel, stride, pads, dilation, ceil_mode=False, operand=0):
    """Output spatial dims of a sliding window, raising when the window provably does not fit."""
    nd = len(kernel)
    out = []
    for axis, size, k, s, (lo, hi), d in zip(AXES[nd], spatial, kernel, stride, pads, dilation):
        span = d * (k - 1) + 1
        padded = size + lo + hi
        if not ceil_mode and provably_true(sp.Lt(padded, span)):  # ceil_mode may keep one partial window
            dil = f" with dilation {d} spans {span}" if d != 1 else ""
            raise OpError(f"kernel {k}{dil} is larger than the padded input along {axis}: "
                          f"{fmt_dim(size)} + padding {lo + hi} = {fmt_dim(padded)}", operand)
        o = window_out(size, k, s, lo, hi, d, ceil_mode)
        if provably_true(sp.Le(o, 0)):
            raise OpError(f"output size along {axis} would be {fmt_dim(o)} (must be positive)", operand)
        out.append(o)
    return out


def ceil_extra(size, kernel, stride, lo, hi, dilation, out):
    """Extra right padding so that `out` windows fit (non-zero only in ceil_mode)."""
    need = (out - 1) * stride + dilation * (kernel - 1) + 1
    return max(0, need - (size + lo + hi))


def pad_index(size, lo, hi, mode):
    """For each position of an axis padded by (lo, hi), the input position it copies."""
    p = np.arange(-lo, size + hi)
    if mode == "reflect":
        return np.where(p < 0, -p, np.where(p >= size, 2 * (size - 1) - p, p))
    if mode == "replicate":
        return np.clip(p, 0, size - 1)
    if mode == "circular":
        return p % size
    raise ValueError(mode)


def pad_array(x, pads, mode="zeros", value=0.0):
    """Pad the spatial axes (all but N, C) of x. pads: one (lo, hi) per spatial axis."""
    if not any(lo or hi for lo, hi in pads):
        return x
    if mode == "zeros":
        width = [(0, 0), (0, 0)] + [tuple(p) for p in pads]
        return np.pad(x, width, mode="constant", constant_values=value)
    for axis, (lo, hi) in enumerate(pads, 2):
        x = np.take(x, pad_index(x.shape[axis], lo, hi, mode), axis=axis)
    return x


def unpad_adjoint(grad, pads, mode, spatial):
    """The adjoint of pad_array: fold the gradient of a padded array back onto the input, adding
    what each padded position copied to its source (reflect / replicate / circular)."""
    for axis, ((lo, hi), size) in enumerate(zip(pads, spatial), 2):
        if mode == "zeros":
            grad = grad[(slice(None),) * axis + (slice(lo, lo + size),)]
            continue
        moved = np.moveaxis(grad, axis, 0)
        out = np.zeros((size,) + moved.shape[1:], grad.dtype)
        np.add.at(out, pad_index(size, lo, hi, mode), moved)
        grad = np.moveaxis(out, 0, axis)
    return np.ascontiguousarray(grad)


def offset_slices(offset, stride, dilation, out):
    """Index of the input positions that kernel offset `offset` reads for every output position."""
    return (slice(None), slice(None)) + tuple(
        slice(q * d, q * d + s * (o - 1) + 1, s) for q, d, s, o in zip(offset, dilation, stride, out))


def window_reduce(x, kernel, stride, dilation, out, combine):
    """Reduce every window of a padded array with `combine` (np.maximum, np.add), one kernel offset
    at a time: K strided slices of the whole array instead of a reduction over a window view, which
    NumPy runs far slower."""
    acc = None
    for offset in np.ndindex(*kernel):
        part = x[offset_slices(offset, stride, dilation, out)]
        acc = part.copy() if acc is None else combine(acc, part, out=acc)
    return acc
