"""The `numpy` backend: an interpreter over the IR that calls each op's NumPy reference.

It is the oracle for every other backend, so it checks everything it can: every input's shape and
dtype against the graph (binding the symbolic dims), and every node's result against its inferred
shape and dtype.
"""
from __future__ import annotations

import contextlib
import numbers
import os

import numpy as np
import sympy as sp

from .errors import GraphError, InputError, OpError, ResourceError, ShapeError
from .memory import check_fits, fmt_bytes, smaller
from .ops import OPS, TensorType, TupleType
from .params import check_params
from .shapes import fmt_shape


# NumPy's BLAS threads during a run of the numpy backend, set with threadpoolctl around each run
# (so a run is steady whatever else the process does). Measured on the 2-core machine, 2026-11-28,
# OpenBLAS 0.3.31, a quiet machine, training steps in 5 alternating blocks (medians, ms):
# lenet5 at 64: 50.4 on one thread, 41.1 on two; vgg_small at 32: 168.6 / 144.1; resnet8 at 32:
# 82.0 / 69.5, the block-to-block spread a few percent either way. (Measured while another process
# loaded the machine, two threads stalled: one product 3.7 ms at best, 32 ms at worst, where one
# thread stayed within 6.3-8 ms; that is the swing earlier benchmarks saw.) So: two threads, or one
# on a one-core machine; more than two were not measured. gc.compile(..., blas_threads=n) sets another.
BLAS_THREADS = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
_controller = None


def blas_threads(n):
    """A context in which NumPy's BLAS uses n threads (threadpoolctl; nothing where it is missing)."""
    global _controller
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController
            _controller = ThreadpoolController()
        except ImportError:          # pragma: no cover - a declared dependency; the GPU machines may lack it
            _controller = False
    return _controller.limit(limits=n, user_api="blas") if _controller else contextlib.nullcontext()


def bind_inputs(graph, inputs: dict, array_types=(np.ndarray,)) -> dict:
    """Check the input arrays against the graph; return {symbol: int} for the symbolic dims.
    `array_types`: what counts as an array (a device backend adds its own)."""
    if not isinstance(inputs, dict):
        raise InputError(f"{graph.name}: inputs are a dict of arrays keyed by input name "
                         f"({', '.join(n.name for n in graph.inputs)}), got {type(inputs).__name__}")
    wanted = {n.name: n for n in graph.inputs}
    extra = sorted(set(inputs) - set(wanted))
    if extra:
        raise InputError(f"{extra[0]}: {graph.name} has no input of that name (inputs: {', '.join(wanted)})")
    bindings: dict = {}
    for name, node in wanted.items():
        if name not in inputs:
            raise InputError(f"{name}: missing input {node.type}")
        arr = inputs[name]
        if not isinstance(arr, array_types):
            raise InputError(f"{name}: expected a numpy array, got {type(arr).__name__}")
        if str(arr.dtype) != node.dtype:
            raise InputError(f"{name}: expected {node.dtype}, got {arr.dtype} (convert with .astype(np.{node.dtype}))")
        want = fmt_shape(node.shape)
        if arr.ndim != len(node.shape):
            raise InputError(f"{name}: expected a {len(node.shape)}-D array {want}, got {arr.ndim}-D {fmt_shape(arr.shape)}")
        for axis, (dim, size) in enumerate(zip(node.shape, arr.shape)):
            if dim.is_Symbol:
                if bindings.setdefault(dim, size) != size:
                    raise InputError(f"{name}: dim {axis} ({dim}) is {size}, but {dim}={bindings[dim]} "
                                     f"from an earlier input")
            elif dim.is_Integer and int(dim) != size:
                raise InputError(f"{name}: expected shape {want}, got {fmt_shape(arr.shape)} (dim {axis} is {size}, "
                                 f"expected {dim})")
    for name, node in wanted.items():
        for axis, dim in enumerate(node.shape):
            if not dim.is_Integer and not dim.is_Symbol:
                value = dim.subs(bindings)
                if value.free_symbols:
                    free = ", ".join(sorted(map(str, value.free_symbols)))
                    raise InputError(f"{name}: dim {axis} is {dim}, and no input has {free} as a dim of its own to "
                                     f"give its size; declare a plain dim (\"{free.split(', ')[0]}\") or bind it "
                                     f"(--dim / bind_dims)")
                if value != inputs[name].shape[axis]:
                    raise InputError(f"{name}: dim {axis} is {inputs[name].shape[axis]}, but {dim} = {value}")
    return bindings


