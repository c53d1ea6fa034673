"""Concrete parameter values: seeded PyTorch-style initialisation and the checks on a params dict."""
from __future__ import annotations

import math
import numbers
import zlib

import numpy as np

from .errors import GraphError, InputError
from .shapes import fmt_shape


def check_seed(seed):
    """A seed is a non-negative integer (NumPy's generators take no negative entropy)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise GraphError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def need_graph(graph, what):
    from .ir import GraphCore
    if not isinstance(graph, GraphCore):
        raise InputError(f"{what}: takes a graph (gc.Graph, or MODELS[name]()), got {type(graph).__name__} "
                         f"{graph!r:.40}")


def init_params(graph, seed=0) -> dict:
    """One array per param/buffer node, in topological order. Each parameter draws from its own
    stream seeded by (seed, crc32(name)), so adding a layer does not change the others' values."""
    from .memory import check_fits
    need_graph(graph, "init_params")
    seed = check_seed(seed)
    check_fits(sum(param_bytes(n) for n in graph.params), f"the parameters of {graph.name}")
    out = {}
    for node in graph.params:
        shape = tuple(int(d) for d in node.shape)
        kind, value = node.attrs["init"]
        if kind == "uniform":
            rng = np.random.default_rng([seed, zlib.crc32(node.name.encode())])
            arr = rng.uniform(-value, value, size=shape)
        else:
            arr = np.full(shape, value)
        out[node.name] = arr.astype(node.dtype)
    return out


def param_bytes(node) -> int:
    return int(math.prod(int(d) for d in node.shape)) * np.dtype(node.dtype).itemsize


def check_params(graph, params, array_types=(np.ndarray,)) -> dict:
    """The params the graph needs, each checked for presence, shape and dtype (`array_types`: what
    counts as an array; a device backend adds its own)."""
    if params is None:
        params = {}
    if not hasattr(params, "keys"):
        raise InputError(f"{graph.name}: params must be a dict of arrays keyed by parameter name, "
                         f"got {type(params).__name__}")
    wanted = {n.name: n for n in graph.params}
    extra = sorted(set(params) - set(wanted))
    if extra:
        raise InputError(f"{extra[0]}: {graph.name} has no parameter of that name "
                         f"(it has: {', '.join(list(wanted)[:8])}{', ...' if len(wanted) > 8 else ''})")
    counters = {graph.operands(n.name)[0] for n in graph.topo() if n.op == "increment"} | \
        {graph.operands(n.name)[1] for n in graph.topo() if n.op == "dropout"}
    out = {}
    for name, node in wanted.items():
        if name not in params:
            raise InputError(f"{name}: missing from params (use gc.init_params(graph) for fresh values)")
        arr = params[name]
        if not isinstance(arr, array_types):
            raise InputError(f"{name}: expected a numpy array, got {type(arr).__name__}")
        shape = tuple(int(d) for d in node.shape)
        if arr.shape != shape:
            raise InputError(f"{name}: expected shape {fmt_shape(shape)}, got {fmt_shape(arr.shape)}")
        if str(arr.dtype) != node.dtype:
            raise InputError(f"{name}: expected {node.dtype}, got {arr.dtype} (the graph runs in {node.dtype}: "
                             f"convert the params with {{k: v.astype(np.{node.dtype}) for k, v in params.items()}}, "
                             f"or make them with gc.init_params of that graph)")
        if name in counters:
            check_counter(name, arr, node.dtype)
        out[name] = arr
    return out


def check_counter(name, arr, dtype):
    """A step counter (dropout's mask sequence, Adam's bias corrections): a whole number from 0 up to
    the last one its dtype counts exactly (2^24 in float32: past it, + 1 changes nothing, so every
    later step would draw the same dropout masks)."""
    value = float(arr.reshape(-1)[0]) if arr.size == 1 else float("nan")
    limit = 2 ** (24 if dtype == "float32" else 53)
    if not (math.isfinite(value) and value >= 0 and value.is_integer() and value < limit):
        raise InputError(f"{name}: a step counter must be a whole number in [0, 2^{int(math.log2(limit))}) "
                         f"(what {dtype} counts exactly), got {value!r}")
