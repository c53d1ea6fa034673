"""Property-based fuzzing of the promise "every failure is a graphconv.GraphConvError".

Random inputs go through the Python API (builder, compile/run, Trainer, checkpoints) and the CLI. Every
outcome must be a valid result or a `gc.GraphConvError`; any other exception escapes the test and fails it.
The CLI must exit 0 (1 only for a failed gradcheck) or 2 with exactly one `graphconv: error:` line on
stderr and no traceback (argparse usage errors, SystemExit(2), are accepted too). A checkpoint written by
`Trainer.save` or `graphconv train` never holds a non-finite value.

Deterministic (derandomize=True) and bounded: the whole file runs in well under a minute on two cores.
"""
import os
import shutil
import tempfile
import zipfile

import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

import graphconv as gc
from graphconv import data as gc_data
from graphconv.cli import main
from graphconv.ops import OPS
from graphconv.training import Optimizer, Trainer

# No shrink phase: with several bugs at once shrinking can take minutes; each failure is still
# reported with the notes below (the exact calls made), which are the reproduction.
FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=False,
            phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))

NAN, INF = float("nan"), float("inf")
RUN_LIMIT = 60_000          # run a built graph only when all its tensors together hold fewer elements


# ---- helpers --------------------------------------------------------------------------------------

def attempt(fn, *args, **kwargs):
    """(True, result) or (False, the GraphConvError); any other exception propagates and fails the test."""
    try:
        return True, fn(*args, **kwargs)
    except gc.GraphConvError as e:
        assert str(e).strip(), f"{type(e).__name__} with an empty message"
        return False, e


def pick(data, valid, bad, percent_bad=20, label=None):
    """A valid value most of the time, one of `bad` otherwise (shrinks towards valid)."""
    if data.draw(st.integers(0, 99), label=None) < 100 - percent_bad:
        return data.draw(valid if isinstance(valid, st.SearchStrategy) else st.just(valid), label=label)
    return data.draw(st.sampled_from(bad), label=label)


def all_finite(arrays):
    return all(np.isfinite(a).all() for a in arrays
               if isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.floating))


