"""The window, reduction and loss families (pooling and its gathers, fold_batch_norm,
compose_conv_weights, reduce_sum, batch norm, classifier losses): every kernel compiled by NVRTC for sm_90 and run on the host backend
against the NumPy reference, node by node, outputs poisoned with NaN bytes first."""
import re
import shutil

import numpy as np
import pytest

import graphconv as gc
from codegen import nvrtc
from codegen.check import check_kernels
from codegen.program import Program
from codegen.runner import CompiledProgram
from graphconv.data import random_inputs
from graphconv.errors import CompileError
from graphconv.models import MODELS
from graphconv.pipeline import STAGES, build
from graphconv.reference import NumpyProgram

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="the host backend needs g++")
RNG = np.random.default_rng(7)


def compile_all(graph):
    if nvrtc.available():
        for spec in Program(graph).kernels:
            nvrtc.compile_kernel(spec.source, spec.name)      # raises on an error, a warning or a spill


def assert_program_matches(graph, inputs, params=None, rtol=1e-5, atol=1e-6):
    """Every node's value from the compiled program equals the reference's (uint8 codes exactly)."""
    params = gc.init_params(graph, seed=0) if params is None else params
    compiled = CompiledProgram(graph, "host", poison=True)
    got = compiled.run(inputs, params, keep=True)
    want = NumpyProgram(graph).run(inputs, params, keep=True)
    for name, w in want.items():
        if name in compiled.program.inlined:        # computed inside its readers' kernels (a loss's seed)
            continue
        for g_, w_ in zip(got[name] if isinstance(w, tuple) else (got[name],), w if isinstance(w, tuple) else (w,)):
            w_ = np.asarray(w_)
            if w_.dtype == np.uint8 or w_.dtype == np.int64:
                np.testing.assert_array_equal(g_, w_, err_msg=name)
            else:
                np.testing.assert_allclose(g_, w_, rtol=rtol, atol=atol, err_msg=name)
    compile_all(graph)
    return got


def inputs_of(graph, batch, **given):
    out = random_inputs(graph, batch, 0)
    out.update(given)
    return out


# ---- pooling forward -------------------------------------------------------------------------------
POOLS = [
    # mode, nd, spatial, kernel, attrs
    ("max", 1, (9,), 3, {"stride": 2, "padding": 1}),
    ("max", 1, (10,), 3, {"stride": 2, "padding": 1, "dilation": 2, "ceil_mode": True}),
    ("max", 2, (28, 28), 2, {}),
    ("max", 2, (9, 9), 3, {"stride": 2, "padding": 1, "ceil_mode": True}),
    ("max", 2, (9, 9), (3, 2), {"stride": (2, 3), "padding": (1, 1), "dilation": (2, 1), "ceil_mode": True}),
    ("max", 2, (7, 8), 3, {"stride": 1}),                                   # overlapping windows
    ("max", 3, (5, 6, 7), 2, {"stride": 2, "ceil_mode": True}),
    ("avg", 1, (9,), 3, {"stride": 2, "padding": 1, "ceil_mode": True}),
    ("avg", 2, (7, 7), 3, {"stride": 2, "padding": 1}),
    ("avg", 2, (7, 7), 3, {"stride": 2, "padding": 1, "count_include_pad": False}),
    ("avg", 2, (8, 7), 3, {"stride": 2, "padding": 1, "ceil_mode": True}),
    ("avg", 2, (8, 7), 3, {"stride": 2, "padding": 1, "ceil_mode": True, "count_include_pad": False}),
    ("avg", 2, (6, 6), 2, {"divisor_override": 3}),
    ("avg", 2, (8, 8), 8, {}),                                              # global average
    ("avg", 3, (5, 5, 6), (3, 2, 2), {"stride": 2, "padding": (1, 0, 1), "ceil_mode": True}),
    # windows that do not overlap (the backward's one-window path): uncovered edges, padding, gaps, dilation
    ("max", 2, (7, 9), 2, {}),
    ("max", 2, (7, 7), 2, {"padding": 1}),
    ("max", 2, (11, 10), (2, 3), {"stride": (3, 4), "dilation": (2, 1), "ceil_mode": True}),
    ("avg", 2, (7, 9), 2, {"stride": (3, 2), "padding": (1, 0)}),
    ("max", 1, (10,), 1, {"stride": 3}),
    # windows that are whole planes of more than 32 elements (pool_plane.cu.j2: threads share a plane)
    ("max", 2, (7, 7), 7, {}),
    ("avg", 2, (5, 13), (5, 13), {"divisor_override": 7}),
    ("avg", 3, (3, 4, 5), (3, 4, 5), {"ceil_mode": True}),
    ("max", 1, (40,), 40, {"stride": 3}),
]


def pool_graph(mode, nd, spatial, kernel, attrs, channels=3, dtype="float32"):
    g = gc.Graph("pool", dtype)
    x = g.input("x", ("N", channels, *spatial))
    g.output(getattr(g, f"{mode}_pool{nd}d")(x, kernel, name="p", **attrs))
    return g


@needs_gxx
@pytest.mark.parametrize("case", POOLS, ids=lambda c: f"{c[0]}{c[1]}d-{c[2]}-{sorted(c[4])}")
@pytest.mark.parametrize("batch", [1, 3])
def test_pool_forward(case, batch):
    g = pool_graph(*case)
    assert_program_matches(g, inputs_of(g, batch), rtol=1e-6, atol=0)


def pool_backward_graph(mode, nd, spatial, kernel, attrs, dtype="float32"):
    """x -> pool -> backward op of the pool, fed an independent dy."""
    g = gc.Graph("poolb", dtype)
    x = g.input("x", ("N", 3, *spatial))
    y = getattr(g, f"{mode}_pool{nd}d")(x, kernel, name="p", **attrs)
    node = g.node(y.name)
    dy = g.input("dy", tuple(node.shape))
    pool_attrs = dict(node.attrs)
    if mode == "max":
        dx = g.apply(f"max_pool{nd}d_backward", x, dy, name="dx", **pool_attrs)
    else:
        dx = g.apply(f"avg_pool{nd}d_backward", dy, name="dx", input_size=spatial, **pool_attrs)
    g.output(y, dx)
    return g


@needs_gxx
@pytest.mark.parametrize("case", POOLS, ids=lambda c: f"{c[0]}{c[1]}d-{c[2]}-{sorted(c[4])}")
@pytest.mark.parametrize("batch", [1, 3])
def test_pool_backward_gathers(case, batch):
    g = pool_backward_graph(*case)
    assert_program_matches(g, inputs_of(g, batch), rtol=1e-6, atol=1e-7)


@needs_gxx
@pytest.mark.parametrize("case", [POOLS[3], POOLS[5], POOLS[6], POOLS[2], POOLS[16]],
                         ids=["pad-ceil", "overlap", "3d", "disjoint", "disjoint-pad"])
def test_max_pool_backward_routes_ties_to_the_first_maximum(case):
    """Integer-valued inputs: many windows hold several equal maxima; the gradient must go to the
    first in row-major order, exactly as the reference (and PyTorch) route it."""
    g = pool_backward_graph(*case)
    inputs = inputs_of(g, 2)
    inputs["x"] = RNG.integers(0, 3, inputs["x"].shape).astype(np.float32)
    assert_program_matches(g, inputs, rtol=0, atol=0)