def concrete(shape, bindings, where="") -> tuple:
    """The shape with every symbol bound; an error when a dim is left symbolic or is not a positive
    integer for these inputs (e.g. reshape(-1) of 75*N elements into rows of 7 with N=2)."""
    out = []
    for d in shape:
        v = sp.sympify(d).subs(bindings)
        if not (v.is_Integer and v > 0):
            bound = ", ".join(f"{k}={val}" for k, val in bindings.items()) or "nothing bound"
            raise InputError(f"{where}dim {d} is {v} for these inputs ({bound}); it must be a positive integer")
        out.append(int(v))
    return tuple(out)


def concrete_type(node, bindings):
    """The node's concrete shape, or a tuple of shapes for a node with several outputs."""
    where = f"{node.name} [{node.op}]: "
    if node.is_tuple:
        return tuple(concrete(t.shape, bindings, where) for t in node.type.parts)
    return concrete(node.shape, bindings, where)


def static_type(node, shape):
    """A node's type with the bound sizes in place of its symbols."""
    if node.is_tuple:
        return TupleType(tuple(TensorType(tuple(sp.Integer(d) for d in sh), t.dtype)
                               for t, sh in zip(node.type.parts, shape)))
    return TensorType(tuple(sp.Integer(d) for d in shape), node.dtype)


def check_result(node, y, shape, dtype):
    if y.shape != shape or str(y.dtype) != dtype:
        raise AssertionError(f"internal: {node.name} [{node.op}] produced {y.dtype}{fmt_shape(y.shape)}, "
                             f"its rule says {dtype}{fmt_shape(shape)}")


def input_value_checks(graph) -> list:
    """(loss node, op, target input, classes) for each classifier loss whose target is a graph input:
    what check_input_values checks (found once per program, not per step)."""
    checks = []
    for node in graph.topo():
        if getattr(OPS.get(node.op), "check_target", None) is None:
            continue
        scores, target = graph.operands(node.name)[:2]
        classes = graph.node(scores).shape[1]
        if graph.node(target).role == "input" and getattr(classes, "is_Integer", isinstance(classes, int)):
            checks.append((node.name, node.op, target, int(classes)))
    return checks


def check_input_values(graph, inputs: dict, checks=None) -> None:
    """What the NumPy references check of an input's values before computing with it, for the
    compiled backends, whose kernels would compute on (a class index past the scores gives NaN):
    each classifier loss's target, where it is a graph input. InputError naming the loss.
    `checks`: input_value_checks(graph), computed once by the caller."""
    for name, op, target, classes in (input_value_checks(graph) if checks is None else checks):
        if target not in inputs:
            continue
        try:
            OPS[op].check_target(_Columns(classes), inputs[target])
        except OpError as e:
            raise InputError(f"{name} [{op}]: {e.message}") from None


class _Columns:
    """Stands in for a scores array where only its number of classes is read."""
    def __init__(self, classes):
        self.shape = (None, classes)


