"""Sympy expressions as C: the printer that turns a pointwise op's own expression into kernel text,
mirroring the NumPy printer in ops/pointwise.py. One C99 printer for both float types; the CUDA
subclass overrides only what differs (the stable sigmoid/softplus device functions, literals of
the kernel's float type).
"""
from __future__ import annotations

import functools

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


class CudaPrinter(C99CodePrinter):
    """C99 with the kernel's float type: expf/fabsf and 1.0F for float32, exp/fabs and 1.0 for
    float64; sigmoid and softplus as calls to gc_sigmoid / gc_softplus."""

    def __init__(self, dtype="float32"):
        super().__init__({"type_aliases": {real: FLOAT_TYPES[dtype]}})
        self.T = "float" if dtype == "float32" else "double"
        self.functions_used: set = set()

    def _print_Function(self, expr):
        name = type(expr).__name__
        if name in C_FUNCTIONS:
            self.functions_used.add(name)
            return f"gc_{name}({self._print(expr.args[0])})"
        return super()._print_Function(expr)

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
    lines, result, used = _c_expression(sp.sympify(expr), dtype, tuple(sorted(names.items())), prefix)
    return list(lines), result, set(used)


@functools.lru_cache(maxsize=4096)
def _c_expression(expr, dtype, names: tuple, prefix):
    names = dict(names)
    expr = expr.subs({s: sp.Symbol(names[s.name], real=True) for s in expr.free_symbols if s.name in names},
                     simultaneous=True)
    printer = CudaPrinter(dtype)
    T = "float" if dtype == "float32" else "double"
    temps, reduced = sp.cse(expr, symbols=sp.numbered_symbols(prefix), optimizations="basic")
    lines = tuple(f"const {T} {s} = {printer.doprint(e)};" for s, e in temps)
    result = printer.doprint(reduced[0])
    return lines, result, frozenset(printer.functions_used)
