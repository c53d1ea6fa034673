"""The op protocol and its registry.

An op is one object holding, side by side: which operands and attributes it takes, its shape rule
(sympy), its NumPy reference, its cost and (next issue) its gradient rule. `OPS` maps an op name to
its instance; `register` fills it.
"""
from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass

import numpy as np
import sympy as sp

from ..errors import GraphError, OpError
from ..shapes import fmt_shape, numel

OPS: dict = {}

REQUIRED = object()  # attribute default meaning "must be given"

FLOAT_DTYPES = ("float32", "float64")
DTYPES = FLOAT_DTYPES + ("int64", "uint8")      # uint8: e.g. a max-pool window's argmax code
ITEMSIZE = {"float32": 4, "float64": 8, "int64": 8, "uint8": 1}
CTYPE = {"float32": "float", "float64": "double", "int64": "long long", "uint8": "unsigned char"}   # for codegen


def register(op):
    """Add an op instance (or a no-argument op class) to OPS under its name."""
    instance = op() if isinstance(op, type) else op
    if instance.name in OPS:
        raise ValueError(f"op {instance.name!r} registered twice")
    OPS[instance.name] = instance
    return op


def lookup(name: str):
    if name not in OPS:
        hint = difflib.get_close_matches(str(name), OPS, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise OpError(f"unknown op {name!r}{extra}", kind=GraphError)
    return OPS[name]


@dataclass(frozen=True)
class TensorType:
    shape: tuple
    dtype: str

    def __str__(self):
        return f"{self.dtype}{fmt_shape(self.shape)}"


@dataclass(frozen=True)
class TupleType:
    """The type of a node with several outputs (a fused conv-activation-maxpool gives its pooled
    output and the argmax codes). Its parts are read through `part` nodes, XLA's get-tuple-element,
    so every other node still has exactly one tensor type."""
    parts: tuple

    def __str__(self):
        return "(" + ", ".join(map(str, self.parts)) + ")"


@dataclass(frozen=True)
class Cost:
    """Per node, as sympy expressions of the symbolic dims."""
    params: sp.Expr
    macs: sp.Expr
    bytes_read: sp.Expr
    bytes_written: sp.Expr


KINDS = ("source", "elementwise", "injective", "reduction", "window", "out_elementwise", "opaque")


class Op:
    name = ""
    # Fusion class, after TVM: source | elementwise | injective | reduction | window |
    # out_elementwise (a conv or matmul whose output can take an elementwise epilogue) | opaque
    kind = "opaque"
    mixes_all = False             # every output element reads every input position (linear, flatten)
    resamples = False             # maps onto a finer grid (upsample, transposed conv): no receptive field
    operands: tuple = ("input",)
    optional: tuple = ()          # operand names that may be left out (always trailing)
    variadic = False              # one or more operands, all of the same role
    param_operands: tuple = ()    # operands whose size counts as the layer's parameters
    attrs: dict = {}

    # ---- attributes -------------------------------------------------------------------------
    def check_attrs(self, given: dict) -> dict:
        """Fill defaults, reject unknown names, validate and normalise values."""
        unknown = sorted(set(given) - set(self.attrs))
        if unknown:
            bad = unknown[0]
            hint = difflib.get_close_matches(bad, self.attrs, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            known = ", ".join(self.attrs) or "none"
            raise OpError(f"{self.name} has no attribute {bad!r}{extra}; its attributes are: {known}",
                          kind=GraphError)
        out = {}
        for key, default in self.attrs.items():
            if key in given:
                out[key] = given[key]
            elif default is REQUIRED:
                raise OpError(f"{self.name} needs the attribute {key!r}", kind=GraphError)
            else:
                out[key] = default
        try:
            return self.normalize(out)
        except (TypeError, ValueError) as e:  # e.g. float("abc"): report it as the user's attribute
            given_values = ", ".join(f"{k}={v!r}" for k, v in given.items())
            raise OpError(f"invalid attribute value ({given_values}): {e}", kind=GraphError) from None

    def normalize(self, attrs: dict) -> dict:
        return attrs

    def check_arity(self, count: int):
        if self.variadic:
            if count < 1:
                raise OpError(f"{self.name} needs at least one operand", kind=GraphError)
            return
        low, high = len(self.operands) - len(self.optional), len(self.operands)
        if not low <= count <= high:
            want = str(high) if low == high else f"{low} to {high}"
            names = ", ".join(self.operands)
            raise OpError(f"{self.name} takes {want} operands ({names}), got {count}", kind=GraphError)

    # ---- typing -----------------------------------------------------------------------------
    def infer(self, ins: list, attrs: dict) -> TensorType:
        return TensorType(tuple(self.shape(ins, attrs)), self.dtype(ins, attrs))

    def dtype(self, ins: list, attrs: dict) -> str:
        """Default: every operand is a float tensor of one dtype."""
        first = ins[0].dtype
        for i, t in enumerate(ins):
            if t.dtype not in FLOAT_DTYPES:
                raise OpError(f"{self.operand_name(i)} must be float32 or float64, got {t.dtype}", i)
            if t.dtype != first:
                raise OpError(f"{self.operand_name(i)} is {t.dtype} but {self.operand_name(0)} is {first}", i)
        return first

    def shape(self, ins: list, attrs: dict) -> tuple:
        raise NotImplementedError

    def operand_name(self, i: int) -> str:
        if self.variadic:
            return f"input {i}"
        return self.operands[i] if i < len(self.operands) else f"operand {i}"

    # ---- semantics --------------------------------------------------------------------------
    def reference(self, xs: list, attrs: dict):
        """NumPy reference implementation: arrays in, one array out."""
        raise NotImplementedError

    def evaluate(self, xs: list, attrs: dict, out_shape: tuple):
        """What the interpreter calls; `out_shape` is the node's shape with every dim bound."""
        return self.reference(xs, attrs)

    def grad(self, e, dy, needs):
        """Gradient rule: build the gradient nodes through the emitter `e` (autodiff.GradEmitter:
        e.inputs, e.output, e.attrs, e.emit(op, operands, attrs, wrt=i)) and return one entry per
        operand: a tensor, or None where needs[i] is False or there is no gradient."""
        raise OpError(f"{self.name} has no gradient rule", kind=GraphError)

    def scratch_bytes(self, in_shapes: list, out_shape: tuple, attrs: dict, itemsize: int) -> int:
        """Temporary memory the NumPy reference allocates beyond its output (concrete shapes), for
        the interpreter's estimate of a run's peak memory."""
        return 0

    def window(self, in_shapes: list, attrs: dict):
        """(kernel, stride, dilation) per spatial axis for a sliding-window op, else None: what
        the receptive-field rule of the layer table needs."""
        return None

    def windows(self, in_types: list, attrs: dict) -> list:
        """The sliding windows the op applies in order (a fused node may apply two)."""
        window = self.window([t.shape for t in in_types], attrs)
        return [window] if window else []

    # ---- cost -------------------------------------------------------------------------------
    def macs(self, ins: list, out: TensorType, attrs: dict) -> sp.Expr:
        return sp.Integer(0)

    def cost(self, ins: list, out, attrs: dict) -> Cost:
        params = sp.Integer(0)
        for i, t in enumerate(ins):
            if not self.variadic and i < len(self.operands) and self.operands[i] in self.param_operands:
                params += numel(t.shape)
        read = sum((nbytes(t) for t in ins), sp.Integer(0))
        written = nbytes(out)
        return Cost(params, sp.sympify(self.macs(ins, out, attrs)), read, written)

    def __repr__(self):
        return f"<op {self.name}>"


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def select(cond, a, b):
    """np.where(cond, a, b), bit for bit, without a branch per element: (a & m) | (b & ~m) on the
    bits, m all ones where cond holds. On a random mask np.where mispredicts its branch about half
    the time (a ReLU gradient of 1M floats: 3.7 ms against 0.3 ms here)."""
    dt = np.result_type(a, b)
    if not isinstance(cond, np.ndarray) or cond.dtype != bool or dt.kind not in "fiu" or dt.itemsize not in _UINT:
        return np.where(cond, a, b)
    shape = np.broadcast_shapes(cond.shape, np.shape(a), np.shape(b))
    u = _UINT[dt.itemsize]
    m = cond.astype(u)
    np.negative(m, out=m)                      # 0 -> 0, 1 -> all ones
    out = np.empty(shape, dt)
    bits = out.view(u)
    np.bitwise_and(np.asarray(a, dt).view(u), m, out=bits)
    bv = np.asarray(b, dt).view(u)
    if not (bv.ndim == 0 and bv == 0):         # b = +0: nothing to add
        bits |= bv & ~m
    return out


def as_bool(value, what) -> bool:
    """A flag given as True/False (or 0/1); a string such as "False" is refused, not read as True."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise OpError(f"{what} must be True or False, got {value!r}", kind=GraphError)


def as_dtype(value, what, allowed=None) -> str:
    """A type given as "float32", np.float32 or np.dtype("float32"): its name, or GraphError when it
    is none of `allowed` (default DTYPES). Only those spellings: "float" (float64 to NumPy, float32 to
    CUDA C and PyTorch), "double", "f4" and Python's float are refused rather than guessed."""
    allowed = allowed or DTYPES
    if isinstance(value, str):
        name = value
    elif isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        name = np.dtype(value).name
    else:
        name = None
    if name not in allowed:
        raise OpError(f"{what} must be {' or '.join(allowed) if len(allowed) == 2 else 'one of ' + ', '.join(allowed)}, "
                      f"got {value!r}", kind=GraphError)
    return name


def as_float_dtype(value, what) -> str:
    """A graph's float type ("float32", np.float32, np.dtype("float64")) by name; GraphError (it is
    checked outside any layer) for another."""
    try:
        return as_dtype(value, what, FLOAT_DTYPES)
    except OpError as e:
        raise GraphError(e.message) from None


def as_flag(value, what) -> bool:
    """An option that must be True or False (a compile or Trainer switch such as tf32): GraphError
    for anything else, 1 and "False" included, rather than reading it by its truth."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise GraphError(f"{what} must be True or False, got {value!r}")


def as_float(value, what, positive=False) -> float:
    """A finite float attribute (and > 0 when `positive`)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise OpError(f"{what} must be a number, got {value!r}", kind=GraphError)
    v = float(value)
    if not math.isfinite(v) or (positive and v <= 0):
        raise OpError(f"{what} must be a finite{' positive' if positive else ''} number, got {value!r}",
                      kind=GraphError)
    return v


def nbytes(t) -> sp.Expr:
    """Bytes of a tensor type, or of every part of a tuple type."""
    if isinstance(t, TupleType):
        return sum((nbytes(p) for p in t.parts), sp.Integer(0))
    return numel(t.shape) * ITEMSIZE[t.dtype]


def rank_error(op_name, want_rank, layout, t, operand=0):
    return OpError(f"{op_name} expects a {want_rank}-D {layout} input, got {len(t.shape)}-D "
                   f"{fmt_shape(t.shape)}", operand)


class GradientOp(Op):
    """An op that computes a gradient (conv backward-data, pool backward, ...). graphconv derives
    first-order gradients, so a gradient op has no gradient rule of its own."""

    def grad(self, e, dy, needs):
        raise OpError(f"{self.name} is a gradient op; graphconv derives first-order gradients only", kind=GraphError)