@needs_gxx
def test_max_pool_propagates_nan_and_minus_infinity():
    g = pool_backward_graph("max", 2, (6, 6), 3, {"stride": 2, "padding": 1, "ceil_mode": True})
    inputs = inputs_of(g, 2)
    x = inputs["x"]
    x[0, 0, 1, 1] = np.nan
    x[0, 1] = -np.inf
    x[1, 2, :3, :3] = -np.inf
    assert_program_matches(g, inputs)


@needs_gxx
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_window_that_is_the_whole_plane_is_read_by_threads_sharing_the_plane(dtype):
    """Global pools of more than 32 elements take pool_plane.cu.j2 (8 to 32 threads a plane, their
    partial results combined in shared memory); 7 planes leave most of a block's plane slots empty,
    a NaN propagates through the max, a -inf plane stays -inf; a 32-element plane keeps the plain kernel."""
    for mode, spatial, batch in (("max", (6, 9), 7), ("avg", (6, 9), 7), ("max", (4, 8), 2)):
        g = pool_graph(mode, 2, spatial, spatial, {}, channels=1, dtype=dtype)
        names = [spec.name for spec in Program(g).kernels]
        assert [n.endswith("_plane") for n in names] == [spatial != (4, 8)], names
        inputs = inputs_of(g, batch)
        if mode == "max" and batch == 7:
            inputs["x"][2, 0, 3, 5] = np.nan
            inputs["x"][4, 0] = -np.inf
        got = assert_program_matches(g, inputs, rtol=1e-6 if dtype == "float32" else 1e-13, atol=0)
        if mode == "max" and batch == 7:
            assert np.isnan(got["p"][2, 0, 0, 0]) and got["p"][4, 0, 0, 0] == -np.inf
            assert np.isfinite(got["p"][[0, 1, 3, 5, 6], 0, 0, 0]).all()


@needs_gxx
def test_float64_pools():
    g = pool_backward_graph("avg", 2, (7, 7), 3, {"stride": 2, "padding": 1, "count_include_pad": False},
                            dtype="float64")
    assert_program_matches(g, inputs_of(g, 2), rtol=1e-12, atol=1e-14)
    g = pool_backward_graph("max", 3, (5, 6, 7), 2, {"stride": 2, "ceil_mode": True}, dtype="float64")
    assert_program_matches(g, inputs_of(g, 2), rtol=1e-12, atol=1e-14)


# ---- pool_act_backward and fold_batch_norm -----------------------------------------------------------
@needs_gxx
@pytest.mark.parametrize("act,attrs", [("relu", ()), ("sigmoid", ()), ("leaky_relu", (("negative_slope", 0.2),))])
@pytest.mark.parametrize("pool", [{"kernel_size": 2}, {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}])
def test_pool_act_backward_routes_through_saved_codes(act, attrs, pool):
    spatial = (9, 8)
    probe = pool_graph("max", 2, spatial, pool["kernel_size"], {k: v for k, v in pool.items() if k != "kernel_size"})
    pooled = [int(d) for d in probe.node("p").shape[2:]]
    g = gc.Graph("pab")
    dy = g.input("dy", ("N", 4, *pooled))
    codes = g.input("codes", ("N", 4, *pooled), dtype="uint8")
    aux = g.input("aux", ("N", 4, *pooled))
    g.output(g.apply("pool_act_backward", dy, codes, aux, name="dz", act=(act, attrs),
                     pool=("max_pool2d", tuple(sorted(pool.items()))), input_size=spatial))
    window = (pool["kernel_size"]) ** 2
    inputs = inputs_of(g, 3, codes=RNG.integers(0, window, (3, 4, *pooled)).astype(np.uint8))
    assert_program_matches(g, inputs)


@needs_gxx
@pytest.mark.parametrize("conv_bias,affine", [(True, True), (False, True), (True, False), (False, False)])
def test_fold_batch_norm(conv_bias, affine):
    g = gc.Graph("fold")
    ops = [g.input("w", (6, 3, 3, 3))]
    if conv_bias:
        ops.append(g.input("b", (6,)))
    ops += [g.input("mean", (6,)), g.input("var", (6,))]
    if affine:
        ops += [g.input("gamma", (6,)), g.input("beta", (6,))]
    g.output(g.apply("fold_batch_norm", *ops, name="fold", eps=1e-3, conv_bias=conv_bias, affine=affine))
    inputs = {n.name: RNG.standard_normal([int(d) for d in n.shape]).astype(np.float32) for n in g.inputs}
    inputs["var"] = RNG.uniform(0.5, 2.0, 6).astype(np.float32)
    assert_program_matches(g, inputs, rtol=1e-6, atol=1e-7)


COMPOSE_CASES = [   # conv1, conv2 (in_channels 3 -> 5 -> 4), spatial size, dtype
    ((2, 3, {"padding": 1}), (3, {}), (10, 9), "float32"),
    ((2, 3, {"stride": 2, "dilation": 2, "bias": False, "padding": 2, "padding_mode": "reflect"}),
     (2, {"dilation": 2}), (12, 12), "float32"),
    ((1, 5, {"stride": 2}), (3, {"stride": 2, "bias": False}), (20,), "float64"),
    ((3, 2, {}), ((2, 1, 2), {"dilation": (1, 2, 1)}), (6, 6, 5), "float32"),
]


@needs_gxx
@pytest.mark.parametrize("first,second,spatial,dtype", COMPOSE_CASES)
def test_collapsed_convolutions_compose_their_weights_in_a_kernel(first, second, spatial, dtype):
    """--collapse-convs: conv2(conv1(x)) as one convolution whose kernel compose_conv_weights computes
    on the device; every node (the composed weight and bias included) against the reference."""
    nd, k1, a1 = first
    k2, a2 = second
    g = gc.Graph("stacked", dtype)
    x = g.input("x", ("N", 3, *spatial))
    h = getattr(g, f"conv{nd}d")(x, 5, k1, name="c1", **a1)
    g.output(g.relu(getattr(g, f"conv{nd}d")(h, 4, k2, name="c2", **a2)))
    collapsed = build(g, "fused", collapse=True)
    assert [n.op for n in collapsed.topo() if n.role == "op"][:1] == ["compose_conv_weights"]
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == "float32" else {"rtol": 1e-10, "atol": 1e-12}
    assert_program_matches(collapsed, inputs_of(collapsed, 2), **tol)


# ---- reduce_sum -------------------------------------------------------------------------------------
REDUCE_CASES = [
    (("N", 5, 7, 7), (0, 2, 3)),       # a conv bias gradient: B > 1, threads along space
    (("N", 5, 40, 40), (0, 2, 3)),     # several chunks per channel
    (("N", 300), (0,)),                # a linear bias gradient: B == 1, threads along features
    (("N", 4, 3), (0, 1, 2)),          # to a scalar
    (("N", 6), (1,)),                  # keeps the batch axis
    (("N", 3, 5, 5), (2, 3)),          # keeps [N, C]
    (("N", 2, 3, 4, 5), (0, 2, 3, 4)),
]


