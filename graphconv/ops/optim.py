"""Parameter updates as pointwise ops, so one training step is one graph (PyTorch's formulas):

SGD:  v' = momentum * v + (g + weight_decay * p);  p' = p - lr * v'
Adam: m' = b1 m + (1 - b1) g;  v' = b2 v + (1 - b2) g^2  (g = grad + weight_decay * p);
      p' = p - lr * (m' / (1 - b1^t)) / (sqrt(v' / (1 - b2^t)) + eps),  t the step count after this step
The learning rate is an operand (the scalar buffer opt.lr), not an attribute: a schedule changes it
between steps without changing the graph or its kernels, so a captured step follows it.
"""
import numpy as np
import sympy as sp

from .base import register
from .pointwise import Pointwise

p, g, v, m, t = (sp.Symbol(n, real=True) for n in ("p", "g", "v", "m", "t"))
lr, momentum, wd, b1, b2, eps = (sp.Symbol(n, real=True) for n in ("lr", "momentum", "weight_decay", "beta1",
                                                                     "beta2", "eps"))

register(Pointwise("sgd_velocity", momentum * v + g + wd * p, ("v", "g", "p"), {"momentum": 0.0, "weight_decay": 0.0}))
register(Pointwise("sgd_param", p - lr * v, ("p", "v", "lr")))


# NumPy forms of the Adam updates with the fewest passes over the arrays (each result written in
# place into one fresh array), the same operations in the same order as the sympy expressions print
# (tests check that the two agree bit for bit)
def _decayed(g, p, wd):
    return g if wd == 0 else g + wd * p


def _adam_moment1(m_, g_, p_, beta1, wd):
    out = _decayed(g_, p_, wd) * (1 - beta1)
    out += beta1 * m_
    return out


def _adam_moment2(v_, g_, p_, beta2, wd):
    gg = _decayed(g_, p_, wd)
    out = gg * gg
    out *= 1 - beta2
    out += beta2 * v_
    return out


def _adam_param(p_, m_, v_, t_, lr_, beta1, beta2, eps_):
    den = np.asarray(v_ / (1 - beta2 ** t_))          # 0-d operands give NumPy scalars: make them arrays
    np.sqrt(den, out=den)
    den += eps_
    den *= 1 - beta1 ** t_
    out = np.asarray(-lr_ * m_)
    out /= den
    out += p_
    return out


register(Pointwise("adam_moment1", b1 * m + (1 - b1) * (g + wd * p), ("m", "g", "p"), {"beta1": 0.9, "weight_decay": 0.0},
                   numpy=_adam_moment1))
register(Pointwise("adam_moment2", b2 * v + (1 - b2) * (g + wd * p) ** 2, ("v", "g", "p"),
                   {"beta2": 0.999, "weight_decay": 0.0}, numpy=_adam_moment2))
register(Pointwise("adam_param", p - lr * (m / (1 - b1 ** t)) / (sp.sqrt(v / (1 - b2 ** t)) + eps),
                   ("p", "m", "v", "t", "lr"), {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}, numpy=_adam_param))
register(Pointwise("increment", t + 1, ("t",)))