def npz_values(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def assert_finite_checkpoint(path):
    values = npz_values(path)
    bad = [k for k, v in values.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
    assert not bad, f"{path}: the saved checkpoint holds non-finite values in {bad}"


BAD_SIZE = [0, -1, -3, 1.5, 2.0, "3", "two", None, True, False, (), (1,), (1, 1, 1, 1), [2, "a"], 10**12,
            -10**12, 2**63, NAN, INF, 1 + 2j, b"2", np.float64(2.0), object()]
BAD_PADDING = BAD_SIZE + ["SAME", "full", "", ((1, 1),), ((0, 1), (1, 0), (1, 1), (0, 0)), ((-1, 0),),
                          ((1, 2, 3),), [[1, 1]], ((1.5, 1),), (("a", 1),)]
BAD_FLOAT = [0, 0.0, -1.0, NAN, INF, -INF, "0.1", "abc", None, 1e300, 1e-300, 1e-50, True, (0.1,), 1 + 1j]
BAD_BOOL = [None, "yes", 2, "False", [], NAN]
BAD_DIM = [1.5, "1", None, True, 10, -10, 2**70, (1,)]
BAD_NAMES = ["", 3, "x", "conv1", "relu1", "a b", "x.weight", ("a",), ["a"], "n\u00e4me", "a" * 300, 1.5, b"x"]
APPLY_OPS = sorted(OPS) + ["nope", "", None, 3]   # fixed at import: later define_activation calls add ops
OTHER_GRAPH = gc.Graph("other")
OTHER_TENSOR = OTHER_GRAPH.input("z", ("N", 2, 4, 4))
BAD_OPERANDS = ["nope", 3, None, OTHER_TENSOR, [OTHER_TENSOR], 1.0]


def per_axis_value(nd, lo, hi):
    return st.one_of(st.integers(lo, hi), st.tuples(*[st.integers(lo, hi)] * nd))


def padding_value(nd):
    return st.one_of(st.integers(0, 2), st.tuples(*[st.integers(0, 2)] * nd),
                     st.sampled_from(["same", "valid"]),
                     st.tuples(*[st.tuples(st.integers(0, 2), st.integers(0, 2))] * nd))


# ---- 1. builder + compile + run ------------------------------------------------------------------

def draw_shape(data):
    rank = data.draw(st.sampled_from([4, 3, 5, 2, 1]), label="rank")
    dims = ["N"] + [data.draw(st.integers(1, 3)) if i == 0 else data.draw(st.integers(1, 6)) for i in range(rank - 1)]
    dims = [pick(data, st.just(d), [0, -1, 1.5, "", "2N", "M", None, True, sp.Symbol("K"), 10**12], 5) for d in dims]
    return pick(data, st.just(tuple(dims)), [5, "abc", None, (), [1, [2]], {"N": 1}], 4, label="shape")


def draw_layer_call(data, g, tensors):
    """One builder call on a random operand: (description, thunk)."""
    x = pick(data, st.sampled_from(tensors), BAD_OPERANDS, 5, label="operand")
    rank = len(x.shape) if isinstance(x, gc.Tensor) and x.graph is g else 4
    nd = rank - 2 if 3 <= rank <= 5 else data.draw(st.integers(1, 3))
    ops = ["conv", "max_pool", "avg_pool", "batch_norm", "relu", "tanh", "sigmoid", "leaky_relu", "flatten",
           "linear", "add", "concat", "reshape", "activation", "apply", "loss"]
    op = data.draw(st.sampled_from(ops), label="op")
    kw = {}
    name = pick(data, st.none(), BAD_NAMES, 10)
    if name is not None:
        kw["name"] = name

    def opt(key, valid, bad, percent_bad=20, p_give=50):
        if data.draw(st.integers(0, 99)) < p_give:
            kw[key] = pick(data, valid, bad, percent_bad, label=key)

    if op == "conv":
        nd = pick(data, st.just(nd), [1, 2, 3], 10)
        out_c = pick(data, st.integers(1, 4), BAD_SIZE, label="out_channels")
        kernel = pick(data, per_axis_value(nd, 1, 3), BAD_SIZE, label="kernel_size")
        opt("stride", per_axis_value(nd, 1, 3), BAD_SIZE)
        opt("padding", padding_value(nd), BAD_PADDING)
        opt("dilation", per_axis_value(nd, 1, 2), BAD_SIZE)
        opt("groups", st.sampled_from([1, 2]), BAD_SIZE)
        opt("bias", st.booleans(), BAD_BOOL)
        opt("padding_mode", st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
            ["constant", "", None, 0, "Zeros"])
        opt("in_channels", st.integers(1, 4), BAD_SIZE, p_give=15)
        opt("kernal_size", st.just(3), [3], p_give=4)
        return f"g.conv{nd}d({x!r}, {out_c!r}, {kernel!r}, **{kw!r})", \
            lambda: getattr(g, f"conv{nd}d")(x, out_c, kernel, **kw)
    if op in ("max_pool", "avg_pool"):
        nd = pick(data, st.just(nd), [1, 2, 3], 10)
        kernel = pick(data, per_axis_value(nd, 1, 3), BAD_SIZE, label="kernel_size")
        opt("stride", st.one_of(st.none(), per_axis_value(nd, 1, 3)), BAD_SIZE)
        opt("padding", st.one_of(st.integers(0, 1), st.tuples(*[st.integers(0, 1)] * nd)), BAD_PADDING + ["same"])
        opt("ceil_mode", st.booleans(), BAD_BOOL)
        if op == "max_pool":
            opt("dilation", per_axis_value(nd, 1, 2), BAD_SIZE)
        else:
            opt("count_include_pad", st.booleans(), BAD_BOOL)
            opt("divisor_override", st.one_of(st.none(), st.integers(1, 5)), BAD_SIZE)
        opt("dilaton", st.just(1), [1], p_give=3)
        return f"g.{op}{nd}d({x!r}, {kernel!r}, **{kw!r})", lambda: getattr(g, f"{op}{nd}d")(x, kernel, **kw)
    if op == "batch_norm":
        nd = pick(data, st.just(max(nd, 1)), [1, 2, 3], 10)
        opt("num_features", st.integers(1, 4), BAD_SIZE, p_give=15)
        opt("eps", st.sampled_from([1e-5, 1e-3, 0.1]), BAD_FLOAT)
        opt("momentum", st.sampled_from([0.1, 0.0, 1.0, None]), BAD_FLOAT)
        opt("affine", st.booleans(), BAD_BOOL)
        opt("training", st.booleans(), BAD_BOOL)
        return f"g.batch_norm{nd}d({x!r}, **{kw!r})", lambda: getattr(g, f"batch_norm{nd}d")(x, **kw)
    if op in ("relu", "tanh", "sigmoid"):
        return f"g.{op}({x!r}, **{kw!r})", lambda: getattr(g, op)(x, **kw)
    if op == "leaky_relu":
        opt("negative_slope", st.sampled_from([0.01, 0.2, 0.0, 1.0, -0.5]), BAD_FLOAT)
        return f"g.leaky_relu({x!r}, **{kw!r})", lambda: g.leaky_relu(x, **kw)
    if op == "flatten":
        opt("start_dim", st.integers(-rank - 1, rank), BAD_DIM)
        opt("end_dim", st.integers(-rank - 1, rank), BAD_DIM)
        return f"g.flatten({x!r}, **{kw!r})", lambda: g.flatten(x, **kw)
    if op == "linear":
        out_f = pick(data, st.integers(1, 5), BAD_SIZE, label="out_features")
        opt("bias", st.booleans(), BAD_BOOL)
        opt("in_features", st.integers(1, 30), BAD_SIZE, p_give=15)
        return f"g.linear({x!r}, {out_f!r}, **{kw!r})", lambda: g.linear(x, out_f, **kw)
    if op == "add":
        b = pick(data, st.sampled_from(tensors), BAD_OPERANDS, 5)
        if isinstance(x, gc.Tensor) and data.draw(st.booleans()):
            return f"{x!r} + {b!r}", lambda: x + b
        return f"g.add({x!r}, {b!r}, **{kw!r})", lambda: g.add(x, b, **kw)
    if op == "concat":
        parts = pick(data, st.lists(st.sampled_from(tensors), min_size=1, max_size=3),
                     [[], [x, "nope"], [x, None], x, "x", None, [OTHER_TENSOR]], 10)
        opt("dim", st.integers(-rank - 1, rank), BAD_DIM, p_give=60)
        return f"g.concat({parts!r}, **{kw!r})", lambda: g.concat(parts, **kw)
    if op == "reshape":
        dim = st.sampled_from([-1, 1, 2, 3, 4, 6, 8, "N", 0, -2, 1.5, "", "2N", None, True])
        shape = pick(data, st.lists(dim, min_size=1, max_size=4).map(tuple), ["abc", 5, None, [], -1, {"a": 1}], 10)
        return f"g.reshape({x!r}, {shape!r}, **{kw!r})", lambda: g.reshape(x, shape, **kw)
    if op == "activation":
        fn = data.draw(st.sampled_from(["relu", "tanh", "sigmoid", "leaky_relu", "gelu", "", None, 3, "conv2d",
                                        "input"]))
        params = data.draw(st.sampled_from([{}, {"negative_slope": 0.1}, {"alpha": 1}, {"negative_slope": "x"}]))
        return f"g.activation({x!r}, {fn!r}, **{params!r})", lambda: g.activation(x, fn, **params, **kw)
    if op == "apply":
        opname = data.draw(st.sampled_from(APPLY_OPS), label="apply op")
        operands = data.draw(st.lists(st.sampled_from(tensors), max_size=3))
        attrs = data.draw(st.dictionaries(
            st.sampled_from(["shape", "dtype", "value", "dim", "start", "stop", "axes", "kernel_size", "stride",
                             "momentum", "stat", "lr", "margin", "transpose_a", "input_size", "eps", "init"]),
            st.sampled_from([0, 1, 2, -1, (1,), (2, 2), "float32", "mean", 0.5, None, "N", ("N", 2), True]),
            max_size=3))
        return f"g.apply({opname!r}, *{operands!r}, **{attrs!r})", lambda: g.apply(opname, *operands, **attrs)
    # loss: scores and an int64 target
    targets = [t for t in tensors if t.dtype == "int64"]
    y = pick(data, st.sampled_from(targets or tensors), BAD_OPERANDS, 5)
    if data.draw(st.booleans()):
        opt("margin", st.sampled_from([1.0, 0.5, 0.0]), BAD_FLOAT)
        return f"g.hinge_loss({x!r}, {y!r}, **{kw!r})", lambda: g.hinge_loss(x, y, **kw)
    return f"g.cross_entropy({x!r}, {y!r}, **{kw!r})", lambda: g.cross_entropy(x, y, **kw)


def graph_state(g):
    return list(g.nx.nodes), sorted(g.nx.edges(keys=True), key=repr), list(g.outputs)


def numel_bound(graph, bindings):
    """Elements in all tensors of the graph for these symbol values (None when a dim is not concrete)."""
    total = 0
    for node in graph.topo():
        n = 1
        for d in node.shape:
            v = sp.sympify(d).subs(bindings)
            if not v.is_Integer:
                return None
            n *= max(int(v), 0)
        total += n
    return total


def draw_array(data, rng, shape, dtype):
    if dtype == "int64":
        arr = rng.integers(0, 3, size=shape)
    else:
        arr = rng.standard_normal(shape).astype(dtype)
    variant = pick(data, st.just("ok"), ["nan", "inf", "huge", "dtype16", "dtype64", "int", "bool", "extra_dim",
                                         "dim_plus", "batch0", "list", "scalar", "none", "noncontig", "neg_class",
                                         "big_class", "object", "zeros", "zeros"], 25, label="input variant")
    if variant == "nan" and arr.dtype.kind == "f" and arr.size:
        arr.flat[0] = np.nan
    elif variant == "inf" and arr.dtype.kind == "f" and arr.size:
        arr.flat[-1] = -np.inf
    elif variant == "huge" and arr.dtype.kind == "f":
        big = np.finfo(arr.dtype).max
        arr = np.clip(arr.astype(np.float64) * (big / 8), -big, big).astype(arr.dtype)
    elif variant == "dtype16":
        arr = arr.astype(np.float16)
    elif variant == "dtype64":
        arr = arr.astype(np.float64 if arr.dtype != np.float64 else np.float32)
    elif variant == "int":
        arr = arr.astype(np.int32)
    elif variant == "bool":
        arr = arr > 0
    elif variant == "extra_dim":
        arr = arr[None]
    elif variant == "dim_plus" and arr.ndim:
        arr = np.concatenate([arr, arr[..., -1:]], axis=-1)
    elif variant == "batch0" and arr.ndim:
        arr = arr[:0]
    elif variant == "list":
        arr = arr.tolist()
    elif variant == "scalar":
        arr = 1.0
    elif variant == "none":
        arr = None
    elif variant == "noncontig" and arr.ndim:
        arr = np.flip(arr, axis=-1)
    elif variant == "neg_class" and arr.dtype.kind == "i" and arr.size:
        arr.flat[0] = -1
    elif variant == "big_class" and arr.dtype.kind == "i" and arr.size:
        arr.flat[0] = 10**6
    elif variant == "zeros":
        arr = np.zeros_like(arr)
    elif variant == "object":
        arr = np.array(arr, dtype=object)
    return arr


@settings(max_examples=500, **FUZZ)
@given(data=st.data())
def test_fuzz_builder_compile_run(data):
    dtype = pick(data, st.sampled_from(["float32", "float64"]), ["float16", None, "int64", 3, np.float32], 5,
                 label="graph dtype")
    ok, g = attempt(gc.Graph, "fuzz", dtype)
    if not ok:
        return
    tensors = []
    for i in range(data.draw(st.integers(1, 2), label="inputs")):
        name = pick(data, st.just(f"x{i}" if i else "x"), BAD_NAMES + [None], 10)
        in_dtype = pick(data, st.none(), ["float32", "float64", "int64", "uint8", "float16", np.float32, "x", 3], 15)
        shape = draw_shape(data)
        before = graph_state(g)
        ok, t = attempt(g.input, name, shape, in_dtype)
        note(f"g.input({name!r}, {shape!r}, {in_dtype!r}) -> {'ok' if ok else repr(t)}")
        if ok:
            assert isinstance(t, gc.Tensor)
            tensors.append(t)
        else:
            assert graph_state(g) == before, "a failed g.input changed the graph"
            g.verify()
    if not tensors:
        return
    if data.draw(st.booleans(), label="with target"):
        ok, y = attempt(g.input, "y", ("N",), "int64")
        if ok:
            tensors.append(y)

    for _ in range(data.draw(st.integers(1, 6), label="layers")):
        desc, call = draw_layer_call(data, g, tensors)
        before = graph_state(g)
        ok, t = attempt(call)
        note(f"{desc} -> {'ok ' + repr(t) if ok else type(t).__name__ + ': ' + str(t)}")
        if ok:
            assert isinstance(t, gc.Tensor) and t.graph is g and t.name in g
            tensors.append(t)
        else:
            assert graph_state(g) == before, f"a failed call changed the graph: {desc}"
            g.verify()
    g.verify()

    # outputs, printing, summary
    out = data.draw(st.sampled_from(tensors), label="output")
    if data.draw(st.integers(0, 9)) > 0:
        g.output(out)
    attempt(g.summary, batch=pick(data, st.none(), [0, -1, 2, "a", 2.5, 10**30], 30))
    attempt(g.dump, pick(data, st.sampled_from(["text", "json", "dot"]), ["xml", "", None], 10))

    # compile and run
    backend = pick(data, st.just("numpy"), ["host", "cuda", "tpu", None, ""], 5)
    cdtype = pick(data, st.none(), ["float32", "float64", "float16", "int64", 3], 30, label="compile dtype")
    training = pick(data, st.none(), [True, False, "no"], 30, label="training")
    ok, program = attempt(gc.compile, g, backend=backend, dtype=cdtype, training=training)
    note(f"gc.compile(g, backend={backend!r}, dtype={cdtype!r}, training={training!r}) -> {ok}")
    if not ok:
        return
    graph = program.graph
    symbols = sorted({s for n in graph.inputs for d in n.shape for s in sp.sympify(d).free_symbols}, key=str)
    bindings = {s: data.draw(st.integers(1, 3), label=f"bind {s}") for s in symbols}
    size = numel_bound(graph, bindings)
    if size is not None and size > RUN_LIMIT:
        return
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="rng"))
    inputs = {}
    for node in graph.inputs:
        shape = tuple(int(sp.sympify(d).subs(bindings)) if sp.sympify(d).subs(bindings).is_Integer else 1
                      for d in node.shape)
        inputs[node.name] = draw_array(data, rng, shape, node.dtype)
    mangle = pick(data, st.just("none"), ["missing", "extra", "not_dict"], 8, label="inputs mangled")
    if mangle == "missing" and inputs:
        inputs.pop(next(iter(inputs)))
    elif mangle == "extra":
        inputs["bogus"] = np.zeros(2, np.float32)

    ok, params = attempt(gc.init_params, graph, seed=pick(data, st.integers(0, 5), [-1, 2**70, "a", None, 1.5], 8))
    if not ok:
        params = {}
    pvariant = pick(data, st.just("ok"), ["missing", "extra", "nan", "dtype", "shape", "list", "none", "not_dict"],
                    12, label="params variant")
    if params and pvariant in ("missing", "nan", "dtype", "shape", "list"):
        key = data.draw(st.sampled_from(sorted(params)))
        if pvariant == "missing":
            params.pop(key)
        elif pvariant == "nan" and params[key].size:
            params[key] = params[key].copy()
            params[key].flat[0] = np.nan
        elif pvariant == "dtype":
            params[key] = params[key].astype(np.float16)
        elif pvariant == "shape":
            params[key] = params[key][None]
        elif pvariant == "list":
            params[key] = params[key].tolist()
    elif pvariant == "extra":
        params["bogus.weight"] = np.zeros(1, np.float32)
    elif pvariant == "none":
        params = None
    elif pvariant == "not_dict":
        params = list((params or {}).values())

    how = data.draw(st.sampled_from(["run", "keywords", "positional"]), label="call style")
    if how == "keywords" and not all(isinstance(k, str) for k in inputs):
        how = "run"              # f(**{3: a}) is Python's TypeError, raised before graphconv is called
    # outputs must be finite for finite, moderate inputs (values near the float maximum may overflow)
    finite_in = all_finite(inputs.values()) and (not isinstance(params, dict) or all_finite(params.values())) \
        and all(np.abs(a).max(initial=0) < 1e4 for a in inputs.values()
                if isinstance(a, np.ndarray) and a.dtype.kind == "f")
    note(f"run via {how}; finite inputs: {finite_in}")
    if how == "run":
        ok, result = attempt(program.run, inputs if mangle != "not_dict" else list(inputs.values()), params)
        values = list(result.values()) if ok else []
    elif how == "keywords":
        ok, result = attempt(program, params=params, **inputs)
        values = list(result) if ok and isinstance(result, tuple) else [result] if ok else []
    else:
        ok, result = attempt(program, *inputs.values(), params=params)
        values = list(result) if ok and isinstance(result, tuple) else [result] if ok else []
    if ok:
        assert all(isinstance(v, np.ndarray) for v in values)
        if finite_in:
            assert all_finite(values), "finite inputs and parameters gave a non-finite output"