@needs_gxx
@pytest.mark.parametrize("shape,axes", REDUCE_CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("batch", [1, 3, 130])
def test_reduce_sum(shape, axes, batch):
    if batch == 130 and np.prod([d for d in shape if d != "N"]) > 1000:
        batch = 7
    g = gc.Graph("r")
    x = g.input("x", shape)
    g.output(g.apply("reduce_sum", x, axes=axes, name="s"))
    assert_program_matches(g, inputs_of(g, batch), rtol=1e-5, atol=1e-4)


def test_reduce_sum_refuses_a_non_contiguous_kept_set():
    g = gc.Graph("r")
    x = g.input("x", ("N", 3, 4))
    g.output(g.apply("reduce_sum", x, axes=(1,), name="s"))
    with pytest.raises(CompileError, match="not contiguous"):
        Program(g)


# ---- batch norm -------------------------------------------------------------------------------------------
BN_SHAPES = [("N", 4, 5, 5), ("N", 7), ("N", 3, 40, 40), ("N", 2, 3, 4, 5)]


def bn_graph(shape, training, affine, dtype="float32"):
    """batch_norm, its input and weight gradients and running-statistics updates, fed independent dy."""
    g = gc.Graph("bn", dtype)
    x = g.input("x", shape)
    stats = [g.param("bn.running_mean", (shape[1],), ("uniform", 0.5), trainable=False),
             g.param("bn.running_var", (shape[1],), ("constant", 1.5), trainable=False)]
    wb = [g.param("bn.weight", (shape[1],), ("uniform", 2.0)), g.param("bn.bias", (shape[1],), ("uniform", 1.0))]
    y = g.apply("batch_norm", x, *stats, *(wb if affine else []), name="y", eps=1e-3, training=training)
    dy = g.input("dy", shape)
    flags = {"eps": 1e-3, "training": training}
    dx = g.apply("batch_norm_grad_input", x, *stats, dy, *(wb[:1] if affine else []), name="dx", **flags)
    dw = g.apply("batch_norm_grad_weight", x, *stats, dy, name="dw", **flags)
    outs = [y, dx, dw]
    if training:
        outs += [g.apply("batch_norm_update_stats", x, stats[0], name="new_mean", momentum=0.1, stat="mean"),
                 g.apply("batch_norm_update_stats", x, stats[1], name="new_var", momentum=0.3, stat="var")]
    g.output(*outs)
    return g


@needs_gxx
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_batch_norm_and_its_gradients(shape, training, affine):
    g = bn_graph(shape, training, affine)
    for batch in (3, 70) if len(shape) == 2 else (1 if len(shape) > 2 else 2, 3):
        inputs = inputs_of(g, batch)
        inputs["x"] = (inputs["x"] * 2 + 5).astype(np.float32)     # a mean far from 0: cancellation matters
        assert_program_matches(g, inputs, rtol=2e-4, atol=2e-4)


@needs_gxx
@pytest.mark.parametrize("weight_first", [False, True], ids=["input-first", "weight-first"])
def test_batch_norm_gradients_of_weight_and_bias_come_from_the_input_gradients_sums(weight_first):
    """Training: batch_norm_grad_input's one pass over x and dy already sums dy and dy * x, so its
    kernels also write the weight's gradient and the bias's (reduce_sum of dy over all but the
    channels) when those nodes come after it; they then launch nothing of their own. One that comes
    first keeps its kernels. Either way every value matches NumPy with poisoned outputs."""
    shape = ("N", 3, 6, 5)
    g = gc.Graph("bn_sums", "float32")
    x, dy = g.input("x", shape), g.input("dy", shape)
    stats = [g.param("bn.running_mean", (3,), ("uniform", 0.5), trainable=False),
             g.param("bn.running_var", (3,), ("constant", 1.5), trainable=False)]
    weight = g.param("bn.weight", (3,), ("uniform", 2.0))
    flags = {"eps": 1e-3, "training": True}
    dw = g.apply("batch_norm_grad_weight", x, *stats, dy, name="dw", **flags) if weight_first else None
    dx = g.apply("batch_norm_grad_input", x, *stats, dy, weight, name="dx", **flags)
    dw = dw or g.apply("batch_norm_grad_weight", x, *stats, dy, name="dw", **flags)
    db = g.apply("reduce_sum", dy, name="db", axes=(0, 2, 3))
    g.output(dx, dw, db)
    program = Program(g)
    by_node = {}
    for launch in program.launches:
        by_node.setdefault(launch.node, []).append(launch)
    assert "db" not in by_node and all(l.members == ("dx",) + (() if weight_first else ("dw",)) + ("db",)
                                        for l in by_node["dx"])
    assert ("dw" in by_node) == weight_first
    inputs = inputs_of(g, 4)
    inputs["x"] = (inputs["x"] * 2 + 5).astype(np.float32)
    assert_program_matches(g, inputs, rtol=2e-4, atol=2e-4)
    results = check_kernels(g, inputs, gc.init_params(g, seed=0))
    checked = {n for r in results for n in r.node.split(", ")}
    assert {"dx", "dw", "db"} <= checked
    assert all(r.ok for r in results), [(r.node, r.note) for r in results if not r.ok]


@needs_gxx
@pytest.mark.parametrize("update_first", [False, True], ids=["batch-norm-first", "update-first"])
def test_the_running_statistics_come_from_the_batch_norms_sums(update_first):
    """Training: the batch norm's statistics pass already sums x and x * x per channel, so its finish
    kernel also writes the running mean's and variance's next values (each with its own momentum, the
    variance unbiased) when those batch_norm_update_stats nodes come after it: they launch nothing of
    their own and x is read once, not three times. An update that comes first keeps its kernels.
    Either way every value matches NumPy with poisoned outputs, and the bits equal the update's own
    kernels' (the same double expression)."""
    shape = ("N", 3, 6, 5)

    def graph(fused):
        g = gc.Graph("bn_running", "float32")
        x = g.input("x", shape)
        stats = [g.param("bn.running_mean", (3,), ("uniform", 0.5), trainable=False),
                 g.param("bn.running_var", (3,), ("constant", 1.5), trainable=False)]
        wb = [g.param("bn.weight", (3,), ("uniform", 2.0)), g.param("bn.bias", (3,), ("uniform", 1.0))]

        def updates():
            return [g.apply("batch_norm_update_stats", x, stats[0], name="new_mean", momentum=0.1, stat="mean"),
                    g.apply("batch_norm_update_stats", x, stats[1], name="new_var", momentum=0.3, stat="var")]
        first = updates() if not fused else []
        y = g.apply("batch_norm", x, *stats, *wb, name="y", eps=1e-3, training=True)
        g.output(y, *(first or updates()))
        return g

    g = graph(fused=not update_first)
    program = Program(g)
    nodes = {l.node for l in program.launches}
    assert ("new_mean" in nodes and "new_var" in nodes) == update_first
    reads_of_x = sum(1 for l in program.launches for a in l.spec.args if a.value == "x")
    assert reads_of_x == (4 if update_first else 2)       # partial sums (each update its own), the apply
    inputs = inputs_of(g, 4)
    inputs["x"] = (inputs["x"] * 2 + 5).astype(np.float32)
    got = assert_program_matches(g, inputs, rtol=2e-4, atol=2e-4)
    if not update_first:
        separate = CompiledProgram(graph(fused=False), "host", poison=True).run(inputs, gc.init_params(g, seed=0))
        for name in ("new_mean", "new_var"):
            np.testing.assert_array_equal(got[name], separate[name], err_msg=name)
        assert [l.members for l in program.launches if l.node == "y"][0] == ("y", "new_mean", "new_var")
    results = check_kernels(g, inputs, gc.init_params(g, seed=0))
    assert {"y", "new_mean", "new_var"} <= {n for r in results for n in r.node.split(", ")}
    assert all(r.ok for r in results), [(r.node, r.note) for r in results if not r.ok]


@needs_gxx
def test_a_running_statistic_of_another_buffer_keeps_its_own_kernels():
    """Only updates of the batch norm's own running buffers come from its sums: an update of a buffer
    computed after the batch norm (here a relu of an input) would be read before it is written."""
    g = gc.Graph("bn_late", "float32")
    x = g.input("x", ("N", 3, 4, 4))
    y = g.batch_norm2d(x, name="bn1")
    u = g.apply("batch_norm_update_stats", x, g.relu(g.input("r", (3,)), name="r1"), name="u", momentum=0.1,
                stat="mean")
    g.output(y, u)
    assert "u" in {l.node for l in Program(g).launches}
    inputs = inputs_of(g, 2, r=np.float32([1, 2, 3]))
    assert_program_matches(g, inputs, rtol=2e-4, atol=2e-4)


@needs_gxx
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_batch_norm_and_the_activation_after_it_are_one_kernel(act):
    """Training: the batch norm's apply kernel also computes the activation that reads it (the
    normalized value handed on in a register, both stored: the backward pass reads both), so the
    activation launches nothing; a second reader of the batch norm's result keeps reading it. Every
    value of the training step matches NumPy with poisoned outputs."""
    g = gc.Graph("bn_act", "float32")
    h = g.conv2d(g.input("x", ("N", 3, 6, 6)), 4, 3, padding=1, name="c")
    b = g.batch_norm2d(h, name="bn")
    a = g.relu(b, name="act") if act == "relu" else g.leaky_relu(b, 0.2, name="act")
    y = g.add(g.max_pool2d(a, 2, name="p"), g.max_pool2d(b, 2, name="q"), name="both")
    g.output(g.linear(g.flatten(y), 5, name="fc"))
    graph = build(g, "fused-train")
    program = Program(graph)
    assert "act" not in {l.node for l in program.launches}
    assert any(l.members[:2] == ("bn", "act") for l in program.launches)
    results = check_kernels(graph, random_inputs(graph, 3, 0), gc.init_params(graph, seed=0))
    assert {"bn", "act"} <= {n for r in results for n in r.node.split(", ")}
    assert all(r.ok for r in results), [(r.node, r.note) for r in results if not r.ok]


@needs_gxx
def test_batch_norm_of_values_whose_squares_pass_float32s_range():
    """Inputs near 1e19: the deviations' squares overflow float32, the variance (1e38) does not. The
    reference adds the squares in float64 then (it gave 0 for every output, the kernels the right
    values: found by review); both equal the float64 computation."""
    g = gc.Graph("bnbig")
    g.output(g.batch_norm2d(g.input("x", ("N", 2, 3, 3)), affine=False, name="bn"))
    x = (np.random.default_rng(0).standard_normal((2, 2, 3, 3)) * 1e19).astype(np.float32)
    g64 = gc.cast(g, "float64")
    exact = np.asarray(gc.compile(g64)(x.astype(np.float64), params=gc.init_params(g64)))
    params = gc.init_params(g)
    for backend in ("numpy", "host"):
        got = np.asarray(gc.compile(g, backend=backend)(x, params=params))
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-6, err_msg=backend)


