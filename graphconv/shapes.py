"""Symbolic dimensions: sympy expressions, with a string dim meaning a positive integer symbol.

Rules only raise when a mismatch is *provable*: `provably_true(expr)` is False for anything sympy
cannot decide, so a symbolic batch size never produces a spurious error.
"""
from __future__ import annotations

import functools
import numbers

import sympy as sp

from .errors import OpError

_SYMBOLS: dict[str, sp.Symbol] = {}


def symbol(name: str) -> sp.Symbol:
    """The one symbol for a dim name; every dim symbol is a positive integer."""
    if name not in _SYMBOLS:
        _SYMBOLS[name] = sp.Symbol(name, integer=True, positive=True)
    return _SYMBOLS[name]


def as_dim(value, what="dimension") -> sp.Expr:
    """Normalise one user-given dim (int, str or sympy expression) to a sympy expression."""
    if isinstance(value, bool):
        raise OpError(f"{what} must be an integer or a name, got {value!r}")
    if isinstance(value, str):
        if not value.isidentifier():
            raise OpError(f"{what} {value!r} is not a valid symbol name")
        return symbol(value)
    if isinstance(value, numbers.Integral):
        if value <= 0:
            raise OpError(f"{what} must be positive, got {value}")
        return sp.Integer(int(value))
    if isinstance(value, sp.Expr):
        # a user's own sp.Symbol("H") is graphconv's dim H (a positive integer), so -H is refused here
        odd = [s.name for s in value.free_symbols if not s.name.isidentifier()]
        if odd:
            raise OpError(f"{what} {value}: the symbol {odd[0]!r} is not a valid symbol name")
        value = value.subs({s: symbol(s.name) for s in value.free_symbols})
        if value.is_integer is False or (value.is_number and not value.is_integer):
            raise OpError(f"{what} {value} is not an integer")
        if value.is_positive is False:
            raise OpError(f"{what} must be positive, got {value}")
        return value
    if isinstance(value, numbers.Real) and float(value).is_integer():
        raise OpError(f"{what} {value!r} is a float; give an int")
    raise OpError(f"{what} must be an integer or a name, got {value!r}")


def as_shape(dims, what="shape") -> tuple:
    if isinstance(dims, (str, numbers.Integral, sp.Expr)):
        dims = (dims,)
    return tuple(as_dim(d, f"{what} dim {i}") for i, d in enumerate(dims))


def provably_true(relation) -> bool:
    """True only when sympy can decide the relation and it holds."""
    return bool(relation == sp.true) if isinstance(relation, sp.logic.boolalg.BooleanAtom) else False


def provably_ne(a, b) -> bool:
    diff = sp.simplify(sp.Integer(0) + a - b)
    return diff.is_zero is False


def numel(shape) -> sp.Expr:
    out = sp.Integer(1)
    for d in shape:
        out = out * d
    return out


def fmt_dim(d) -> str:
    return str(tidy(d)).replace(" ", "")


@functools.lru_cache(maxsize=4096)
def tidy(expr) -> sp.Expr:
    """A size expression in a shorter form of the same value, for display: each floor or ceiling of
    an integer over a whole divisor is tried as the other rounding (floor(n/d) = ceiling((n-d+1)/d))
    and with a rounding of its own kind inside taken out (floor(floor(x)/d) = floor(x/d)); a form is
    kept when the whole expression gets shorter. A stride-2 conv's floor(H/2 - 1/2) + 1 reads
    ceiling(H/2), two of them ceiling(H/4). The shapes themselves are never rewritten."""
    expr = sp.sympify(expr)
    tried = set()
    while True:
        atoms = sorted((a for a in expr.atoms(sp.floor, sp.ceiling) if a not in tried), key=_display_key)
        if not atoms:
            return expr
        for atom in atoms:
            tried.add(atom)
            best = min([expr, *(expr.xreplace({atom: alt}) for alt in _roundings(atom))], key=_display_key)
            if best != expr:
                expr = best
                break


def _display_key(expr):
    return len(str(expr)), str(expr)


def _roundings(atom) -> list:
    """The forms of floor(n/d) or ceiling(n/d) (n integer-valued, d a whole number) that are equal to
    it: as the other rounding, and either with a rounding of the same kind inside n taken out."""
    kind = type(atom)
    other = sp.ceiling if kind is sp.floor else sp.floor
    num, den = sp.fraction(sp.together(atom.args[0]))
    if not (den.is_Integer and den > 1 and num.is_integer):
        return []
    shift = 1 - den if kind is sp.floor else den - 1
    forms = [other((num + shift) / den)]
    for k, n in ((kind, num), (other, num + shift)):     # k((k(x) + r)/d) = k((x + r)/d), r integer
        forms += [k((n - term + term.args[0]) / den) for term in sp.Add.make_args(n) if isinstance(term, k)]
    return forms


def fmt_shape(shape, sep=",") -> str:
    return "[" + sep.join(fmt_dim(d) for d in shape) + "]"


def window_out(size, kernel, stride, pad_lo, pad_hi, dilation=1, ceil_mode=False):
    """Output length of a sliding window: floor((H + 2P - D(K-1) - 1)/S) + 1 (or ceil, PyTorch's
    rule that the last window must start inside the input or the left padding)."""
    span = size + pad_lo + pad_hi - dilation * (kernel - 1) - 1
    if not ceil_mode:
        return sp.floor(sp.Rational(1, 1) * span / stride) + 1
    out = sp.ceiling(sp.Rational(1, 1) * span / stride) + 1
    # drop a last window that would start in the right padding
    last_start = (out - 1) * stride
    drop = sp.Ge(last_start, size + pad_lo)
    if drop == sp.true:
        return out - 1
    if drop == sp.false:
        return out
    return sp.Piecewise((out - 1, drop), (out, True))
