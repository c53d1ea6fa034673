"""Graph -> Graph rewrites, each named with a verb.

The contract: a pass takes a graph and returns a new, verified graph; it never changes the graph it
was given (it edits a copy, with Graph.replace / replace_uses / add_node)."""
from __future__ import annotations

import networkx as nx
import numpy as np
import sympy as sp

from .errors import GraphError
from .ops import OPS
from .ops.adaptive import even_windows
from .ops.base import FLOAT_DTYPES, as_float_dtype


def reinfer(graph):
    """Recompute every node's type from its operands, in topological order."""
    new = graph.copy()
    for node in new.topo():
        with new.layer_errors(node.name, node.op, new.operands(node.name)):
            node.type = OPS[node.op].infer(new.in_types(node.name), node.attrs)
    return new.verify()


def eliminate_dead_code(graph):
    """Drop every node that no output needs. Inputs and parameters stay: they are the graph's
    signature, and a parameter the loss does not reach still has a (zero) gradient and an update."""
    new = graph.copy()
    live = set(new.outputs)
    for out in new.outputs:
        live |= nx.ancestors(new.nx, out)
    new.nx.remove_nodes_from([n.name for n in new.topo() if n.name not in live and n.op not in ("input", "param")])
    return new.verify()


def cast(graph, dtype):
    """The same graph computing in `dtype` (float32 or float64): its float inputs, parameters and
    constants (a backward graph's seed and zero gradients); integer inputs stay as they are."""
    dtype = as_float_dtype(dtype, "cast: dtype")
    new = graph.copy()
    new.dtype = dtype
    for node in new.topo():
        if node.op in ("input", "param", "constant") and node.attrs["dtype"] in FLOAT_DTYPES:
            node.attrs["dtype"] = dtype
    return reinfer(new)


def set_training(graph, training: bool):
    """Switch every batch_norm between batch statistics (training) and running statistics (eval)."""
    if not isinstance(training, (bool, np.bool_)):
        raise GraphError(f"training must be True or False, got {training!r}")
    new = graph.copy()
    for node in new.topo():
        if "training" in node.attrs:
            node.attrs["training"] = bool(training)
    return reinfer(new)


def bind_dims(graph, sizes: dict):
    """The graph with named dims fixed to sizes, e.g. {"H": 32, "W": 32} for an input
    ("N", 3, "H", "W"); every shape is re-inferred, so a size that does not fit a layer is refused
    by that layer's rule."""
    if not isinstance(sizes, dict):
        raise GraphError(f"bind_dims takes a dict of dim name -> size, such as {{'H': 32}}, got {type(sizes).__name__}")
    if not sizes:
        return graph.copy()
    symbols = {str(s): s for n in graph.inputs for d in n.shape for s in sp.sympify(d).free_symbols}
    sizes = {str(k) if isinstance(k, sp.Symbol) else k: v for k, v in sizes.items()}     # "H" or Symbol("H")
    for name, size in sizes.items():
        if name not in symbols:
            have = ", ".join(sorted(symbols)) or "none"
            raise GraphError(f"{graph.name} has no dim named {name!r} (its inputs' symbolic dims: {have})")
        if isinstance(size, sp.Integer):
            size = sizes[name] = int(size)
        if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)) or size <= 0:
            raise GraphError(f"dim {name} must be a positive integer, got {size!r} ({type(size).__name__})")
    sizes = {k: int(v) for k, v in sizes.items()}
    subs = {symbols[k]: sp.Integer(v) for k, v in sizes.items()}
    new = graph.copy()
    for node in new.topo():
        node.attrs = {k: _substitute(v, subs) for k, v in node.attrs.items()}
    return _even_adaptive_pools(reinfer(new))


def _even_adaptive_pools(graph):
    """Each adaptive pool whose input sizes are now known multiples of its output sizes becomes the
    plain pool the builder makes for such sizes (kernel = stride; it fuses with a conv), so a graph
    bound with sizes is the graph built with them."""
    for node in graph.topo():
        op = OPS[node.op]
        if not node.op.startswith("adaptive_") or node.op.endswith("_backward"):
            continue
        (x,) = graph.operands(node.name)
        kernel = even_windows(graph.node(x).shape[2:], node.attrs["output_size"])
        if kernel is not None:
            node.op = f"{op.mode}_pool{op.nd}d"
            node.attrs = OPS[node.op].check_attrs({"kernel_size": kernel, "stride": kernel})
    return reinfer(graph)


def _substitute(value, subs):
    if isinstance(value, sp.Basic):
        return value.subs(subs)
    if isinstance(value, tuple):
        return tuple(_substitute(v, subs) for v in value)
    return value


def unbound_dims(graph, keep_batch=True) -> list:
    """The symbolic dims of the graph's inputs other than the batch dim: what must be given a size
    before data can be made for it."""
    n = graph.batch_symbol() if keep_batch else None
    found = []
    for node in graph.inputs:
        for d in node.shape:
            for s in sorted(sp.sympify(d).free_symbols, key=str):
                if s != n and s not in found:
                    found.append(s)
    return found