@needs_gxx
def test_batch_norm_float64():
    g = bn_graph(("N", 4, 5, 5), True, True, dtype="float64")
    assert_program_matches(g, inputs_of(g, 3), rtol=1e-10, atol=1e-10)


# ---- losses ----------------------------------------------------------------------------------------------
def loss_graph(loss, classes, dtype="float32", **attrs):
    g = gc.Graph("loss", dtype)
    s = g.input("s", ("N", classes))
    y = g.input("y", ("N",), dtype="int64")
    dl = g.input("dl", ())
    g.output(g.apply(loss, s, y, name="L", **attrs), g.apply(f"{loss}_grad", s, y, dl, name="dS", **attrs))
    return g


@needs_gxx
@pytest.mark.parametrize("loss,attrs", [("softmax_cross_entropy", {}), ("hinge_loss", {}),
                                        ("hinge_loss", {"margin": 0.5})])
@pytest.mark.parametrize("batch", [1, 3, 300])
def test_classifier_losses(loss, attrs, batch):
    g = loss_graph(loss, 10, **attrs)
    inputs = inputs_of(g, batch, dl=np.array(0.7, np.float32))
    inputs["s"] *= 4
    assert_program_matches(g, inputs, rtol=1e-5, atol=1e-6)


@needs_gxx
@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "hinge_loss"])
@pytest.mark.parametrize("value, shared", [(1.0, False), (-2.5, False), (1.0, True)])
def test_a_constant_seed_of_a_loss_gradient_is_a_literal_not_a_launch(loss, value, shared):
    """The training step's dloss = 1 (any finite scalar constant every reader of which is a loss
    gradient) is printed into the gradient kernel: no fill launch, the same values; a constant that
    something else reads too keeps its kernel."""
    g = gc.Graph("seeded")
    s, y = g.input("s", ("N", 6)), g.input("y", ("N",), dtype="int64")
    dl = g.apply("constant", name="dl", shape=(), dtype="float32", value=value)
    outs = [g.apply(f"{loss}_grad", s, y, dl, name="dS")]
    if shared:
        outs.append(g.add(dl, dl, name="twice"))
    g.output(*outs)
    program = Program(g)
    assert ("dl" in program.inlined) == (not shared)
    assert len(program.launches) == (3 if shared else 1)
    source = next(l.spec.source for l in program.launches if l.node == "dS")
    assert (f"{value!r}f / (float)rows" in source) == (not shared) and ("grad_output" in source) == shared
    assert_program_matches(g, inputs_of(g, 5, y=np.array([0, 5, 2, 3, 1])))


@needs_gxx
@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "hinge_loss"])
def test_a_target_out_of_range_gives_nan_rows(loss, monkeypatch):
    """run() refuses a class index past the scores, as the numpy backend does; the kernels themselves,
    reached past that check, give NaN rows for it rather than reading outside the scores."""
    import codegen.runner
    g = loss_graph(loss, 5)
    inputs = inputs_of(g, 3, dl=np.array(1, np.float32), y=np.array([0, 7, 2]))
    with pytest.raises(gc.InputError, match="target holds class 7, outside 0..4"):
        CompiledProgram(g, "host").run(inputs, {}, keep=True)
    monkeypatch.setattr(codegen.runner, "check_input_values", lambda graph, values, checks=None: None)
    got = CompiledProgram(g, "host").run(inputs, {}, keep=True)
    assert np.isnan(got["L"]) and np.isnan(got["dS"][1]).all() and not np.isnan(got["dS"][[0, 2]]).any()