# ---- 2. training API and checkpoints --------------------------------------------------------------

def tiny_model(kind, dtype="float32"):
    g = gc.Graph(f"tiny_{kind}", dtype)
    x = g.input("x", ("N", 2, 4, 4))
    if kind == "bn":
        h = g.relu(g.batch_norm2d(g.conv2d(x, 3, 3, padding=1, name="conv"), name="bn"))
        h = g.max_pool2d(h, 2)
    elif kind == "gap":
        h = g.avg_pool2d(g.conv2d(x, 3, 2, name="conv"), 3)
    else:
        h = x
    g.output(g.linear(g.flatten(h), 3, name="fc"))
    return g


OPT_VALUES = {
    "kind": (st.sampled_from(["adam", "sgd"]), ["Adam", "", None, 3, "rmsprop"]),
    "lr": (st.sampled_from([1e-3, 0.1, 1.0]), [0, -1e-3, NAN, INF, -INF, 1e300, 1e-320, "0.1", None, True]),
    "momentum": (st.sampled_from([0.9, 0.0, 0.5]), [-1.0, NAN, INF, 1.5, 1e10, "a", None]),
    "weight_decay": (st.sampled_from([0.0, 1e-2]), [-1.0, NAN, INF, 1e10, "a", None]),
    "beta1": (st.sampled_from([0.9, 0.5]), [0.0, 1.0, -1.0, NAN, 1.5, "a"]),
    "beta2": (st.sampled_from([0.999, 0.9]), [1.0, 0.0, NAN, 2.0, None]),
    "eps": (st.sampled_from([1e-8, 1e-6]), [0.0, -1.0, NAN, INF, 1e-320]),
}


