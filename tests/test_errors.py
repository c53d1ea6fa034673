"""Every malformed network gets a clear error naming the user's layer, the op, the values and the
chain of layers behind the offending input; a failed layer call leaves the graph unchanged."""
import numpy as np
import pytest
import sympy as sp

import graphconv as gc
from graphconv.models import lenet5
from graphconv.ops import TensorType


def two_pools():
    g = gc.Graph("net")
    x = g.input("x", ("N", 1, 28, 28))
    h = g.max_pool2d(g.relu(g.conv2d(x, 20, 5, padding=2, name="conv1"), name="relu1"), 2, name="pool1")
    return g, x, h


def raises(kind, fn, *parts):
    with pytest.raises(kind) as info:
        fn()
    msg = str(info.value)
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


def test_channel_mismatch_names_layer_values_and_chain():
    g, _, h = two_pools()
    msg = raises(gc.ShapeError, lambda: g.conv2d(h, 50, 5, in_channels=30, name="conv2"),
                 "conv2 [conv2d]", "input has 20 channels, weight expects 30",
                 "(input [N,20,14,14] from pool1 <- relu1 <- conv1 <- x)")
    assert msg.startswith("conv2")


def test_linear_and_batch_norm_feature_mismatch():
    g, _, h = two_pools()
    f = g.flatten(h, name="flat")
    raises(gc.ShapeError, lambda: g.linear(f, 10, in_features=2000, name="fc1"),
           "fc1 [linear]", "input has 3920 features, weight expects 2000", "from flat <- pool1")
    raises(gc.ShapeError, lambda: g.batch_norm2d(h, num_features=16, name="bn1"),
           "bn1 [batch_norm]", "input has 20 channels", "[16]")


def test_kernel_larger_than_padded_input():
    g = gc.Graph("net")
    x = g.input("x", ("N", 3, 4, 4))
    raises(gc.ShapeError, lambda: g.conv2d(x, 8, 7, padding=1, name="big"),
           "big [conv2d]", "kernel 7 is larger than the padded input along H: 4 + padding 2 = 6", "from x")
    raises(gc.ShapeError, lambda: g.max_pool2d(x, 3, dilation=3, name="p"),
           "p [max_pool2d]", "kernel 3 with dilation 3 spans 7")


def test_non_positive_and_non_integer_sizes():
    g = gc.Graph("net")
    raises(gc.ShapeError, lambda: g.input("x", ("N", 3, 0, 4)), "x [input]", "must be positive, got 0")
    raises(gc.ShapeError, lambda: g.input("x", ("N", 3, 28.5, 4)), "x [input]", "28.5")
    raises(gc.ShapeError, lambda: g.input("x", ("N", 3, sp.Rational(57, 2), 4)), "x [input]", "not an integer")
    x = g.input("x", ("N", 3, 5, 5))
    fixed = g.input("fixed", (3, 5, 5))
    raises(gc.ShapeError, lambda: g.reshape(fixed, (-1, 7), name="rs"), "rs [reshape]", "75 elements",
           "75/7, not an integer", "from fixed")
    # with a symbolic batch the inferred dim 75*N/7 may be an integer; binding N decides at run time
    g.output(g.reshape(x, (-1, 7), name="rs_sym"))
    raises(gc.InputError, lambda: gc.compile(g).run({"x": np.zeros((2, 3, 5, 5), np.float32),
                                                       "fixed": np.zeros((3, 5, 5), np.float32)}),
           "rs_sym [reshape]", "150/7", "N=2")
    raises(gc.ShapeError, lambda: g.reshape(x, ("N", 70), name="rs"), "rs [reshape]", "75*N", "70*N")
    # an output size that the formula makes zero: 1 element, kernel 1, but a stride that skips
    # nothing is never non-positive, so exercise the guard through the shared window rule
    from graphconv.ops.window import window_shape
    from graphconv.errors import OpError
    with pytest.raises(OpError, match="larger than the padded input"):
        window_shape("t", (2,), (3,), (1,), ((0, 0),), (1,))