# ---- every bundled model and stage -----------------------------------------------------------------------
FAMILY_OPS = ("pool", "reduce_sum", "batch_norm", "softmax_cross_entropy", "hinge_loss")


@needs_gxx
@pytest.mark.parametrize("name", [m for m in MODELS])
@pytest.mark.parametrize("stage", STAGES)
def test_bundled_models_family_kernels_match(name, stage):
    if name == "seed_conv" and stage not in ("forward", "fused"):
        pytest.skip("seed_conv has no class scores to train on")
    graph = build(MODELS[name](), stage)
    program = Program(graph)                            # every node lowers
    results = check_kernels(graph, random_inputs(graph, 2, 0), gc.init_params(graph, seed=0))
    ours = [r for r in results if any(op in r.op for op in FAMILY_OPS)]
    bad = [r for r in ours if not r.ok]
    assert not bad, "\n".join(f"{r.node} [{r.op}] {r.kernels}: abs {r.max_abs:.3g} rel {r.max_rel:.3g} {r.note}"
                              for r in bad)
    if nvrtc.available():
        for launch in program.launches:
            if any(op in graph.node(launch.node).op for op in FAMILY_OPS):
                nvrtc.compile_kernel(launch.spec.source, launch.spec.name)


@needs_gxx
def test_reductions_are_bitwise_deterministic():
    """Two-pass sums in a fixed order: the same inputs give the same bits, run after run."""
    g = bn_graph(("N", 3, 40, 40), True, True)
    compiled = CompiledProgram(g, "host", poison=True)
    inputs = inputs_of(g, 5)
    params = gc.init_params(g, seed=0)
    first = compiled.run(inputs, params)
    for _ in range(3):
        again = compiled.run(inputs, params)
        for key in first:
            assert first[key].tobytes() == again[key].tobytes(), key


@needs_gxx
def test_the_last_block_to_arrive_finishes_a_reduction_with_the_two_kernel_bits(monkeypatch):
    """A reduction's chunks are added by the last of each k's blocks (or threads) to arrive, in one
    kernel: the same bits as a finish kernel of its own, whichever block arrives last (blocks in both
    orders), at batch sizes with one chunk and with many (the counters are left zero for the next
    launch, so sizes can alternate on one program), in a captured step replayed too."""
    from codegen import host
    from codegen.lowering import reduce
    g = gc.Graph("sums", "float32")
    x = g.input("x", ("N", 3, 20, 20))
    h = g.batch_norm2d(g.relu(g.conv2d(x, 4, 3, padding=1, name="c")), name="bn")
    g.output(g.linear(g.flatten(g.max_pool2d(h, 2)), 5, name="fc"))
    graph = build(g, "fused-train")
    params = gc.init_params(graph, seed=0)
    monkeypatch.setattr(reduce, "LAST_BLOCK_FINISHES", False)
    two = CompiledProgram(graph, "host")
    monkeypatch.setattr(reduce, "LAST_BLOCK_FINISHES", True)
    one = CompiledProgram(graph, "host", poison=True)
    assert len(one.program.launches) < len(two.program.launches)
    counters = one.program.zeroed
    assert counters and all(one.program.values[k].dtype == "uint32" for k in counters)
    for batch in (130, 2, 67, 130):
        inputs = inputs_of(graph, batch)
        want = two.run(inputs, params)
        for schedule in ("forward", "reverse"):
            with host.schedule(schedule):
                got = one.run(inputs, params)
            for key in want:
                assert got[key].tobytes() == want[key].tobytes(), (batch, schedule, key)
        plan, buffers = one._buffers(batch, False)
        assert all(not buffers[plan.slot[k]].any() for k in counters)       # zero again
        assert len({plan.slot[k] for k in counters}) == len(counters)
        assert not {plan.slot[k] for k in counters} & {b for k, b in plan.slot.items() if k not in counters}
    step = one.bind(67)
    inputs = inputs_of(graph, 67)
    for _ in range(2):
        got = step.run(inputs, params)
        want = two.run(inputs, params)
        assert all(got[key].tobytes() == want[key].tobytes() for key in want)


def reduction_graphs():
    """Every form of the one-kernel reductions: means over leading, trailing and all axes (channel and
    column kernels), a batch norm over [N, F] (the column kernel with batch norm's finish), a float64
    hinge loss's mean."""
    g = gc.Graph("means", "float32")
    x = g.input("x", ("N", 3, 5, 7))
    g.output(g.mean(x, dim=(0, 2, 3), name="m023"), g.mean(x, dim=0, name="m0"), g.mean(x, dim=(2, 3), name="m23"),
             g.mean(x, name="mall"))
    yield build(g, "forward")
    g = gc.Graph("bn1", "float32")
    h = g.batch_norm1d(g.linear(g.input("x", ("N", 300)), 300, name="fc0"), name="bn")
    g.output(g.linear(g.relu(h), 7, name="fc"))
    yield build(g, "fused-train")
    g = gc.Graph("hinge", "float64")
    g.output(g.hinge_loss(g.linear(g.input("x", ("N", 40)), 9, name="fc"), g.input("y", ("N",), "int64"), name="loss"))
    yield build(g, "train")


@needs_gxx
@pytest.mark.parametrize("graph", list(reduction_graphs()), ids=lambda g: g.name)
def test_every_form_of_the_one_kernel_reductions_gives_the_two_kernel_bits(graph, monkeypatch):
    from codegen import host
    from codegen.lowering import reduce
    params = gc.init_params(graph, seed=0)
    monkeypatch.setattr(reduce, "LAST_BLOCK_FINISHES", False)
    two = CompiledProgram(graph, "host")
    monkeypatch.setattr(reduce, "LAST_BLOCK_FINISHES", True)
    one = CompiledProgram(graph, "host", poison=True)
    assert one.program.zeroed and len(one.program.launches) < len(two.program.launches)
    for batch in (2, 300, 65):
        inputs = inputs_of(graph, batch)
        if "y" in inputs:
            classes = 9 if graph.name.startswith("hinge") else 7
            inputs["y"] = np.random.default_rng(batch).integers(0, classes, batch)
        want = two.run(inputs, params, keep=True)
        with host.schedule("reverse"):
            got = one.run(inputs, params, keep=True)     # poisoned: checks the counters are 0 after
        for key, value in got.items():
            assert np.asarray(value).tobytes() == np.asarray(want[key]).tobytes(), (batch, key)


@needs_gxx
def test_a_counter_left_set_is_a_loud_error_when_checking():
    """A counter that is not 0 at launch would have a reduction finish early, on stale partial sums,
    on every launch after: a checking run (poisoned outputs) says so by name instead."""
    graph = next(reduction_graphs())
    compiled = CompiledProgram(graph, "host", poison=True)
    inputs = inputs_of(graph, 64)
    compiled.run(inputs, {})
    plan, buffers = compiled._buffers(64, False)
    key = compiled.program.zeroed[0]
    original = compiled.program.zero_counters
    compiled.program.zero_counters = lambda plan, buffers: (original(plan, buffers),
                                                            buffers[plan.slot[key]].view(np.uint32).__setitem__(0, 1))
    with pytest.raises(gc.GraphConvError, match=f"arrival counters left non-zero after the launches \\({key} = "):
        compiled.run(inputs, {})