def batch_data(data, rng, n, dtype, classes=3):
    x = rng.standard_normal((n, 2, 4, 4)).astype(dtype)
    y = rng.integers(0, classes, n)
    xv = pick(data, st.just("ok"), ["nan", "inf", "huge", "dtype", "shape", "list", "none", "int"], 25, label="x")
    yv = pick(data, st.just("ok"), ["neg", "big", "float", "int32", "len", "2d", "list", "none"], 20, label="y")
    if xv == "nan" and n:
        x[0, 0, 0, 0] = np.nan
    elif xv == "inf" and n:
        x[-1, -1, -1, -1] = np.inf
    elif xv == "huge":
        x = (x * 1e30).astype(dtype)
    elif xv == "dtype":
        x = x.astype(np.float64 if dtype == "float32" else np.float32)
    elif xv == "shape":
        x = x[:, :1]
    elif xv == "list":
        x = x.tolist()
    elif xv == "none":
        x = None
    elif xv == "int":
        x = x.astype(np.int64)
    if yv == "neg" and n:
        y[0] = -1
    elif yv == "big" and n:
        y[-1] = classes
    elif yv == "float":
        y = y.astype(np.float32)
    elif yv == "int32":
        y = y.astype(np.int32)
    elif yv == "len":
        y = y[:-1]
    elif yv == "2d":
        y = y[:, None]
    elif yv == "list":
        y = y.tolist()
    elif yv == "none":
        y = None
    return x, y


def corrupt_checkpoint(data, good, path):
    """Write a corrupted version of the checkpoint file `good` to `path`; returns a label."""
    raw = open(good, "rb").read()
    kind = data.draw(st.sampled_from(["truncate", "flip", "empty", "text", "random", "missing_key", "extra_key",
                                      "reshaped", "dtype", "nan", "inf", "epoch_str", "epoch_nan", "epoch_neg",
                                      "epoch_vec", "epoch_missing", "object", "npy", "raw_member", "no_prefix",
                                      "scalar", "directory", "nonexistent", "path_type", "pickle", "opt_json",
                                      "opt_kind", "opt_values", "opt_list"]),
                     label="corruption")
    if kind == "truncate":
        cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
        open(path, "wb").write(raw[:cut])
    elif kind == "flip":
        buf = bytearray(raw)
        for pos in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4), label="flips"):
            buf[pos] ^= data.draw(st.integers(1, 255))
        open(path, "wb").write(bytes(buf))
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "text":
        open(path, "w").write("this is not a checkpoint\n")
    elif kind == "random":
        open(path, "wb").write(np.random.default_rng(len(raw)).bytes(300))
    elif kind in ("directory", "nonexistent", "path_type"):
        if kind == "directory":
            os.makedirs(path, exist_ok=True)
        return kind
    elif kind == "npy":
        np.save(open(path, "wb"), np.zeros(3))
    elif kind == "pickle":
        import pickle
        open(path, "wb").write(pickle.dumps({"state/fc.weight": np.zeros(3)}))
    elif kind == "raw_member":
        values = npz_values(good)
        with zipfile.ZipFile(path, "w") as z:
            for k, v in values.items():
                z.writestr(k, v.tobytes())    # members without the .npy suffix: NpzFile hands back raw bytes
    else:
        values = npz_values(good)
        keys = sorted(k for k in values if k.startswith("state/"))
        key = data.draw(st.sampled_from(keys), label="key")
        if kind == "missing_key":
            values.pop(key)
        elif kind == "extra_key":
            values["state/bogus.weight"] = np.zeros(2, np.float32)
        elif kind == "reshaped":
            values[key] = np.zeros(values[key].shape + (2,), values[key].dtype)
        elif kind == "dtype":
            values[key] = values[key].astype(np.float16)
        elif kind == "nan":
            values[key] = np.full_like(values[key], np.nan)
        elif kind == "inf":
            values[key] = np.full_like(values[key], np.inf)
        elif kind == "epoch_str":
            values["meta/epoch"] = np.array("three")
        elif kind == "epoch_nan":
            values["meta/epoch"] = np.array(np.nan)
        elif kind == "epoch_neg":
            values["meta/epoch"] = np.array(-5)
        elif kind == "epoch_vec":
            values["meta/epoch"] = np.array([1, 2])
        elif kind == "epoch_missing":
            values.pop("meta/epoch")
        elif kind == "object":
            values[key] = np.array([None, 1], dtype=object)
        elif kind == "no_prefix":
            values = {k.replace("state/", ""): v for k, v in values.items()}
        elif kind == "scalar":
            values[key] = np.float32(1.0)
        elif kind == "opt_json":
            values["meta/optimizer"] = np.array("{not json")
        elif kind == "opt_kind":
            values["meta/optimizer"] = np.array('{"kind": "lbfgs", "lr": 0.1}')
        elif kind == "opt_values":
            values["meta/optimizer"] = np.array('{"kind": "adam", "lr": "fast", "beta1": null, "eps": [1]}')
        elif kind == "opt_list":
            values["meta/optimizer"] = np.array([1.0, 2.0])
        with open(path, "wb") as f:
            np.savez(f, **values)
    return kind