def test_stride_zero_negative_padding_and_bad_dilation():
    g = gc.Graph("net")
    x = g.input("x", ("N", 3, 8, 8))
    raises(gc.GraphError, lambda: g.conv2d(x, 4, 3, stride=0, name="c1"), "c1 [conv2d]", "stride must be positive, got 0")
    raises(gc.GraphError, lambda: g.conv2d(x, 4, 3, padding=-1, name="c1"), "c1 [conv2d]", "padding must be >= 0, got -1")
    raises(gc.GraphError, lambda: g.conv2d(x, 4, 3, dilation=(1, 0), name="c1"), "c1 [conv2d]", "dilation must be positive")
    raises(gc.GraphError, lambda: g.max_pool2d(x, 2, stride=0, name="p1"), "p1 [max_pool2d]", "stride must be positive")
    raises(gc.GraphError, lambda: g.avg_pool2d(x, 2, padding=-2, name="p1"), "p1 [avg_pool2d]", "padding must be >= 0")
    raises(gc.GraphError, lambda: g.max_pool2d(x, 2, padding=2, name="p1"), "p1 [max_pool2d]",
           "at most half the kernel size")
    raises(gc.GraphError, lambda: g.conv2d(x, 4, 3, stride=2, padding="same", name="c1"), "c1 [conv2d]",
           "padding='same' needs stride 1")
    raises(gc.GraphError, lambda: g.conv2d(x, 4, 3, padding_mode="mirror", name="c1"), "c1 [conv2d]", "padding_mode")


def test_groups_must_divide_channels():
    g = gc.Graph("net")
    x = g.input("x", ("N", 20, 8, 8))
    raises(gc.ShapeError, lambda: g.conv2d(x, 30, 3, groups=3, name="gconv"), "gconv [conv2d]",
           "groups=3 does not divide in_channels=20", "from x")
    raises(gc.GraphError, lambda: g.conv2d(x, 30, 3, groups=4, name="gconv"), "gconv [conv2d]",
           "groups=4 does not divide out_channels=30")


def test_rank_mismatch():
    g = lenet5()
    raises(gc.ShapeError, lambda: g.conv2d("fc1", 4, 3, name="late"), "late [conv2d]",
           "expects a 4-D [N, C, H, W] input, got 2-D [N,500]", "from fc1 <- flatten1 <- pool2")
    g2, _, h = two_pools()
    raises(gc.ShapeError, lambda: g2.linear(h, 10, name="fc"), "fc [linear]", "2-D input", "4-D [N,20,14,14]",
           "flatten it first")
    raises(gc.ShapeError, lambda: g2.conv1d(h, 4, 3, name="c1d"), "c1d [conv1d]", "3-D [N, C, L]")
    raises(gc.ShapeError, lambda: g2.batch_norm1d(h, name="bn"), "bn [batch_norm1d]", "2-D or 3-D")


def test_add_and_concat_mismatch_name_both_chains():
    g, x, h = two_pools()
    raises(gc.ShapeError, lambda: g.add(h, x, name="res"), "res [add]", "[N,20,14,14]", "[N,1,28,28]",
           "from x")
    raises(gc.ShapeError, lambda: g.concat([h, x], name="cat"), "cat [concat]", "along dim 2", "(input 1")


def test_unknown_op_and_attribute():
    g, x, h = two_pools()
    raises(gc.GraphError, lambda: g.apply("conv2", h, name="oops"), "oops [conv2]", "unknown op 'conv2'",
           "did you mean")
    raises(gc.GraphError, lambda: g.apply("max_pool2d", h, kernal_size=2, name="p2"), "p2 [max_pool2d]",
           "no attribute 'kernal_size'", "did you mean 'kernel_size'")
    raises(gc.GraphError, lambda: g.conv2d(h, 8, 3, strides=2, name="c9"), "c9 [conv2d]",
           "no attribute 'strides'", "did you mean 'stride'")
    raises(gc.GraphError, lambda: g.apply("conv2d", h, name="c10"), "c10 [conv2d]", "takes 2 to 3 operands")


def test_dtype_mismatch_and_duplicate_names():
    g = gc.Graph("net")
    a = g.input("a", ("N", 4))
    b = g.input("b", ("N", 4), dtype="float64")
    raises(gc.ShapeError, lambda: g.add(a, b, name="s"), "s [add]", "rhs is float64 but lhs is float32")
    raises(gc.GraphError, lambda: g.relu(a, name="a"), "a: the name is already used")
    y = g.input("y", ("N",), dtype="float32")
    raises(gc.ShapeError, lambda: g.cross_entropy(a, y, name="L"), "L [softmax_cross_entropy]", "int64")


def test_failed_layer_leaves_graph_unchanged():
    g, _, h = two_pools()
    before = (sorted(g.nx.nodes), dict(g._prefix_counts))
    with pytest.raises(gc.ShapeError):
        g.conv2d(h, 50, 5, in_channels=30)
    assert (sorted(g.nx.nodes), dict(g._prefix_counts)) == before
    assert g.conv2d(h, 50, 5).name == "conv2"