@pytest.mark.parametrize("stage", ["forward", "train", "fused", "fused-train"])
def test_mul_full_per_channel_and_scalar_kernels_match(stage):
    """mul of two activations, by a learned per-channel scale and by a learned scalar: its kernels and
    its gradients' (with the reductions over broadcast axes), each against its node's NumPy reference."""
    g = gc.Graph("gate", "float32")
    h = g.conv2d(g.input("x", ("N", 3, 6, 6)), 4, 3, padding=1, name="c")
    y = g.mul(g.mul(g.sigmoid(h, name="sg"), h, name="gated"), g.param("scale", (4,), ("uniform", 1.0)), name="scaled")
    g.output(g.linear(g.flatten(g.mul(y, g.param("k", (), ("constant", 0.5)), name="k_scaled")), 10, name="fc"))
    graph = build(g, stage)
    compile_all(graph)
    results = check_kernels(graph, random_inputs(graph, 3, 0), gc.init_params(graph, seed=0))
    assert all(r.ok for r in results), [(r.node, r.max_rel, r.note) for r in results if not r.ok]
    present = {n.name for n in graph.topo()} | {r[0] for n in graph.topo() for r in n.replaces}
    assert {"gated", "scaled", "k_scaled"} <= present          # computed, alone or inside a fused node


@pytest.mark.parametrize("unroll", [1, 3, 4])
def test_pointwise_kernels_over_several_passes_and_a_partial_last_one(monkeypatch, unroll):
    """The pointwise loop takes `UNROLL` elements per thread per pass, their loads first: with the grid
    capped at one block, 9 images of 4 x 6 x 6 (1296 elements) take several passes, the last one partial,
    for full-size, per-channel and scalar operands and for Adam's three-result kernel; outputs poisoned."""
    from codegen.lowering import pointwise
    monkeypatch.setattr(pointwise, "MAX_BLOCKS", 1)
    monkeypatch.setattr(pointwise, "UNROLL", unroll)
    g = gc.Graph("passes", "float32")
    h = g.conv2d(g.input("x", ("N", 3, 6, 6)), 4, 3, padding=1, name="c")
    y = g.mul(g.relu(h, name="r"), g.param("scale", (4,), ("uniform", 1.0)), name="scaled")
    g.output(g.linear(g.flatten(g.mul(y, g.param("k", (), ("constant", 0.5)), name="k_scaled")), 10, name="fc"))
    graph = build(g, "fused-train")
    sources = {s.name: s.source for s in Program(graph).kernels if s.template == "pointwise.cu.j2"}
    assert all(f"for (int u = 0; u < {unroll}; ++u)" in src for src in sources.values())
    assert any("% 4]" in src for src in sources.values())                         # a per-channel operand
    adam = next(src for name, src in sources.items() if name.startswith("adam_moment1_adam_moment2_adam_param"))
    blocks = re.findall(r"blocks = (\d+);", adam)                 # one launch for several tensors, one block each
    assert "const float v4 = a4[0];" in adam and len(blocks) >= 2 and set(blocks) == {"1"}
    compile_all(graph)
    results = check_kernels(graph, random_inputs(graph, 9, 0), gc.init_params(graph, seed=0))
    assert all(r.ok for r in results), [(r.node, r.max_rel, r.note) for r in results if not r.ok]


@pytest.mark.parametrize("stage", ["forward", "train", "fused", "fused-train"])
def test_softmax_kernels_per_thread_and_per_block_rows(stage):
    """softmax over the channels of a map (rows 16 apart, one thread each), log_softmax over 100 classes
    (one block per row, shared-memory tree), softmax over 10 (one thread per contiguous row), and
    their gradients, each against its node's NumPy reference with outputs poisoned."""
    g = gc.Graph("sm", "float32")
    x = g.input("x", ("N", 3, 4, 4))
    attn = g.softmax(g.conv2d(x, 4, 3, padding=1, name="c"), dim=1, name="attn")
    h = g.linear(g.flatten(g.mul(attn, g.relu(g.conv2d(x, 4, 3, padding=1, name="c2")))), 100, name="fc")
    g.output(g.linear(g.softmax(g.log_softmax(h, name="lsm"), name="sm10"), 10, name="fc2"))
    graph = build(g, stage)
    program = Program(graph)
    modes = {s.name: s.params["per_block"] for s in program.kernels if s.template == "softmax.cu.j2"}
    assert True in modes.values() and False in modes.values(), modes
    compile_all(graph)
    results = check_kernels(graph, random_inputs(graph, 5, 0), gc.init_params(graph, seed=0))
    assert all(r.ok for r in results), [(r.node, r.max_rel, r.note) for r in results if not r.ok]
    ops = {r.op for r in results}
    assert {"softmax", "log_softmax"} <= ops
    if "train" in stage:
        assert {"softmax_grad", "log_softmax_grad"} <= ops


def test_softmax_over_the_batch_axis_is_refused_by_the_kernel_backends():
    g = gc.Graph("sm", "float32")
    g.output(g.softmax(g.input("x", ("N", 7)), dim=0, name="p"))
    with pytest.raises(CompileError, match=r"p \[softmax\]: softmax along dim 0 of \[N, 7\]: .*backend='numpy'"):
        gc.compile(g, backend="host")
    out = gc.compile(g).run({"x": np.zeros((3, 7), np.float32)}, {})
    np.testing.assert_allclose(out["p"], 1 / 3)


@pytest.mark.parametrize("stage", ["forward", "train", "fused", "fused-train"])
def test_mean_and_mse_loss_kernels_every_stage(stage):
    """mean over the spatial axes (kept [N, C]), over the batch (kept [C, H, W]) and over everything,
    mse_loss as the graph's own scalar loss (training keeps it: no classifier loss added), and their
    gradients, each against its node's NumPy reference."""
    g = gc.Graph("reg", "float32")
    x = g.input("x", ("N", 3, 6, 6))
    t = g.input("t", ("N", 4))
    h = g.relu(g.conv2d(x, 4, 3, padding=1, name="c"))
    bmean = g.mean(h, dim=0, keepdim=True, name="bmean")
    y = g.linear(g.mean(h, dim=(2, 3), name="gap"), 4, name="fc") - g.mean(bmean, name="all")
    g.output(g.mse_loss(y, t, name="loss"))
    graph = build(g, stage)
    if "train" in stage:
        assert graph.outputs[0] == "loss" and "y" not in graph      # the user's loss, no class input added
    compile_all(graph)
    results = check_kernels(graph, random_inputs(graph, 3, 0), gc.init_params(graph, seed=0))
    assert all(r.ok for r in results), [(r.node, r.max_rel, r.note) for r in results if not r.ok]
    assert {"mean"} <= {r.op for r in results}
    if "train" in stage:
        assert "mean_grad" in {r.op for r in results}


@pytest.mark.parametrize("stage", ["train", "fused-train"])
@pytest.mark.parametrize("nd, kw", [
    (2, dict(size=(7, 9), mode="bilinear")), (2, dict(scale_factor=2)), (2, dict(size=(3, 3), mode="bilinear", align_corners=True)),
    (1, dict(scale_factor=3, mode="linear")), (3, dict(size=(5, 5, 3), mode="trilinear")), (3, dict(scale_factor=(1, 2, 3)))])
