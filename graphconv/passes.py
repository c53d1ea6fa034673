"""Graph -> Graph rewrites, each named with a verb. Every pass returns a new, verified graph."""
from __future__ import annotations

from .errors import GraphError
from .ops import OPS
from .ops.base import FLOAT_DTYPES


def reinfer(graph):
    """Recompute every node's type from its operands, in topological order."""
    for node in graph.topo():
        with graph.layer_errors(node.name, node.op, graph.operands(node.name)):
            node.type = OPS[node.op].infer(graph.in_types(node.name), node.attrs)
    return graph.verify()


def cast(graph, dtype):
    """The same graph computing in `dtype` (float32 or float64); integer inputs stay as they are."""
    if dtype not in FLOAT_DTYPES:
        raise GraphError(f"cast: dtype must be float32 or float64, got {dtype!r}")
    new = graph.copy()
    new.dtype = dtype
    for node in new.topo():
        if node.op in ("input", "param") and node.attrs["dtype"] in FLOAT_DTYPES:
            node.attrs["dtype"] = dtype
    return reinfer(new)


def set_training(graph, training: bool):
    """Switch every batch_norm between batch statistics (training) and running statistics (eval)."""
    new = graph.copy()
    for node in new.topo():
        if "training" in node.attrs:
            node.attrs["training"] = bool(training)
    return reinfer(new)