class NumpyProgram:
    """A graph ready to run on NumPy: `program(x, params=params)` or `program(x=x, params=params)`."""

    backend = "numpy"

    def __init__(self, graph, blas_threads=None):
        if blas_threads is not None and (isinstance(blas_threads, bool) or not isinstance(blas_threads, numbers.Integral)
                                         or blas_threads < 1):
            raise GraphError(f"blas_threads must be a positive integer, got {blas_threads!r}")
        self.blas_threads = int(blas_threads) if blas_threads is not None else BLAS_THREADS
        self.graph = graph.verify()
        if not graph.outputs:
            raise GraphError(f"{graph.name}: no outputs; mark them with g.output(...)")
        self.order = graph.topo()
        self.input_names = [n.name for n in graph.inputs]
        self.operands = {node.name: graph.operands(node.name) for node in self.order}
        self.last_use = {}
        for step, node in enumerate(self.order):
            for operand in self.operands[node.name]:
                self.last_use[operand] = step
        self._shapes, self._bound = {}, {}

    def bound_shapes(self, bindings) -> dict:
        """Every node's concrete shape for these symbol values, each size checked positive and every
        shape rule run again on them (what the compiled backends check before a run too)."""
        key = tuple(sorted((str(k), v) for k, v in bindings.items()))
        if key not in self._bound:
            shapes = {n.name: concrete_type(n, bindings) for n in self.order}
            if any(not d.is_Integer for n in self.graph.inputs for d in n.shape):
                self.recheck(shapes, bindings)
            self._bound[key] = shapes
        return self._bound[key]

    def shapes(self, bindings) -> dict:
        """Every op node's concrete shape for these symbol values (computed once per batch size),
        after checking that the run fits in memory."""
        key = tuple(sorted((str(k), v) for k, v in bindings.items()))
        if key not in self._shapes:
            shapes = self.bound_shapes(bindings)
            peak, at = self.peak_bytes(shapes)
            bound = ", ".join(f"{k}={v}" for k, v in bindings.items())
            batch = bindings.get(self.graph.batch_symbol(), 1) if self.graph.batch_symbol() is not None else 1
            check_fits(peak, f"{self.graph.name}{f' at {bound}' if bound else ''} (peak at {at})", smaller(peak, batch))
            self._shapes[key] = shapes
        return self._shapes[key]

    def recheck(self, shapes, bindings):
        """Run every shape rule again on the bound sizes: with symbols a rule raises only what it can
        prove, so what only the sizes decide (a reshape of N elements into 5, channels M = 1 where a
        weight expects 2) is refused here, naming the layer, before any array is touched."""
        bound = ", ".join(f"{k}={v}" for k, v in bindings.items())
        for node in self.order:
            if node.role != "op":
                continue
            ins = [static_type(self.graph.node(o), shapes[o]) for o in self.operands[node.name]]
            try:
                with self.graph.layer_errors(node.name, node.op, self.operands[node.name]):
                    OPS[node.op].infer(ins, node.attrs)
            except (ShapeError, GraphError) as e:
                raise InputError(f"{e} [for these inputs: {bound}]") from None

    def peak_bytes(self, shapes):
        """An estimate of the most memory one run holds at once: live tensors (freed after their last
        use, as run() does) plus the op's own scratch space; and the node where it peaks."""
        def size(node):
            types = node.type.parts if node.is_tuple else (node.type,)
            shape_list = shapes[node.name] if node.is_tuple else (shapes[node.name],)
            return sum(int(np.prod(sh, dtype=np.int64)) * np.dtype(t.dtype).itemsize for t, sh in zip(types, shape_list))

        size = {n.name: size(n) for n in self.order}
        live = sum(size[n.name] for n in self.order if n.role != "op")
        keep = set(self.graph.outputs)
        peak, at = live, self.order[0].name if self.order else ""
        for step, node in enumerate(self.order):
            if node.role != "op":
                continue
            ins = [shapes[o] for o in self.operands[node.name]]
            itemsize = 8 if node.is_tuple else np.dtype(node.dtype).itemsize
            scratch = OPS[node.op].scratch_bytes(ins, shapes[node.name], node.attrs, itemsize)
            live += size[node.name]
            if live + scratch > peak:
                peak, at = live + scratch, f"{node.name} [{node.op}]"
            for operand in set(self.operands[node.name]):
                if self.last_use.get(operand) == step and operand not in keep and self.graph.node(operand).role == "op":
                    live -= size[operand]
        return peak, at

    def __call__(self, *args, params=None, **inputs):
        if len(args) > len(self.input_names):
            raise InputError(f"{self.graph.name} takes {len(self.input_names)} inputs "
                             f"({', '.join(self.input_names)}), got {len(args)} positional arrays")
        for name, arr in zip(self.input_names, args):
            if name in inputs:
                raise InputError(f"{name}: given both positionally and by name")
            inputs[name] = arr
        values = self.run(inputs, params)
        outs = [values[o] for o in self.graph.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def run(self, inputs: dict, params=None, keep=False) -> dict:
        """Evaluate every node; return the outputs (every value when keep=True)."""
        with blas_threads(self.blas_threads):
            return self._run(inputs, params, keep)

    def _run(self, inputs, params, keep):
        bindings = bind_inputs(self.graph, inputs)
        values = {**inputs, **check_params(self.graph, params)}
        keep_always = set(self.graph.outputs)
        shapes = self.shapes(bindings)
        for step, node in enumerate(self.order):
            if node.role != "op":
                continue
            xs = [values[o] for o in self.operands[node.name]]
            shape = shapes[node.name]
            try:
                y = OPS[node.op].evaluate(xs, node.attrs, shape)
            except OpError as e:  # a value-dependent check, e.g. a class index out of range
                raise InputError(f"{node.name} [{node.op}]: {e.message}") from None
            except MemoryError:  # the estimate in shapes() let it through, the machine did not
                raise ResourceError(f"{node.name} [{node.op}]: out of memory computing {node.dtype}"
                                    f"{fmt_shape(shape)} ({fmt_bytes(np.prod(shape) * np.dtype(node.dtype).itemsize)}); "
                                    f"use a smaller batch") from None
            if node.is_tuple:
                y = tuple(np.asarray(part) for part in y)
                for part, t, sh in zip(y, node.type.parts, shape):
                    check_result(node, part, sh, t.dtype)
            else:
                y = np.asarray(y)
                check_result(node, y, shape, node.dtype)
            values[node.name] = y
            if not keep:
                for operand in self.operands[node.name]:
                    if self.last_use.get(operand) == step and operand not in keep_always:
                        values.pop(operand, None)
        return values if keep else {o: values[o] for o in self.graph.outputs}