def test_upsample_kernels_forward_and_backward(stage, nd, kw):
    g = gc.Graph("u", "float32")
    x = g.input("x", ("N", 2, *[5, 4, 3][:nd]))
    conv = getattr(g, f"conv{nd}d")
    y = g.upsample(g.relu(conv(x, 3, 3, padding=1, name="c")), name="up", **kw)
    g.output(g.linear(g.flatten(y), 5, name="fc"))
    graph = build(g, stage)
    compile_all(graph)
    results = check_kernels(graph, random_inputs(graph, 3, 0), gc.init_params(graph, seed=0))
    assert all(r.ok for r in results), [(r.node, r.max_rel, r.note) for r in results if not r.ok]
    assert {"upsample", "upsample_backward"} <= {r.op for r in results}


@pytest.mark.parametrize("stage", ["forward", "train", "fused-train"])
@pytest.mark.parametrize("nd, kw, direct", [
    (2, dict(stride=2, padding=1, output_padding=1), False), (2, dict(stride=1, padding=1), True),
    (1, dict(stride=3, dilation=2, groups=2, output_padding=2), False),
    (3, dict(stride=(1, 2, 1), padding=(1, 0, 0), output_padding=(0, 1, 0), bias=False), False)])
def test_conv_transpose_kernels(stage, nd, kw, direct):
    """The transposed conv runs as its conv's backward-data kernel (direct at stride 1, the GEMM
    otherwise) with the bias in the store; its gradients are conv kernels."""
    g = gc.Graph("d", "float32")
    x = g.input("x", ("N", 4, *[5, 4, 3][:nd]))
    h = g.relu(getattr(g, f"conv{nd}d")(x, 4, 3, padding=1, name="c"))
    y = getattr(g, f"conv_transpose{nd}d")(h, 6, 3, name="up", **kw)
    g.output(g.linear(g.flatten(g.relu(y)), 5, name="fc"))
    graph = build(g, stage)
    compile_all(graph)
    results = check_kernels(graph, random_inputs(graph, 3, 0), gc.init_params(graph, seed=0))
    assert all(r.ok for r in results), [(r.node, r.max_rel, r.note) for r in results if not r.ok]
    up = [r for r in results if r.node == "up"][0]
    assert up.kernels[0].startswith(f"conv_transpose{nd}d_direct" if direct else f"conv_transpose{nd}d_f32")
    if "train" in stage:
        assert {"up.weight", "up.weight.next"} & {k for r in results for k in r.node.split(", ")}


@pytest.mark.parametrize("stage", ["forward", "train", "fused", "fused-train"])
def test_dropout_kernels_draw_the_references_mask_bit_for_bit(stage):
    """Training-mode dropout (forward and its gradient) draws exactly the NumPy reference's mask at a
    given step; the training step increments the counter; eval (the fused inference stage) is a view."""
    from graphconv.ops.dropout import STEP_BUFFER
    g = gc.Graph("dr", "float32")
    x = g.input("x", ("N", 3, 6, 6))
    h = g.dropout(g.relu(g.conv2d(x, 4, 3, padding=1, name="c")), p=0.3, name="drop1")
    h = g.dropout(g.relu(g.linear(g.flatten(h), 50, name="fc1")), p=0.5, name="drop2")
    g.output(g.linear(h, 10, name="fc2"))
    graph = build(g, stage)
    params = gc.init_params(graph, seed=0)
    params[STEP_BUFFER] = np.array(7.0, np.float32)
    compile_all(graph)
    results = check_kernels(graph, random_inputs(graph, 3, 0), params)
    assert all(r.ok and r.max_abs == 0 for r in results if r.op == "dropout"), \
        [(r.node, r.max_abs) for r in results if r.op == "dropout"]
    assert all(r.ok for r in results), [(r.node, r.max_rel, r.note) for r in results if not r.ok]
    launched = {r.node for r in results if r.op == "dropout"}
    if stage == "fused":
        assert not launched                                 # eval mode: no kernel, a view of the input
    else:
        assert {"drop1", "drop2"} <= launched
    if "train" in stage:
        assert graph.meta["updates"][STEP_BUFFER] == f"{STEP_BUFFER}.next"


@pytest.mark.parametrize("stage", ["forward", "train", "fused-train"])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("nd, spatial, out", [(1, (10,), (3,)), (2, (7, 5), (3, 2)), (3, (5, 4, 3), (2, 3, 2))])
def test_adaptive_pool_kernels_uneven_windows(stage, mode, nd, spatial, out):
    g = gc.Graph("a", "float32")
    x = g.input("x", ("N", 2, *spatial))
    h = g.relu(getattr(g, f"conv{nd}d")(x, 3, 3, padding=1, name="c"))
    g.output(g.linear(g.flatten(getattr(g, f"adaptive_{mode}_pool{nd}d")(h, out, name="ap")), 5, name="fc"))
    graph = build(g, stage)
    compile_all(graph)
    results = check_kernels(graph, random_inputs(graph, 3, 0), gc.init_params(graph, seed=0))
    assert all(r.ok for r in results), [(r.node, r.max_rel, r.note) for r in results if not r.ok]
    ops = {r.op for r in results}
    assert f"adaptive_{mode}_pool{nd}d" in ops
    if "train" in stage:
        assert f"adaptive_{mode}_pool{nd}d_backward" in ops


def test_dropout_kernels_of_any_p_compile():
    """The kernel is named by its drop threshold, an integer: p = 1e-5 (printed 1e-05) once put a '-'
    into the C name."""
    g = gc.Graph("d", "float32")
    g.output(g.linear(g.dropout(g.input("x", ("N", 8)), p=1e-5, name="drop"), 2, name="fc"))
    for stage in ("forward", "train"):
        graph = build(g, stage)
        compile_all(graph)
        results = check_kernels(graph, random_inputs(graph, 3, 0), gc.init_params(graph, seed=0))
        assert all(r.ok for r in results)
        assert any(k.startswith("dropout_f32_8_t168_") for r in results for k in r.kernels)


def test_the_new_layers_net_of_the_gpu_suite_passes_on_the_host():
    """The GPU suite's network of every layer added after the bundled models, here on the host."""
    from test_gpu import new_layers_net
    graph = build(new_layers_net(), "fused-train")
    compile_all(graph)
    results = check_kernels(graph, random_inputs(graph, 3, 0), gc.init_params(graph, seed=0))
    assert all(r.ok for r in results), [(r.node, r.max_rel, r.note) for r in results if not r.ok]
    assert {"conv_transpose2d", "upsample_backward", "adaptive_max_pool2d_backward", "softmax_grad", "dropout",
            "mean_grad", "concat", "slice"} <= {r.op for r in results}
    names = [k for r in results for k in r.kernels]
    assert any(k.startswith("conv2d_backward_data_f32") and k.endswith("_replicate") for k in names)
    assert any(k.startswith("conv2d_backward_weight_f32") and "_reflect" in k for k in names)


