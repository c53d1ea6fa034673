"""Elementwise ops defined by a sympy expression of their operands.

One `Pointwise` op holds the expression; its NumPy reference is `sympy.lambdify` of it, its gradient
op is another Pointwise op whose expression is `dy * diff(expr, operand)` (simplified), and the code
generator prints the same expression as C. The activations (relu, leaky_relu, sigmoid, tanh), their
gradients, the optimizer updates and any user-defined activation (Swish, Mish, ...) are all built
this way; nothing here has a hand-written derivative.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import sympy as sp
from sympy.printing.numpy import NumPyPrinter

from ..errors import GraphError, OpError
from ..shapes import fmt_dim, fmt_shape, provably_ne
from .base import OPS, Op, as_float, register, select

X = sp.Symbol("x", real=True)
DY = sp.Symbol("dy", real=True)


class sigmoid(sp.Function):
    """1 / (1 + exp(-x)), kept as a function so that its derivative stays in terms of itself and
    its NumPy form never overflows."""

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + sp.exp(-x))


class softplus(sp.Function):
    """log(1 + exp(x)), evaluated stably."""

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return sp.log(1 + sp.exp(x))


def _np_sigmoid(x):
    e = np.exp(-np.abs(x))
    return select(np.asarray(x >= 0), 1 / (1 + e), e / (1 + e))


def _np_softplus(x):
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _np_special(name):
    """erf / erfc elementwise (NumPy has neither): SciPy's where installed, else the math module's
    per element (exact, slower), in the argument's float type. SciPy is imported at the first call,
    not with graphconv (0.8 s of every process's start)."""
    def apply(x):
        try:
            from scipy import special
            fn = getattr(special, name)
        except ImportError:
            fn = np.vectorize(getattr(math, name), otypes=[np.float64])
        x = np.asarray(x)
        return fn(x).astype(x.dtype if x.dtype.kind == "f" else np.float64, copy=False)
    return apply


# exact GELU, x * (1 + erf(x / sqrt(2))) / 2 (PyTorch's default nn.GELU), needs erf
NUMPY_FUNCTIONS = {"sigmoid": _np_sigmoid, "softplus": _np_softplus, "gc_select": select,
                   "erf": _np_special("erf"), "erfc": _np_special("erfc")}

# The same two functions as CUDA device functions, the stable forms above: code generation prints
# sigmoid(x) as gc_sigmoid(x) and puts these in the kernels that use them ({T}: float or double,
# {f}: the math-function suffix, "f" for float).
C_FUNCTIONS = {
    "sigmoid": "__device__ __forceinline__ {T} gc_sigmoid({T} x) {{ const {T} e = exp{f}(-fabs{f}(x)); "
               "return x >= 0 ? 1 / (1 + e) : e / (1 + e); }}",
    "softplus": "__device__ __forceinline__ {T} gc_softplus({T} x) {{ return fmax{f}(x, 0) + log1p{f}(exp{f}(-fabs{f}(x))); }}",
    # sympy's Max and Min as NumPy computes them (np.maximum, np.minimum): a NaN operand gives NaN, where
    # C's fmax and fmin return the other operand
    "max": "__device__ __forceinline__ {T} gc_max({T} a, {T} b) {{ return (a > b || a != a) ? a : b; }}",
    "min": "__device__ __forceinline__ {T} gc_min({T} a, {T} b) {{ return (a < b || a != a) ? a : b; }}",
}


class _WherePrinter(NumPyPrinter):
    """Prints Piecewise as nested selects (base.select: numpy.where's result without its branch per
    element), several times faster than sympy's numpy.select."""

    def _print_Piecewise(self, expr):
        text = self._print(expr.args[-1].expr) if expr.args[-1].cond == sp.true else "numpy.nan"
        for piece in reversed(expr.args[:-1] if expr.args[-1].cond == sp.true else expr.args):
            text = f"gc_select(numpy.asarray({self._print(piece.cond)}), {self._print(piece.expr)}, {text})"
        return text


def numpy_form(symbols, expr):
    """`expr` as a NumPy function of `symbols` (sympy.lambdify with the stable forms above)."""
    return sp.lambdify(symbols, expr, modules=[NUMPY_FUNCTIONS, "numpy"],
                       printer=_WherePrinter({"fully_qualified_modules": False, "inline": True,
                                              "allow_unknown_functions": True, "user_functions": {}}),
                       cse=True)


def without_numpy_form(*exprs) -> list[str]:
    """The names of the functions in `exprs` that have no NumPy form here: each applied function,
    its arguments made plain real variables, fails to print or to run on an array (sympy's gamma
    lambdifies to math.gamma, a scalar function; besselj to an undefined name; fresnels not at all)."""
    names = []
    for expr in exprs:
        for atom in sorted(sp.sympify(expr).atoms(sp.Function), key=sp.default_sort_key):
            name = getattr(atom.func, "__name__", str(atom.func))
            if isinstance(atom, sp.Piecewise) or name in names:
                continue
            args = [sp.Dummy(real=True) if isinstance(a, sp.Expr) and a.free_symbols else a for a in atom.args]
            variables = [a for a in args if isinstance(a, sp.Dummy)]
            try:
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    y = np.asarray(numpy_form(variables, atom.func(*args))(*[np.linspace(0.25, 1.75, 4)] * len(variables)))
                if y.dtype.kind not in "biuf":
                    names.append(name)
            except Exception:  # noqa: BLE001 - any failure means: no NumPy form
                names.append(name)
    return names


def broadcasts_per_channel(shape, full) -> bool:
    """A [C] operand beside an [N, C, ...] one."""
    return len(shape) == 1 and len(full) >= 2 and not provably_ne(shape[0], full[1])


def broadcast_axes(shape, full):
    """The axes an operand of `shape` is broadcast along to the `full` result of an elementwise op
    (its gradient sums over them): every axis for a scalar, all but the channel for a [C] vector,
    None for an operand of the result's rank, which is elementwise even where its dims read
    differently (a (3, 4) parameter beside an [N, 4] result is one at N = 3, checked when run)."""
    if len(shape) == len(full):
        return None
    return tuple(range(len(full))) if len(shape) == 0 else (0, *range(2, len(full)))


class Pointwise(Op):
    kind = "elementwise"

    def __init__(self, name, expr, inputs=("x",), params=None, doc="", numpy=None):
        self.name = name
        self.operands = tuple(inputs)
        self.symbols = tuple(sp.Symbol(n, real=True) for n in inputs)
        self.attrs = dict(params or {})
        self.param_symbols = tuple(sp.Symbol(n, real=True) for n in self.attrs)
        self.expr = sp.sympify(expr)
        extra = self.expr.free_symbols - set(self.symbols) - set(self.param_symbols)
        if extra:
            raise GraphError(f"{name}: expression {self.expr} uses {sorted(map(str, extra))}, which are neither "
                             f"operands {list(inputs)} nor parameters {list(self.attrs)}")
        self.doc = doc
        self.lambdified = numpy_form(self.symbols + self.param_symbols, self.expr)
        # a faster NumPy form of the same expression (tests check that the two agree)
        self._fn = numpy or self.lambdified
        self._grads: dict = {}

    def normalize(self, a):
        return {k: as_float(v, k) for k, v in a.items()}

    def shape(self, ins, attrs):
        """Operands of one shape, except that a scalar (shape ()) broadcasts everywhere and a
        per-channel vector [C] broadcasts along dim 1 of an [N, C, ...] operand (a bias, a batch-norm
        scale: the epilogues of a fused node)."""
        first = max((t.shape for t in ins), key=len)
        for i, t in enumerate(ins):
            if t.shape == () or broadcasts_per_channel(t.shape, first):
                continue
            if len(t.shape) != len(first) or any(provably_ne(a, b) for a, b in zip(t.shape, first)):
                extra = f" (or [{fmt_dim(first[1])}] per channel, or a scalar)" if len(first) >= 2 else ""
                raise OpError(f"{self.operands[i]} has shape {fmt_shape(t.shape)}, expected {fmt_shape(first)}{extra} "
                              f"like the other operands", i)
        return first

    def reference(self, xs, attrs):
        rank = max(x.ndim for x in xs)
        if rank >= 2:   # a per-channel [C] operand lines up with dim 1
            xs = [x.reshape((1, -1) + (1,) * (rank - 2)) if x.ndim == 1 else x for x in xs]
        # numpy.where evaluates both branches of a Piecewise: 0/0 in the branch not taken is no error
        with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
            y = np.asarray(self._fn(*xs, *attrs.values()))
        shape = np.broadcast_shapes(*(x.shape for x in xs))
        if y.shape != shape:  # an expression constant in some operand
            y = np.array(np.broadcast_to(y, shape))
        return y.astype(xs[0].dtype, copy=False)

    def derivative(self, i, register_it=True) -> "Pointwise":
        """The op computing dy * d(expr)/d(operand i). define_activation registers it with its
        activation; other pointwise ops (optimizer updates) have no use for one."""
        if i not in self._grads:
            suffix = "_grad" if len(self.operands) == 1 else f"_grad_{self.operands[i]}"
            name = self.name + suffix
            # piecewise_fold moves dy inside a Piecewise: where(x > 0, dy, 0), not dy * where(x > 0, 1, 0)
            expr = sp.piecewise_fold(DY * sp.simplify(sp.diff(self.expr, self.symbols[i])))
            if expr.has(sp.Derivative):
                raise GraphError(f"{self.name}: sympy cannot differentiate {self.expr} (it gives {expr})")
            self._grads[i] = OPS.get(name) or Pointwise(name, expr, self.operands + ("dy",), self.attrs,
                                                        doc=f"dy * d{self.name}/d{self.operands[i]}")
        if register_it and self._grads[i].name not in OPS:
            register(self._grads[i])
        return self._grads[i]

    def grad(self, e, dy, needs):
        grads = []
        full = e.output.shape
        for i, need in enumerate(needs):
            if not need:
                grads.append(None)
                continue
            axes = broadcast_axes(e.inputs[i].shape, full)
            if axes is None:
                grads.append(e.emit(self.derivative(i).name, [*e.inputs, dy], e.attrs, wrt=i))
                continue
            # a broadcast operand: its gradient sums the full-size one over the broadcast axes
            whole = e.emit(self.derivative(i).name, [*e.inputs, dy], e.attrs)
            grads.append(e.emit("reduce_sum", [whole], {"axes": axes}, wrt=i))
        return grads


def define_activation(name, expr, params=None, numpy=None):
    """Register a pointwise activation given by a sympy expression of one variable (or a function
    of a sympy symbol), e.g. define_activation("swish", lambda x: x * sigmoid(x)). Its gradient is
    derived by sympy. Returns the op; defining the same name twice with the same expression is fine."""
    if not isinstance(name, str) or not name.isidentifier():
        raise GraphError(f"activation name must be an identifier such as 'swish', got {name!r}")
    if callable(expr) and not isinstance(expr, sp.Basic):
        try:
            expr = expr(X)
        except Exception as e:  # noqa: BLE001 - the user's function failed on a sympy symbol
            raise GraphError(f"activation {name!r}: calling the given function on a sympy symbol raised "
                             f"{type(e).__name__}: {e}") from None
    try:
        expr = sp.sympify(expr, locals={"sigmoid": sigmoid, "softplus": softplus}, strict=not isinstance(expr, str))
    except (sp.SympifyError, SyntaxError, TypeError) as e:
        raise GraphError(f"activation {name!r}: {expr!r} is not a sympy expression "
                         f"(write e.g. 'x * sigmoid(x)' or pass a sympy expression)") from None
    if not isinstance(expr, sp.Expr):
        raise GraphError(f"activation {name!r}: {expr} is a {type(expr).__name__}, not an expression of x "
                         f"(a condition belongs in sympy.Piecewise)")
    params = dict(params or {})
    free = expr.free_symbols - {sp.Symbol(p, real=True) for p in params} - {sp.Symbol(p) for p in params}
    if len(free) > 1:
        raise GraphError(f"activation {name!r}: expression {expr} has several variables {sorted(map(str, free))}")
    if not free:
        raise GraphError(f"activation {name!r}: expression {expr} does not depend on its input")
    expr = expr.subs(free.pop(), X)
    expr = expr.subs({sp.Symbol(p): sp.Symbol(p, real=True) for p in params})
    if expr.has(sp.I):   # NumPy would drop the imaginary part (a ComplexWarning), C has no I at all
        real = sp.expand_complex(expr)
        if real.has(sp.I):
            raise GraphError(f"activation {name!r}: {expr} is complex for real x (imaginary part "
                             f"{sp.simplify(sp.im(expr))}); an activation must give a real value")
        expr = real
    if name in OPS:
        existing = OPS[name]
        if isinstance(existing, Pointwise) and sp.simplify(existing.expr - expr) == 0:
            return existing
        raise GraphError(f"activation {name!r} is already defined as {getattr(existing, 'expr', existing)}")
    values = {k: float(v) for k, v in params.items()}
    grad = None
    try:  # an unknown function (sympy's f(x)) cannot be evaluated: refuse it now, not in a run
        op = Pointwise(name, expr, ("x",), params, numpy=numpy)
        op.reference([np.linspace(-2, 2, 5)], values)
        grad = op.derivative(0, register_it=False)
        grad.reference([np.linspace(-2, 2, 5), np.ones(5)], values)
    except GraphError:
        raise
    except Exception as e:  # noqa: BLE001
        missing = without_numpy_form(expr, *([grad.expr] if grad is not None else []))
        if missing:
            which = f"{expr}" if grad is None else f"{expr} (derivative {sp.diff(expr, X)})"
            raise GraphError(f"activation {name!r}: {which} uses {', '.join(missing)}, which "
                             f"{'has' if len(missing) == 1 else 'have'} no NumPy form here; write it with "
                             f"functions NumPy has (exp, log, tanh, erf, sigmoid, softplus, ...)") from None
        raise GraphError(f"activation {name!r}: {expr} or its derivative cannot be evaluated by NumPy "
                         f"({type(e).__name__}: {e})") from None
    register(op)
    register(grad)   # the gradient op exists as soon as its activation does
    return op


# ---- the built-in activations ----------------------------------------------------------------
# relu(NaN) is NaN, as np.maximum and PyTorch give it: "0 where x <= 0", not "x where x > 0"
define_activation("relu", sp.Piecewise((0, X <= 0), (X, True)), numpy=lambda x: np.maximum(x, 0))
define_activation("leaky_relu", sp.Piecewise((X, X > 0), (sp.Symbol("negative_slope") * X, True)),
                  params={"negative_slope": 0.01}, numpy=lambda x, a: np.where(x > 0, x, x * x.dtype.type(a)))
define_activation("sigmoid", sigmoid(X))
define_activation("tanh", sp.tanh(X))


# the elementwise product: a gate, an attention weight, a learned scale; a scalar or per-channel [C]
# operand broadcasts; its gradients (dy * b, dy * a, summed over broadcast axes) come from sympy
_A, _B = sp.Symbol("a", real=True), sp.Symbol("b", real=True)
MUL = Pointwise("mul", _A * _B, ("a", "b"), doc="elementwise product")
register(MUL)
MUL.derivative(0), MUL.derivative(1)
# the difference (a residual, a regression error); b broadcasts as mul's does
SUB = Pointwise("sub", _A - _B, ("a", "b"), doc="elementwise difference")
register(SUB)
SUB.derivative(0), SUB.derivative(1)


@register
class Add(Op):
    name = "add"
    kind = "elementwise"
    operands = ("lhs", "rhs")

    def shape(self, ins, attrs):
        a, b = ins[0].shape, ins[1].shape
        if len(a) != len(b) or any(provably_ne(x, y) for x, y in zip(a, b)):
            raise OpError(f"cannot add {fmt_shape(a)} and {fmt_shape(b)}: shapes differ", 1)
        return a

    def reference(self, xs, attrs):
        return xs[0] + xs[1]

    def grad(self, e, dy, needs):
        return [dy if need else None for need in needs]
