"""Sympy expressions as C: the printer that turns a pointwise op's own expression into kernel text,
mirroring the NumPy printer in ops/pointwise.py. One C99 printer for both float types; the CUDA
subclass overrides only what differs (the stable sigmoid/softplus device functions, literals of
the kernel's float type).
"""
from __future__ import annotations

import functools
import re

import sympy as sp
from sympy.codegen.ast import float32, float64, real
from sympy.printing.c import C99CodePrinter

from graphconv.ops.pointwise import C_FUNCTIONS

FLOAT_TYPES = {"float32": float32, "float64": float64}


def c_nan(T) -> str:
    """A quiet NaN of C type T (NVRTC has no NAN macro)."""
    return "__int_as_float(0x7fc00000)" if T == "float" else "__longlong_as_double(0x7ff8000000000000LL)"


def c_neg_inf(T) -> str:
    """Minus infinity of C type T (NVRTC has no INFINITY macro)."""
    return "-__int_as_float(0x7f800000)" if T == "float" else "-__longlong_as_double(0x7ff0000000000000LL)"


class NoCForm(Exception):
    """A sympy function (or other object) the C printer has no form for (sympy's arg, a Bessel
    function): the program turns it into a CompileError naming the node whose expression uses it."""

    def __init__(self, expr):
        self.expr = expr
        self.function = getattr(getattr(expr, "func", None), "__name__", type(expr).__name__)
        super().__init__(f"{expr}: no C form for {self.function}")


class CudaPrinter(C99CodePrinter):
    """C99 with the kernel's float type: expf/fabsf and 1.0F for float32, exp/fabs and 1.0 for
    float64; sigmoid and softplus as calls to gc_sigmoid / gc_softplus."""

    def __init__(self, dtype="float32", named=None):
        super().__init__({"type_aliases": {real: FLOAT_TYPES[dtype]}})
        self.T = "float" if dtype == "float32" else "double"
        self.functions_used: set = set()
        self.named = named or {}        # subexpression -> the C name of its value, computed elsewhere

    def _name_of(self, expr):
        try:
            return self.named.get(expr)
        except TypeError:               # the printer also prints lists and strings
            return None

    def _print(self, expr, **kwargs):
        name = self._name_of(expr) if self.named else None
        if name is not None:
            return name
        if (isinstance(expr, sp.Expr) and expr.is_number and not expr.is_Rational and not expr.is_Float
                and expr.is_real and expr.is_finite):
            # an irrational constant (sqrt(2), pi, log(2)) as a literal of the kernel's type: sympy's
            # C printer writes M_SQRT2 / M_PI, which NVRTC does not define, and sqrt(2) of an int
            return self._print(sp.Float(expr.evalf(17), 17))
        return super()._print(expr, **kwargs)

    def parenthesize(self, item, level, strict=False):
        name = self._name_of(item) if self.named else None
        return name if name is not None else super().parenthesize(item, level, strict)

    def _print_Function(self, expr):
        name = type(expr).__name__
        if name in C_FUNCTIONS:
            self.functions_used.add(name)
            return f"gc_{name}({self._print(expr.args[0])})"
        return super()._print_Function(expr)

    def _print_not_supported(self, expr):
        raise NoCForm(expr)

    def _print_Max(self, expr):
        return self._min_max(expr, "max")

    def _print_Min(self, expr):
        return self._min_max(expr, "min")

    def _min_max(self, expr, which):
        """gc_max / gc_min, nested for more than two operands: NaN-propagating, as NumPy's."""
        self.functions_used.add(which)
        text = self._print(expr.args[0])
        for arg in expr.args[1:]:
            text = f"gc_{which}({text}, {self._print(arg)})"
        return text

    def _print_Piecewise(self, expr):
        """One line of nested ternaries (sympy's C printer breaks them over lines)."""
        pieces = list(expr.args)
        last = pieces.pop()
        text = self._print(last.expr) if last.cond == sp.true else c_nan(self.T)  # no branch taken: NaN, as NumPy
        if last.cond != sp.true:
            pieces.append(last)
        for piece in reversed(pieces):
            text = f"(({self._print(piece.cond)}) ? ({self._print(piece.expr)}) : ({text}))"
        return text

    def _print_Pow(self, expr):
        if expr.exp == sp.Rational(1, 3):   # x**(1/3) as NumPy computes it (NaN below 0), not C's cbrt (-2 at -8)
            return f"pow{'f' if self.T == 'float' else ''}({self._print(expr.base)}, {self._print(sp.Rational(1, 3))})"
        if expr.exp == 2 and not expr.base.is_Number:     # x*x, not powf(x, 2)
            base = self._print(expr.base)
            return f"(({base})*({base}))"
        if expr.base.is_Number and expr.base > 0 and not expr.exp.is_Number:
            # c**t (Adam's bias corrections) as exp(t*log(c)): the general pow() would drag in its
            # slow path's stack frame (local memory) for an exponent that is never negative zero
            return self._print(sp.exp(expr.exp * sp.log(expr.base).evalf(17)))
        return super()._print_Pow(expr)