# ---- concat and slice --------------------------------------------------------------------------------
@needs_gxx
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_concat_and_its_slices_copy_runs_of_channels_on_every_axis(dtype):
    """concat along the channels of three convs (one of them through a relu), along the width, and of a
    batch with itself; slice as concat's gradient: one copy kernel per input writing its run of the
    result, one per slice reading its run; forward and training step against NumPy, outputs poisoned,
    compiled by NVRTC."""
    g = gc.Graph("cat", dtype)
    x = g.input("x", ("N", 3, 8, 8))
    parts = [g.conv2d(x, 4, 3, padding=1, name="c1"), g.conv2d(x, 2, 3, padding=1, name="c2"),
             g.relu(g.conv2d(x, 3, 1, name="c3"))]
    h = g.concat(parts, dim=1, name="cat")
    w = g.concat([h, h], dim=-1, name="catw")
    f = g.flatten(w)
    g.output(g.linear(g.concat([f, g.relu(f)], dim=1, name="catf"), 3, name="fc"), g.concat([x, x], dim=0, name="batch2"))
    for stage in ("forward", "train"):
        step = build(g, stage)
        kernels = [k for k in Program(step).kernels if k.name.startswith(("concat", "slice"))]
        # (the training step keeps the first output, the scores: the batch concat is not part of it)
        assert sum(k.name.startswith("concat") for k in kernels) == 3 + 2 + 2 + (2 if stage == "forward" else 0)
        assert sum(k.name.startswith("slice") for k in kernels) == (0 if stage == "forward" else 3 + 2 + 2)
        inputs = inputs_of(step, 3)
        results = check_kernels(step, inputs, gc.init_params(step, seed=0))
        assert all(r.ok for r in results), [(r.node, r.note) for r in results if not r.ok]
        assert {"cat", "catw", "catf"} | ({"batch2"} if stage == "forward" else set()) <= \
            {n for r in results for n in r.node.split(", ")}
        compile_all(step)


@needs_gxx
@pytest.mark.parametrize("stage", ["forward", "fused", "train", "fused-train"])
def test_an_operand_whose_dims_match_the_result_only_once_bound_is_read_element_by_element(stage):
    """`s: ("B", 4)` bound to (3, 4) beside the [N, 4] result of a linear layer, `t: ("B", 4, 5, 5)`
    beside a conv's [N, 4, 5, 5] and a (3, 4) parameter scaling the linear layer: the same element at
    N = 3 (a pointwise kernel, an epilogue extra of the fused linear / conv, the parameter's gradient
    and its Adam update), not a per-channel vector; any other batch is refused by name."""
    from graphconv.passes import bind_dims
    g = gc.Graph("bound", "float32")
    h = g.relu(g.conv2d(g.input("x", ("N", 2, 5, 5)), 4, 3, padding=1, name="c"))
    h = g.add(h, g.input("t", ("B", 4, 5, 5)), name="plus_t")
    y = g.relu(g.add(g.linear(g.flatten(h), 4, name="fc"), g.input("s", ("B", 4)), name="plus_s"))
    g.output(g.mul(y, g.param("rows", (3, 4), ("uniform", 1.0)), name="rowwise"))
    graph = build(bind_dims(g, {"B": 3}), stage)
    assert any(n.op.startswith("fused_") for n in graph.topo()) == stage.startswith("fused")
    assert_program_matches(graph, inputs_of(graph, 3))
    with pytest.raises(gc.InputError, match="plus_t|plus_s|rowwise"):
        CompiledProgram(graph, "host").run(inputs_of(graph, 2), gc.init_params(graph, seed=0))


@needs_gxx
def test_an_uneven_adaptive_average_over_large_windows_adds_in_double_on_both_backends():
    """1001 -> 2 gives overlapping 501 x 501 windows, the uneven adaptive kernel's: added in float32
    they drift (values near 1000: 0.5000 came out 0.5001 above the exact mean); in double on both
    backends, within float32 rounding of the exact mean."""
    g = gc.Graph("adaptive")
    g.output(g.adaptive_avg_pool2d(g.input("x", ("N", 1, 1001, 1001)), (2, 2), name="ap"))
    assert [spec.template for spec in Program(g).kernels] == ["adaptive_pool.cu.j2"]
    x = np.random.default_rng(0).random((1, 1, 1001, 1001), dtype=np.float32) + np.float32(1000)
    exact = np.array([[x[0, 0, a:a + 501, b:b + 501].astype(np.float64).mean() for b in (0, 500)] for a in (0, 500)])
    for backend in ("numpy", "host"):
        got = np.asarray(gc.compile(g, backend=backend)(x)).reshape(2, 2)
        np.testing.assert_allclose(got, exact, rtol=1e-7, err_msg=backend)
    # windows of 28, 35 and 28 elements: the largest decides for all, in both backends, bit for bit
    g2 = gc.Graph("straddle")
    g2.output(g2.adaptive_avg_pool2d(g2.input("x", ("N", 2, 13, 11)), (2, 3), name="ap"))
    x2 = np.random.default_rng(1).random((3, 2, 13, 11), dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(gc.compile(g2, backend="host")(x2)), np.asarray(gc.compile(g2)(x2)))
    running = np.float32(0)
    for v in x[0, 0, :501, :501].ravel():
        running += v
    assert abs(running / np.float32(501 * 501) - exact[0, 0]) > 1e-4 * exact[0, 0]    # a float32 running sum drifts


@needs_gxx
def test_a_global_average_over_a_large_plane_adds_in_double_on_both_backends():
    """A float32 running sum of a 1500 x 1500 plane drifts (6000 x 6000 of [0, 1) values gave 0.466 for
    0.49996, as PyTorch's avg_pool2d does): windows of more than AVG_EXACT_WINDOW elements add in
    double in the reference and the kernel, the mean within float32 rounding of the exact one; the
    reference takes the tiling windows in one reshape (it looped over 2.25M offsets, minutes a call),
    and its gradient is a repeat."""
    import time
    from graphconv.ops.pool import AVG_EXACT_WINDOW
    g = gc.Graph("gap")
    g.output(g.global_avg_pool(g.input("x", ("N", 2, 1500, 1500)), name="gap"))
    x = np.random.default_rng(0).random((1, 2, 1500, 1500), dtype=np.float32) + np.float32(1000)
    exact = x.astype(np.float64).mean(axis=(2, 3)).reshape(1, 2, 1, 1)
    start = time.perf_counter()
    want = np.asarray(gc.compile(g)(x))
    assert time.perf_counter() - start < 5
    got = np.asarray(gc.compile(g, backend="host")(x))
    assert 1500 * 1500 > AVG_EXACT_WINDOW
    np.testing.assert_allclose(want, exact, rtol=1e-7)
    np.testing.assert_allclose(got, exact, rtol=1e-7)
    float32_running = np.float32(0)
    for v in x[0, 0].ravel()[:200000]:
        float32_running += v
    assert abs(float32_running / 200000 - x[0, 0].ravel()[:200000].astype(np.float64).mean()) > 1e-3   # it drifts
    from graphconv.ops import OPS
    dy = np.random.default_rng(1).standard_normal((1, 2, 1, 1)).astype(np.float32)
    dx = OPS["avg_pool2d_backward"].reference([dy], {**g.node("gap").attrs, "input_size": (1500, 1500)})
    np.testing.assert_array_equal(dx, np.broadcast_to((dy / np.float32(1500 * 1500)).astype(np.float32), dx.shape))
