"""Independent oracles: the textbook definitions, written as plain loops over output positions.

Nothing here shares code with graphconv; the loops are slow, so the tests keep shapes small.
"""
import itertools

import numpy as np


def pad_naive(x, pads, mode):
    """Pad the spatial axes one index at a time, by the padding mode's definition."""
    spatial = x.shape[2:]
    out_shape = x.shape[:2] + tuple(s + lo + hi for s, (lo, hi) in zip(spatial, pads))
    out = np.zeros(out_shape, dtype=x.dtype)
    for idx in itertools.product(*(range(s) for s in out_shape[2:])):
        src = []
        for i, s, (lo, _) in zip(idx, spatial, pads):
            j = i - lo
            if 0 <= j < s:
                src.append(j)
            elif mode == "zeros":
                src = None
                break
            elif mode == "reflect":
                src.append(-j if j < 0 else 2 * (s - 1) - j)
            elif mode == "replicate":
                src.append(min(max(j, 0), s - 1))
            elif mode == "circular":
                src.append(j % s)
        if src is not None:
            out[(slice(None), slice(None)) + idx] = x[(slice(None), slice(None)) + tuple(src)]
    return out


def conv_naive(x, w, b, stride, pads, dilation, groups, mode="zeros"):
    xp = pad_naive(x, pads, mode)
    n, c = x.shape[:2]
    c_out, cg = w.shape[:2]
    kernel = w.shape[2:]
    out_sp = [(p - d * (k - 1) - 1) // s + 1 for p, k, s, d in zip(xp.shape[2:], kernel, stride, dilation)]
    out = np.zeros((n, c_out, *out_sp))
    per_group = c_out // groups
    for o in range(c_out):
        g = o // per_group
        for pos in itertools.product(*(range(v) for v in out_sp)):
            acc = np.zeros(n)
            for ci in range(cg):
                for kpos in itertools.product(*(range(k) for k in kernel)):
                    src = tuple(p * s + q * d for p, s, q, d in zip(pos, stride, kpos, dilation))
                    acc += xp[(slice(None), g * cg + ci) + src] * w[(o, ci) + kpos]
            out[(slice(None), o) + pos] = acc + (b[o] if b is not None else 0)
    return out


def pool_naive(x, mode, kernel, stride, pads, dilation, out_sp, count_include_pad=True):
    """PyTorch's pooling by its definition: window o starts at o*S - P_lo; max ignores positions
    outside the input; avg divides by the window clipped to the padded input (count_include_pad)
    or by the number of input positions it covers."""
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    out = np.zeros((n, c, *out_sp))
    for pos in itertools.product(*(range(v) for v in out_sp)):
        starts = [p * s - lo for p, s, (lo, _) in zip(pos, stride, pads)]
        values, padded_count = [], 1
        for axis, (st, k, d, size, (lo, hi)) in enumerate(zip(starts, kernel, dilation, spatial, pads)):
            end = min(st + (k - 1) * d + 1, size + hi)
            padded_count *= len(range(st, end, d))
        for kpos in itertools.product(*(range(k) for k in kernel)):
            src = tuple(st + q * d for st, q, d in zip(starts, kpos, dilation))
            if all(0 <= i < s for i, s in zip(src, spatial)):
                values.append(x[(slice(None), slice(None)) + src])
        stack = np.stack(values)
        if mode == "max":
            out[(slice(None), slice(None)) + pos] = stack.max(axis=0)
        else:
            div = padded_count if count_include_pad else len(values)
            out[(slice(None), slice(None)) + pos] = stack.sum(axis=0) / div
    return out


def batch_norm_naive(x, mean, var, weight, bias, eps, training):
    out = np.empty_like(x, dtype=np.float64)
    for c in range(x.shape[1]):
        xc = x[:, c].astype(np.float64)
        if training:
            m = xc.sum() / xc.size
            v = ((xc - m) ** 2).sum() / xc.size
        else:
            m, v = mean[c], var[c]
        y = (xc - m) / np.sqrt(v + eps)
        if weight is not None:
            y = y * weight[c] + bias[c]
        out[:, c] = y
    return out


def cross_entropy_naive(s, y):
    total = 0.0
    for i in range(len(y)):
        row = s[i].astype(np.float64)
        total += np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[y[i]]
    return total / len(y)


def hinge_naive(s, y, margin=1.0):
    total = 0.0
    for i in range(len(y)):
        for j in range(s.shape[1]):
            if j != y[i]:
                total += max(0.0, s[i, j] - s[i, y[i]] + margin)
    return total / len(y)