@settings(max_examples=150, **FUZZ)
@given(data=st.data())
def test_fuzz_training_and_checkpoints(data, tmp_path):
    folder = tempfile.mkdtemp(dir=tmp_path)
    kind = data.draw(st.sampled_from(["bn", "flat", "gap"]), label="model")
    dtype = data.draw(st.sampled_from(["float32", "float64"]), label="dtype")
    graph = tiny_model(kind, dtype)
    kw = {k: pick(data, valid, bad, 25, label=k) for k, (valid, bad) in OPT_VALUES.items()
          if data.draw(st.integers(0, 99)) < 60}
    ok, opt = attempt(Optimizer, **kw)
    note(f"Optimizer(**{kw!r}) -> {opt!r}")
    if not ok:
        opt = Optimizer()
    loss = pick(data, st.sampled_from(["cross_entropy", "hinge"]), ["mse", "", None], 8, label="loss")
    seed = pick(data, st.integers(0, 3), [-1, 2**70, "a", None, 1.5], 8, label="seed")
    ok, trainer = attempt(Trainer, graph, opt, loss=loss, seed=seed)
    note(f"Trainer({kind}/{dtype}, {opt!r}, loss={loss!r}, seed={seed!r}) -> {ok}")
    if not ok:
        return
    good = os.path.join(folder, "good.npz")
    trainer.save(good)                       # a fresh trainer's state is finite
    assert_finite_checkpoint(good)
    good_bytes = open(good, "rb").read()

    rng = np.random.default_rng(data.draw(st.integers(0, 100), label="rng"))
    for _ in range(data.draw(st.integers(1, 3), label="steps")):
        n = pick(data, st.integers(2, 5), [1, 0], 10, label="batch")
        x, y = batch_data(data, rng, n, dtype)
        before = {k: v.copy() for k, v in trainer.state.items()}
        ok, result = attempt(trainer.step, x, y)
        note(f"step(x {getattr(x, 'dtype', type(x).__name__)}{getattr(x, 'shape', '')}, y {y!r}) -> "
             f"{result if not ok else 'loss %r' % result[0]}")
        if ok:
            assert isinstance(result[0], float) and isinstance(result[1], np.ndarray)
        else:
            assert all(np.array_equal(before[k], trainer.state[k], equal_nan=True) for k in before), \
                "a failed step changed the trainer's state"
    if data.draw(st.booleans()):
        x, y = batch_data(data, rng, data.draw(st.integers(1, 5)), dtype)
        attempt(trainer.evaluate, x, y, batch=pick(data, st.integers(1, 4), [0, -1, None], 10))

    # save: fine (and finite on disk) or a GraphConvError that leaves the previous file alone
    target = pick(data, st.just(good), [os.path.join(folder, "nodir", "c.npz"), folder, os.path.join(folder, "c"),
                                        os.path.join(folder, "new.npz")], 30, label="save path")
    ok, _ = attempt(trainer.save, target)
    note(f"save({target!r}) -> {ok}")
    if ok:
        assert_finite_checkpoint(target)
    elif target == good:
        assert open(good, "rb").read() == good_bytes, "a failed save changed the checkpoint on disk"
    assert not [f for f in os.listdir(folder) if f.startswith(".tmp-")], "save left a temporary file behind"

    # load a corrupted checkpoint: fine or a GraphConvError that leaves the trainer as it was
    bad_path = os.path.join(folder, "bad.npz")
    label = corrupt_checkpoint(data, good, bad_path)
    if label == "nonexistent":
        bad_path = os.path.join(folder, "missing", "x.npz")
    elif label == "path_type":
        bad_path = data.draw(st.sampled_from([None, 3, b"\0", "", ["a"]]))
    note(f"load({bad_path!r}) after corruption {label!r}")
    before = {k: v.copy() for k, v in trainer.state.items()}
    epoch = trainer.epoch
    fresh = Trainer(tiny_model(kind, dtype), opt, loss=loss, seed=0) if data.draw(st.booleans()) else trainer
    ok, _ = attempt(fresh.load, bad_path)
    if not ok:
        if fresh is trainer:
            assert trainer.epoch == epoch and all(np.array_equal(before[k], trainer.state[k], equal_nan=True)
                                                  for k in before), "a failed load changed the trainer"
        return
    assert isinstance(fresh.epoch, int)
    assert set(fresh.state) == set(before)
    # whatever was accepted must not end up as a non-finite checkpoint
    x, y = batch_data(data, rng, 4, dtype)
    attempt(fresh.step, x, y)
    again = os.path.join(folder, "again.npz")
    ok, _ = attempt(fresh.save, again)
    if ok:
        assert_finite_checkpoint(again)


# ---- 3. the command line -------------------------------------------------------------------------