def c_function_prelude(names, dtype) -> str:
    """The device functions an expression uses, for the kernel's float type."""
    T, f = ("float", "f") if dtype == "float32" else ("double", "")
    return "\n".join(C_FUNCTIONS[n].format(T=T, f=f) for n in sorted(names))


def c_expression(expr, dtype, names: dict, prefix="_t") -> tuple[list[str], str, set]:
    """(temporaries, final expression, device functions used): `expr` with common subexpressions
    pulled out as `const T _t0 = ...;` lines (named by `prefix`) and its symbols renamed by `names`
    {symbol name: C}. Memoized: one program prints the same gradient expressions many times, and
    sympy's substitution and elimination are most of a program's build time."""
    before, lines, result, used = _c_expression(sp.sympify(expr), dtype, tuple(sorted(names.items())), prefix, ())
    return list(lines), result, set(used)


def c_expression_hoisting(expr, dtype, names: dict, invariant, prefix="_t") -> tuple[list, list, str, set]:
    """c_expression for a loop body: (lines to run once before the loop, the loop's temporaries,
    final expression, device functions). What the `invariant` C names (a kernel's scalar operands)
    alone give is computed before the loop: a whole temporary, or the largest such part of an
    expression, which the printer then prints as its name in the very place the part stood, so
    every operation is the one the inline form does, in the same order, to the bit."""
    before, lines, result, used = _c_expression(sp.sympify(expr), dtype, tuple(sorted(names.items())), prefix,
                                                tuple(sorted(invariant)))
    return list(before), list(lines), result, set(used)


@functools.lru_cache(maxsize=4096)
def _c_expression(expr, dtype, names: tuple, prefix, invariant: tuple):
    names = dict(names)
    expr = expr.subs({s: sp.Symbol(names[s.name], real=True) for s in expr.free_symbols if s.name in names},
                     simultaneous=True)
    T = "float" if dtype == "float32" else "double"
    temps, reduced = sp.cse(expr, symbols=sp.numbered_symbols(prefix), optimizations="basic")
    fixed_names = set(invariant)

    def fixed(e):
        return bool(e.free_symbols) and all(s.name in fixed_names for s in e.free_symbols)

    hoisted, kept = [], []
    for s, e in temps:                 # a temporary of fixed values alone: computed before the loop
        (hoisted if fixed_names and fixed(e) else kept).append((s, e))
        if fixed_names and fixed(e):
            fixed_names.add(s.name)
    named: dict = {}

    def collect(e):
        """The largest parts of `e` (expressions, not conditions) that fixed values alone give. A
        negative power is named twice, itself and its positive power: the printer prints the first
        where it stands alone and divides by the second inside a product; the unused one is dropped."""
        if e.is_Atom:
            return
        if fixed(e) and isinstance(e, sp.Expr) and not e.is_Relational:
            if e.is_Pow and e.exp.is_Rational and e.exp.is_negative and not (e.base ** -e.exp).is_Atom:
                named.setdefault(e.base ** -e.exp, f"{prefix.replace('_t', '_h', 1)}{len(named)}")
            named.setdefault(e, f"{prefix.replace('_t', '_h', 1)}{len(named)}")
            return
        for a in e.args:
            collect(a)

    if fixed_names:
        for _, e in kept:
            collect(e)
        collect(reduced[0])
    printer = CudaPrinter(dtype, named)
    lines = tuple(f"const {T} {s} = {printer.doprint(e)};" for s, e in kept)
    result = printer.doprint(reduced[0])
    printed = set(re.findall(r"\w+", " ".join(lines + (result,))))
    plain = CudaPrinter(dtype)              # only the names the loop uses are computed before it,
    used = [(e, name) for e, name in named.items() if name in printed]          # numbered in order
    renumber = {name: f"{prefix.replace('_t', '_h', 1)}{i}" for i, (_, name) in enumerate(used)}

    def renamed(text):
        return re.sub(r"\b_h\w+", lambda m: renumber.get(m.group(0), m.group(0)), text)

    lines, result = tuple(renamed(line) for line in lines), renamed(result)
    before = tuple(f"const {T} {s} = {plain.doprint(e)};" for s, e in hoisted) + \
        tuple(f"const {T} {renumber[name]} = {plain.doprint(e)};" for e, name in used)
    return before, lines, result, frozenset(plain.functions_used | printer.functions_used)