# ---- run time -------------------------------------------------------------------------------
def test_wrong_input_shape_dtype_and_missing_arrays():
    g = lenet5()
    run = gc.compile(g)
    params = gc.init_params(g)
    x = np.zeros((4, 1, 28, 28), np.float32)
    raises(gc.InputError, lambda: run(np.zeros((4, 1, 32, 32), np.float32), params=params),
           "x: expected shape [N,1,28,28], got [4,1,32,32]", "dim 2 is 32")
    raises(gc.InputError, lambda: run(x.astype(np.float64), params=params), "x: expected float32, got float64")
    raises(gc.InputError, lambda: run(x[0], params=params), "x: expected a 4-D array")
    raises(gc.InputError, lambda: run(x.tolist(), params=params), "x: expected a numpy array")
    raises(gc.InputError, lambda: run(params=params), "x: missing input")
    bad = dict(params)
    bad["conv2.weight"] = bad["conv2.weight"][:, :10]
    raises(gc.InputError, lambda: run(x, params=bad), "conv2.weight: expected shape [50,20,5,5], got [50,10,5,5]")
    del bad["conv2.weight"]
    raises(gc.InputError, lambda: run(x, params=bad), "conv2.weight: missing")
    raises(gc.InputError, lambda: run(x, params={**params, "conv9.weight": x}), "conv9.weight: lenet5 has no parameter")


def test_symbol_bound_inconsistently_and_bad_labels():
    g = gc.Graph("net")
    s = g.input("s", ("N", 3))
    y = g.input("y", ("N",), dtype="int64")
    g.output(g.cross_entropy(s, y, name="loss"))
    run = gc.compile(g)
    raises(gc.InputError, lambda: run(np.zeros((4, 3), np.float32), np.zeros(5, np.int64)),
           "y: dim 0 (N) is 5, but N=4")
    raises(gc.InputError, lambda: run(np.zeros((2, 3), np.float32), np.array([0, 3])),
           "loss [softmax_cross_entropy]", "class 3, outside 0..2")


def test_verify_catches_broken_invariants():
    g = lenet5()
    bad = g.copy()
    bad.node("conv1").type = TensorType(bad.node("conv1").shape[:3], "float32")
    with pytest.raises(gc.GraphError, match="conv1: stored type"):
        bad.verify()
    bad = g.copy()
    bad.nx.add_edge("fc2", "conv1", key=3)
    with pytest.raises(gc.GraphError, match="cycle"):
        bad.verify()
    bad = g.copy()
    bad.node("pool1").attrs["kernel_size"] = 2
    with pytest.raises(gc.GraphError, match="not normalised"):
        bad.verify()
    bad = g.copy()
    bad.node("relu1").op = "relu6"
    with pytest.raises(gc.GraphError, match="unknown op"):
        bad.verify()


def test_bad_attribute_values_are_reported_not_crashed():
    g = gc.Graph("net")
    x = g.input("x", ("N", 3, 8, 8))
    raises(gc.GraphError, lambda: g.batch_norm2d(x, eps="a", name="bn"), "bn [batch_norm]: eps must be a number, got 'a'")
    raises(gc.GraphError, lambda: g.leaky_relu(x, negative_slope=None, name="lr"), "lr [leaky_relu]",
           "negative_slope must be a number, got None")
    raises(gc.GraphError, lambda: g.leaky_relu(x, negative_slope=float("nan"), name="lr"),
           "negative_slope must be a finite number, got nan")
    raises(gc.GraphError, lambda: g.max_pool2d(x, 2, ceil_mode="False", name="p"), "ceil_mode must be True or False")
    raises(gc.ShapeError, lambda: g.batch_norm2d(x, eps=1e-50, name="bn"), "eps 1e-50 is 0 in float32")
    raises(gc.GraphError, lambda: g.conv2d(x, 4, "3", name="c"), "c [conv2d]", "kernel_size must be an int or a tuple")
    raises(gc.GraphError, lambda: g.max_pool2d(x, 2, stride=1.5, name="p"), "p [max_pool2d]", "got 1.5")
    raises(gc.ShapeError, lambda: g.reshape(x, ("N", 3, 64.0), name="r"), "r [reshape]", "64.0 is a float")
    raises(gc.GraphError, lambda: g.conv2d(np.zeros((1, 3, 8, 8)), 4, 3, name="c"), "c", "is not a tensor of graph net")
    assert [n.name for n in g.topo()] == ["x"]