USER_MODELS = '''
import graphconv as gc

def lin():
    g = gc.Graph("lin")
    g.output(g.linear(g.flatten(g.input("x", ("N", 1, 8, 8))), 10, name="fc"))
    return g

def bn():
    g = gc.Graph("bn")
    h = g.relu(g.batch_norm2d(g.conv2d(g.input("x", ("N", 1, 8, 8)), 2, 3, padding=1, name="c"), name="bn"))
    g.output(g.linear(g.flatten(g.max_pool2d(h, 2)), 10, name="fc"))
    return g

def seq():
    g = gc.Graph("seq")
    g.output(g.linear(g.flatten(g.avg_pool1d(g.input("x", ("N", 1, 40)), 4)), 10, name="fc"))
    return g

def gap():
    g = gc.Graph("gap")
    h = g.avg_pool2d(g.conv2d(g.input("x", ("N", 1, 4, 4)), 10, 3, name="c"), 2)
    g.output(h)
    return g

def five():
    g = gc.Graph("five")
    g.output(g.linear(g.flatten(g.input("x", ("N", 1, 8, 8))), 5, name="fc"))
    return g

def spatial():
    g = gc.Graph("spatial")
    g.output(g.conv2d(g.input("x", ("N", 1, 8, 8)), 2, 3, name="c"))
    return g

def noout():
    g = gc.Graph("noout")
    g.conv2d(g.input("x", ("N", 1, 8, 8)), 2, 3, name="c")
    return g

def broken():
    g = gc.Graph("broken")
    g.conv2d(g.input("x", ("N", 1, 4, 4)), 2, 7, name="c")
    return g

def flat():
    g = gc.Graph("flat")
    g.output(g.linear(g.input("x", ("N", 64)), 10, name="fc"))
    return g

def vol():
    g = gc.Graph("vol")
    g.output(g.linear(g.flatten(g.max_pool3d(g.input("x", ("N", 1, 4, 4, 4)), 2)), 10, name="fc"))
    return g

def sym():
    g = gc.Graph("sym")
    g.output(g.conv2d(g.input("x", ("N", 1, "H", "W")), 2, 3, padding=1, name="c"))
    return g

def named():
    g = gc.Graph("named")
    g.output(g.linear(g.flatten(g.input("img", ("N", 1, 8, 8))), 10, name="loss"))
    return g

def raises():
    return 1 / 0

def needs_args(width):
    return width

def notgraph():
    return 3

not_callable = 5
'''


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """User model files, checkpoints (good and corrupt) for --resume, and cached data sets."""
    d = tmp_path_factory.mktemp("cli")
    (d / "models.py").write_text(USER_MODELS)
    (d / "models.txt").write_text(USER_MODELS)
    (d / "syntax.py").write_text("def net(:\n")
    from graphconv.models import load
    ck = {}
    for spec, opt in (("lin", "adam"), ("lin", "sgd"), ("bn", "adam"), ("seq", "adam")):
        t = Trainer(load(f"{d / 'models.py'}:{spec}"), Optimizer(opt))
        ck[f"{spec}_{opt}"] = str(d / f"{spec}_{opt}.npz")
        t.save(ck[f"{spec}_{opt}"])
    good = ck["lin_adam"]
    raw = open(good, "rb").read()
    values = npz_values(good)

    def savez(name, **changes):
        vals = {**values, **changes}
        vals = {k: v for k, v in vals.items() if v is not None}
        with open(d / name, "wb") as f:
            np.savez(f, **vals)
        ck[name] = str(d / name)

    (d / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    (d / "flip.npz").write_bytes(raw[:len(raw) - 40] + bytes(b ^ 0xFF for b in raw[len(raw) - 40:len(raw) - 30])
                                 + raw[len(raw) - 30:])
    mid = bytearray(raw)
    mid[len(raw) // 2] ^= 0x55
    (d / "flipmid.npz").write_bytes(bytes(mid))
    (d / "empty.npz").write_bytes(b"")
    (d / "text.npz").write_text("hello\n")
    np.save(d / "array.npy", np.zeros(3))
    with zipfile.ZipFile(d / "raw.npz", "w") as z:
        for k, v in values.items():
            z.writestr(k, v.tobytes())
    for name in ("trunc.npz", "flip.npz", "flipmid.npz", "empty.npz", "text.npz", "array.npy", "raw.npz"):
        ck[name] = str(d / name)
    savez("nan.npz", **{"state/fc.weight": np.full_like(values["state/fc.weight"], np.nan)})
    savez("inf.npz", **{"state/fc.bias": np.full_like(values["state/fc.bias"], np.inf)})
    savez("missing.npz", **{"state/fc.bias": None})
    savez("shape.npz", **{"state/fc.bias": np.zeros(11, np.float32)})
    savez("epoch_neg.npz", **{"meta/epoch": np.array(-3)})
    savez("epoch_nan.npz", **{"meta/epoch": np.array(np.nan)})
    savez("epoch_str.npz", **{"meta/epoch": np.array("one")})
    savez("epoch_vec.npz", **{"meta/epoch": np.array([1, 2])})
    savez("epoch_big.npz", **{"meta/epoch": np.array(2**62)})
    ck["dir"] = str(d)
    ck["nonexistent"] = str(d / "nope" / "x.npz")

    cache, mp = {}, pytest.MonkeyPatch()
    for name in ("digits", "mnist1d"):     # load each data set once: the fuzzing is not about the data
        def cached(input_shape, model="model", dtype="float32", _orig=getattr(gc_data, name), _name=name):
            key = (_name, tuple(str(s) for s in input_shape), dtype)
            if key not in cache:
                cache[key] = _orig(input_shape, model, dtype)
            return tuple(a.copy() for a in cache[key])
        mp.setattr(gc_data, name, cached)
    yield d, ck
    mp.undo()


def cli_model(data, d, command):
    m = str(d / "models.py")
    good = {"summary": ["lenet5", "lenet5_swish", "vgg_small", "resnet8", "conv1d_net", "conv3d_net", "seed_conv"],
            "dump": ["lenet5", "lenet5_swish", "vgg_small", "resnet8", "conv1d_net", "conv3d_net", "seed_conv"],
            "run": ["lenet5", "conv1d_net", "seed_conv"], "gradcheck": ["conv1d_net"], "train": []}[command]
    good += [f"{m}:lin", f"{m}:bn", f"{m}:seq", f"{m}:flat", f"{m}:vol", f"{m}:named", f"{m}:sym", f"{m}:gap",
             "models.py:lin"]
    bad = [f"{m}:five", f"{m}:spatial", f"{m}:noout", f"{m}:broken", f"{m}:notgraph", f"{m}:not_callable",
           f"{m}:missing", f"{m}:", f"{m}:raises", f"{m}:needs_args", f"{d / 'nope.py'}:lin",
           f"{d / 'models.txt'}:lin", f"{d / 'lin_adam.npz'}:lin", f"{d}:lin", f"{d / 'syntax.py'}:net", "lenet", "",
           ":", "a:b:c"]
    return pick(data, st.sampled_from(good), bad, 30, label="model")


def opt_flag(data, argv, flag, valid, bad=(), p_give=40, percent_bad=12):
    """Maybe add `flag VALUE`: mostly a value argparse accepts, sometimes one it refuses."""
    if data.draw(st.integers(0, 99)) < p_give:
        argv += [flag, pick(data, st.sampled_from(valid), list(bad) or list(valid), percent_bad if bad else 0,
                            label=flag)]


BATCHES = (["1", "2", "3", "8", "1000000000000"], ["0", "-1", "abc", "1.5", "1e3", ""])
SEEDS = (["0", "1", "7", "99999999999999999999999"], ["-1", "abc", "1.5"])


def draw_argv(data, d, ck, out):
    command = data.draw(st.sampled_from(["summary", "dump", "run", "gradcheck", "train", "train", "train", "train",
                                         "models", "bogus"]), label="command")
    if command == "models":
        return ["models"] + data.draw(st.sampled_from([[], [], ["extra"], ["--batch", "2"]]))
    if command == "bogus":
        return data.draw(st.sampled_from([[], ["bogus"], ["--help-me"], ["summary"], ["train", "lenet5", "--lr"]]))
    argv = [command, cli_model(data, d, command)]
    opt_flag(data, argv, "--dtype", ["float32", "float64"], ["float16"], 25)
    dims = [0, 2, 2, 1] if argv[1].endswith(":sym") else [0, 0, 0, 0, 0, 1]
    for _ in range(data.draw(st.sampled_from(dims), label="dims")):
        argv += ["--dim", pick(data, st.sampled_from(["H=4", "W=5", "H=1", "W=3", "N=3", "Q=2", "H=100000000"]),
                               ["H=0", "H", "1=2", "H=x", "W=-1"], 10, label="--dim")]
    if command == "summary":
        opt_flag(data, argv, "--batch", *BATCHES)
        opt_flag(data, argv, "--format", ["table", "json"], ["xml"])
        opt_flag(data, argv, "--stage", ["forward", "train"], ["backward"])
        opt_flag(data, argv, "--loss", ["cross_entropy", "hinge"], ["mse"], 25)
        opt_flag(data, argv, "--optimizer", ["adam", "sgd"], ["lbfgs"], 25)
    elif command == "dump":
        opt_flag(data, argv, "--stage", ["forward", "backward", "train"], ["test"])
        opt_flag(data, argv, "--format", ["text", "dot", "json"], ["xml"])
        opt_flag(data, argv, "--loss", ["cross_entropy", "hinge"], [], 25)
        opt_flag(data, argv, "--optimizer", ["adam", "sgd"], [], 25)
        opt_flag(data, argv, "--batch", *BATCHES)
    elif command == "run":
        opt_flag(data, argv, "--batch", *BATCHES)
        opt_flag(data, argv, "--seed", *SEEDS)
        opt_flag(data, argv, "--backend", ["numpy"], ["cuda"], 15)
    elif command == "gradcheck":
        opt_flag(data, argv, "--loss", ["cross_entropy", "hinge"])
        opt_flag(data, argv, "--seed", *SEEDS)
        opt_flag(data, argv, "--batch", ["1", "2", "3", "1000000000000"], ["0", "-2", "x"])
    else:
        opt_flag(data, argv, "--data", ["digits", "mnist1d", "digits3d"], ["cifar10"], 30)
        argv += ["--epochs", pick(data, st.just("1"), ["0", "-1", "x", "2.5"], 8, label="--epochs")]
        opt_flag(data, argv, "--batch", ["64", "500", "100000", "1000000000000"], ["0", "-1", "x"], 30)
        opt_flag(data, argv, "--optimizer", ["adam", "sgd"], ["rmsprop"])
        opt_flag(data, argv, "--lr", ["0.001", "0.1", "10", "1e300", "1e-320"], ["0", "-1", "nan", "inf", "abc"])
        opt_flag(data, argv, "--momentum", ["0.9", "0", "1e10"], ["-1", "nan", "inf"], 30)
        opt_flag(data, argv, "--weight-decay", ["0", "0.01", "1e10"], ["-1", "nan", "inf"], 30)
        opt_flag(data, argv, "--loss", ["cross_entropy", "hinge"], [], 30)
        opt_flag(data, argv, "--seed", *SEEDS, p_give=30)
        opt_flag(data, argv, "--backend", ["numpy"], ["cuda"], 10)
        opt_flag(data, argv, "--progress", ["off", "off", "auto", "on"], ["sometimes"], 60)
        save = pick(data, st.sampled_from(["ck.npz", "ck.npz", "ck", "", "old.npz", "old_long.npz"]),
                    ["nodir/ck.npz", ".", "sub", "text.txt"], 25, label="--save")
        if save != "":
            argv += ["--save", str(out / save) if save != "." else str(out)]
        if data.draw(st.integers(0, 99)) < 20:
            argv.append("--force")
        if data.draw(st.integers(0, 99)) < 40:
            good = ["lin_adam", "lin_sgd", "bn_adam", "seq_adam", "epoch_big.npz"]
            argv += ["--resume", ck[pick(data, st.sampled_from(good), sorted(set(ck) - set(good)), 50,
                                         label="--resume")]]
    return argv


def prepare_cli_dir(out, ck):
    """A scratch folder for one CLI call: a user model file, a shorter and a longer checkpoint, a text file."""
    out.mkdir()
    (out / "sub").mkdir()
    (out / "models.py").write_text(USER_MODELS)
    shutil.copy(ck["lin_adam"], out / "old.npz")           # epoch 0: a shorter run, replaced with a note
    shutil.copy(ck["epoch_big.npz"], out / "old_long.npz")  # a longer run: needs --force or --resume
    (out / "text.txt").write_text("not a checkpoint\n")


def check_cli(argv, capsys, out):
    """Run `graphconv ARGV` in-process (cwd = out) and check the promise; returns the exit status."""
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:      # argparse: a usage error
        _, err = capsys.readouterr()
        assert e.code == 2 and "usage:" in err, f"SystemExit({e.code!r}) outside argparse: {err!r}"
        return 2
    stdout, err = capsys.readouterr()
    assert "Traceback" not in err
    assert code in (0, 1, 2), f"exit status {code!r}"
    if code == 1:
        assert argv[0] == "gradcheck" and "FAIL" in stdout
    if code == 2:
        progress_bars = "--progress" in argv and argv[argv.index("--progress") + 1] == "on"
        lines = [ln for ln in err.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("graphconv: error: ")]
        assert len(errors) == 1, f"expected one 'graphconv: error:' line, got stderr {err!r}"
        if not progress_bars:
            assert err.endswith("\n") and err.count("\n") == 1, f"expected exactly one stderr line, got {err!r}"
    if code == 0:
        assert "graphconv: error" not in err
    if argv and argv[0] == "train":
        written = [p for p in out.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                   and before.get(p) != p.read_bytes()]
        assert not [p for p in written if p.name.startswith(".tmp-")], "a temporary checkpoint was left behind"
        for p in written:
            assert_finite_checkpoint(p)
        if code == 0:
            assert written, "train succeeded but wrote no checkpoint"
            assert "--resume" in argv or "--force" in argv or out / "old_long.npz" not in written, \
                "a longer run was replaced without --force"
    return code


@settings(max_examples=200, **FUZZ)
@given(data=st.data())
def test_fuzz_cli(data, cli_files, tmp_path, capsys, monkeypatch):
    d, ck = cli_files
    out = tmp_path / f"ex{len(os.listdir(tmp_path))}"
    prepare_cli_dir(out, ck)
    monkeypatch.chdir(out)     # relative model paths resolve here, and a default MODEL.npz lands here
    argv = draw_argv(data, d, ck, out)
    note(f"graphconv {' '.join(repr(a) if not a or ' ' in a else a for a in argv)}")
    check_cli(argv, capsys, out)


# ---- 4. cases the fuzzing found, pinned so that they run on every CI run ---------------------------
# The fuzz tests above are derandomized with a bounded number of examples, so a given run reaches only
# some corners; these are the corners where a non-GraphConvError escaped at some point.

def _input_named(name):
    g = gc.Graph("g")
    g.relu(g.input(name, ("N", 2)))
    return g.summary()


def _failing_layer_after_input_named(name):
    g = gc.Graph("g")
    return g.apply("conv2d", g.input(name, ("N", 2)))


def _run_graph(build, *arrays, params=False):
    g = gc.Graph("g")
    g.output(build(g))
    outs = gc.compile(g)(*arrays, params=gc.init_params(g) if params else None)
    return outs


def _trainer():
    g = gc.Graph("t")
    g.output(g.linear(g.flatten(g.input("x", ("N", 2, 4, 4))), 3, name="fc"))
    return Trainer(g, Optimizer())


X4, Y4 = np.zeros((4, 2, 4, 4), np.float32), np.zeros(4, np.int64)
API_CASES = {
    "input-name-int": lambda tmp: _input_named(3),
    "input-name-tuple": lambda tmp: _input_named(("a",)),
    "input-name-bytes": lambda tmp: _input_named(b"x"),
    "input-name-list": lambda tmp: _input_named(["a"]),
    "input-name-int-then-failing-layer": lambda tmp: _failing_layer_after_input_named(3),
    "concat-of-a-tensor": lambda tmp: (lambda g: g.concat(g.input("x", ("N", 2))))(gc.Graph("g")),
    "concat-of-none": lambda tmp: gc.Graph("g").concat(None),
    "reshape-symbolic-to-5-run-N=2": lambda tmp: _run_graph(lambda g: g.reshape(g.input("x", ("N",)), 5),
                                                            np.zeros(2, np.float32)),
    "conv-in_channels-vs-symbolic-M": lambda tmp: _run_graph(
        lambda g: g.conv1d(g.input("x", ("N", "M", 2)), 1, 1, in_channels=2), np.zeros((1, 1, 2), np.float32),
        params=True),
    "run-with-a-list-of-inputs": lambda tmp: (lambda g: (g.output(g.input("x", ("N", 2))),
                                                         gc.compile(g).run([np.zeros((1, 2), np.float32)])))(
        gc.Graph("g")),
    "leaky_relu-nan-slope": lambda tmp: _run_graph(lambda g: g.leaky_relu(g.input("x", ("N", 2)), float("nan")),
                                                   -np.ones((1, 2), np.float32)),
    "leaky_relu-minus-inf-slope": lambda tmp: _run_graph(lambda g: g.leaky_relu(g.input("x", ("N", 2)), -INF),
                                                         np.array([[0.0, -1.0]], np.float32)),
    "avg_pool-huge-kernel-ceil_mode": lambda tmp: _run_graph(
        lambda g: g.avg_pool2d(g.input("x", ("N", 3, 3, 5)), 10**12, ceil_mode=True),
        np.zeros((1, 3, 3, 5), np.float32)),
    "batch_norm-eps-underflows-in-float32": lambda tmp: _run_graph(
        lambda g: g.batch_norm1d(g.input("x", ("N", 2, 3)), eps=1e-50), np.ones((2, 2, 3), np.float32), params=True),
    "evaluate-batch-0": lambda tmp: _trainer().evaluate(X4, Y4, batch=0),
    "evaluate-batch-None": lambda tmp: _trainer().evaluate(X4, Y4, batch=None),
    "evaluate-x-None": lambda tmp: _trainer().evaluate(None, Y4),
    "evaluate-y-None": lambda tmp: _trainer().evaluate(X4, None),
    "load-None": lambda tmp: _trainer().load(None),
    "load-int": lambda tmp: _trainer().load(3),
    "save-None": lambda tmp: _trainer().save(None),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_fuzz_found_api_cases(case, tmp_path):
    ok, result = attempt(API_CASES[case], tmp_path)
    if ok:
        outs = result if isinstance(result, tuple) else [result]
        assert all_finite([o for o in outs if isinstance(o, np.ndarray)]), "finite inputs gave a non-finite output"


def test_fuzz_found_checkpoint_with_raw_zip_members(tmp_path):
    """A zip whose members lack the .npy suffix: NpzFile hands back bytes instead of arrays."""
    t = _trainer()
    t.save(tmp_path / "good.npz")
    with zipfile.ZipFile(tmp_path / "raw.npz", "w") as z:
        for k, v in npz_values(tmp_path / "good.npz").items():
            z.writestr(k, v.tobytes())
    attempt(t.load, tmp_path / "raw.npz")


CLI_CASES = {
    "model-file-not-ending-in-py": ["summary", "models.txt:lin"],
    "model-file-binary": ["summary", "old.npz:lin"],
    "gradcheck-huge-batch": ["gradcheck", "models.py:lin", "--batch", "1000000000000"],
    "run-huge-batch": ["run", "models.py:lin", "--batch", "1000000000000"],
    "run-bundled-huge-batch": ["run", "seed_conv", "--batch", "1000000000000"],
    "train-resume-raw-zip": ["train", "models.py:lin", "--epochs", "1", "--progress", "off", "--resume", "raw.npz"],
    "train-lr-huge": ["train", "models.py:lin", "--epochs", "1", "--progress", "off", "--lr", "1e300",
                      "--optimizer", "sgd", "--save", "ck.npz"],
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_fuzz_found_cli_cases(case, cli_files, tmp_path, capsys, monkeypatch):
    d, ck = cli_files
    out = tmp_path / "ex"
    prepare_cli_dir(out, ck)
    (out / "models.txt").write_text(USER_MODELS)
    shutil.copy(ck["raw.npz"], out / "raw.npz")
    monkeypatch.chdir(out)
    check_cli(list(CLI_CASES[case]), capsys, out)
