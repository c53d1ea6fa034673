"""Every gradient rule against central finite differences in float64 along random directions, on
random shapes and hyperparameters; the derived backward graph against PyTorch autograd."""
import numpy as np
import pytest
import sympy as sp

import graphconv as gc
from graphconv.autodiff import derive_backward, saved_bytes, saved_tensors
from graphconv.gradcheck import check_graph, check_rule
from graphconv.models import MODELS
from graphconv.ops.pointwise import define_activation, sigmoid, softplus
from torch_oracle import evaluate_into, torch

RNG = np.random.default_rng(2024)


def assert_rule(op, values, attrs):
    results = check_rule(op, values, attrs, RNG)
    assert results, f"{op}: nothing checked"
    for r in results:
        assert r.ok, f"{r.rule}: relative error {r.error:.2e}"
    return results


def conv_attrs(nd, rng):
    return {"stride": tuple(int(v) for v in rng.integers(1, 3, nd)),
            "padding": tuple((int(a), int(b)) for a, b in rng.integers(0, 3, (nd, 2))),
            "dilation": tuple(int(v) for v in rng.integers(1, 3, nd)),
            "groups": int(rng.choice([1, 2])),
            "padding_mode": str(rng.choice(["zeros", "reflect", "replicate", "circular"]))}


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("trial", range(4))
def test_conv_gradients_random_hyperparameters(nd, trial):
    rng = np.random.default_rng(100 * nd + trial)
    attrs = conv_attrs(nd, rng)
    groups = attrs["groups"]
    c_in, c_out = 2 * groups, 2 * groups
    spatial = tuple(int(v) for v in rng.integers(5, 8 if nd < 3 else 6, nd))
    kernel = tuple(int(v) for v in rng.integers(1, 4, nd))
    x = rng.standard_normal((2, c_in, *spatial))
    w = rng.standard_normal((c_out, c_in // groups, *kernel))
    b = rng.standard_normal(c_out)
    results = assert_rule(f"conv{nd}d", [x, w, b], attrs)
    assert {r.rule.split("[")[1] for r in results} == {"input]", "weight]", "bias]"}


def test_conv_same_padding_depthwise_and_no_bias():
    x = RNG.standard_normal((2, 4, 6, 7))
    assert_rule("conv2d", [x, RNG.standard_normal((4, 1, 4, 3))], {"padding": "same", "groups": 4, "dilation": (1, 2)})
    assert_rule("conv1d", [RNG.standard_normal((1, 3, 9)), RNG.standard_normal((6, 1, 3))],
                {"stride": 3, "groups": 3, "padding": 4})


POOLS = [
    ("max", 1, (11,), {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": 2, "ceil_mode": True}),
    ("max", 2, (7, 8), {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
    ("max", 2, (6, 6), {"kernel_size": 2}),
    ("max", 2, (7, 7), {"kernel_size": 3, "stride": 1, "padding": 1}),   # overlapping windows
    ("max", 3, (5, 6, 5), {"kernel_size": 2, "stride": (1, 2, 2), "ceil_mode": True}),
    ("avg", 1, (10,), {"kernel_size": 4, "stride": 3, "padding": 2, "ceil_mode": True}),
    ("avg", 2, (7, 7), {"kernel_size": 3, "stride": 2, "padding": 1, "count_include_pad": False}),
    ("avg", 2, (8, 7), {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
    ("avg", 2, (7, 6), {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True, "count_include_pad": False}),
    ("avg", 3, (4, 5, 6), {"kernel_size": (2, 3, 2), "stride": 2, "padding": (1, 1, 0)}),
]


@pytest.mark.parametrize("mode,nd,spatial,attrs", POOLS, ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_pool_gradients_every_mode(mode, nd, spatial, attrs):
    assert_rule(f"{mode}_pool{nd}d", [RNG.standard_normal((2, 3, *spatial))], attrs)


def test_max_pool_routes_ties_to_the_first_maximum_like_pytorch():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 1] = x[0, 0, 1, 0] = 1.0   # a tie inside the first window
    g = gc.Graph("t", "float64")
    xi = g.input("x", (1, 1, 4, 4))
    dy = g.input("dy", (1, 1, 2, 2))
    g.output(g.apply("max_pool2d_backward", xi, dy, kernel_size=2))
    dx = gc.compile(g)(x, np.ones((1, 1, 2, 2)))
    assert dx[0, 0, 1, 0] == 1 and dx[0, 0, 1, 1] == 0     # row-major scan: (1,0) comes first
    if torch is not None:
        t = torch.tensor(x, requires_grad=True)
        torch.nn.functional.max_pool2d(t, 2).sum().backward()
        np.testing.assert_array_equal(t.grad.numpy(), dx)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 4), (2, 3, 4, 3), (2, 2, 3, 2, 3)])
def test_batch_norm_gradients(shape, training):
    c = shape[1]
    values = [RNG.standard_normal(shape) * 2 + 0.5, RNG.standard_normal(c), RNG.uniform(0.5, 2, c),
              RNG.uniform(0.5, 1.5, c), RNG.standard_normal(c)]
    results = assert_rule("batch_norm", values, {"eps": 1e-3, "training": training})
    assert {r.rule for r in results} == {"batch_norm.grad[input]", "batch_norm.grad[weight]", "batch_norm.grad[bias]"}


@pytest.mark.parametrize("op,attrs", [("relu", {}), ("leaky_relu", {"negative_slope": 0.1}), ("sigmoid", {}),
                                      ("tanh", {})])
def test_activation_gradients(op, attrs):
    assert_rule(op, [RNG.standard_normal((3, 4, 5)) * 3], attrs)


def test_linear_matmul_layout_and_combining_ops():
    assert_rule("linear", [RNG.standard_normal((4, 6)), RNG.standard_normal((6, 3)), RNG.standard_normal(3)], {})
    assert_rule("linear", [RNG.standard_normal((4, 6)), RNG.standard_normal((6, 3))], {})
    a, b = RNG.standard_normal((2, 3, 4)), RNG.standard_normal((2, 3, 4))
    assert_rule("add", [a, b], {})
    assert_rule("concat", [a, RNG.standard_normal((2, 5, 4)), b], {"dim": 1})
    assert_rule("concat", [a, b], {"dim": -1})
    assert_rule("flatten", [RNG.standard_normal((2, 3, 4, 5))], {"start_dim": 1, "end_dim": 2})
    assert_rule("reshape", [RNG.standard_normal((2, 12))], {"shape": (2, 3, -1)})


@pytest.mark.parametrize("op", ["softmax_cross_entropy", "hinge_loss"])
def test_loss_gradients(op):
    scores = RNG.standard_normal((6, 5)) * 2
    target = RNG.integers(0, 5, 6)
    results = assert_rule(op, [scores, target], {})
    assert [r.rule for r in results] == [f"{op}.grad[scores]"]   # no gradient for class indices


def test_sympy_defined_activations_get_their_gradient_from_sympy():
    x = sp.Symbol("t")
    swish = define_activation("swish", x * sigmoid(x))
    define_activation("mish", lambda v: v * sp.tanh(softplus(v)))
    assert sp.simplify(swish.derivative(0).expr - sp.Symbol("dy", real=True) * (
        sigmoid(swish.symbols[0]) + swish.symbols[0] * sigmoid(swish.symbols[0]) * (1 - sigmoid(swish.symbols[0])))) == 0
    values = [RNG.standard_normal((3, 7)) * 4]
    assert_rule("swish", values, {})
    assert_rule("mish", values, {})
    v = values[0]
    g = gc.Graph("t", "float64")
    g.output(g.activation(g.input("x", (3, 7)), "mish", name="m"))
    np.testing.assert_allclose(gc.compile(g)(v), v * np.tanh(np.log1p(np.exp(v))), rtol=1e-12)
    with pytest.raises(gc.GraphError, match="already defined"):
        define_activation("swish", x * sp.tanh(x))
    assert define_activation("swish", x * sigmoid(x)) is swish   # same definition: fine


def test_fast_numpy_forms_equal_their_expressions():
    from graphconv.ops import OPS
    x = RNG.standard_normal(1000) * 5
    for name, attrs in (("relu", ()), ("leaky_relu", (0.03,))):
        op = OPS[name]
        np.testing.assert_array_equal(op._fn(x, *attrs), op.lambdified(x, *attrs))


def test_fan_out_accumulates_and_repeated_operands():
    g = gc.Graph("t", "float64")
    x = g.input("x", ("N", 3))
    w = g.param("w", (3,), ("uniform", 1.0))
    h = g.add(x, g.relu(x, name="r"), name="h")         # x used twice
    s = g.add(h, h, name="s")                            # h used twice by one node
    y = g.linear(s, 2, name="fc")
    lab = g.input("y", ("N",), dtype="int64")
    loss = g.cross_entropy(y, lab, name="loss")
    g.output(loss)
    del w
    bwd = derive_backward(g, wrt=["x"])
    assert bwd.operands("dh") == ["dh@s", "dh@s.2"] or bwd.node("dh").op == "add"
    assert bwd.node("dx").op == "add"                    # two contributions to x, summed
    assert "dw" in bwd.meta["grads"].values() and bwd.node("dw").op == "constant"   # unused: zero
    xv, yv = RNG.standard_normal((4, 3)), RNG.integers(0, 2, 4)
    params = gc.init_params(bwd)
    out = gc.compile(bwd).run({"x": xv, "y": yv}, params)
    if torch is not None:
        tx = torch.tensor(xv, requires_grad=True)
        th = tx + torch.relu(tx)
        ts = th + th
        W = torch.tensor(params["fc.weight"], requires_grad=True)
        tl = torch.nn.functional.cross_entropy(ts @ W + torch.tensor(params["fc.bias"]), torch.tensor(yv))
        tl.backward()
        np.testing.assert_allclose(out["dx"], tx.grad.numpy(), rtol=1e-12)
        np.testing.assert_allclose(out["dfc.weight"], W.grad.numpy(), rtol=1e-12)


def with_loss(name):
    g = MODELS[name]()
    y = g.input("y", ("N",), dtype="int64")
    out = g.outputs[0]
    if len(g.node(out).shape) > 2:
        out = g.flatten(out, name="flat_out")
    g.output(g.cross_entropy(out, y, name="loss"), g.outputs[0])
    return g


@pytest.mark.parametrize("name", sorted(MODELS))
def test_backward_graph_matches_torch_autograd(name):
    if torch is None:
        pytest.skip("PyTorch not installed")
    g = gc.cast(with_loss(name), "float64")
    bwd = derive_backward(g)
    params = gc.init_params(g, seed=4)
    x = RNG.standard_normal([3] + [int(d) for d in g.inputs[0].shape[1:]])
    y = RNG.integers(0, 10, 3)
    ours = gc.compile(bwd).run({"x": x, "y": y}, params)
    tensors = {k: torch.tensor(v, requires_grad=g.node(k).attrs["trainable"]) for k, v in params.items()}
    tensors["x"], tensors["y"] = torch.tensor(x), torch.tensor(y)
    evaluate_into(g, tensors)
    tensors["loss"].backward()
    np.testing.assert_allclose(ours["loss"], tensors["loss"].item(), rtol=1e-12)
    for param, grad in bwd.meta["grads"].items():
        np.testing.assert_allclose(ours[grad], tensors[param].grad.numpy(), rtol=1e-8, atol=1e-11, err_msg=param)


def test_backward_dump_names_the_forward_nodes_and_saved_tensors():
    g = with_loss("lenet5")
    bwd = derive_backward(g)
    from graphconv.printer import to_text
    text = to_text(bwd)
    assert ("%dpool1:f32[N,20,14,14] = conv2d_backward_data[stride=(1,1), padding=(2,2), dilation=(1,1), groups=1, "
            "padding_mode=zeros, input_size=(14,14)] %dconv2 %conv2.weight  # grad_of=conv2, rule=conv2d.grad, "
            "wrt=input") in text
    names = [n.name for n in saved_tensors(bwd)]
    assert names == ["x", "conv1", "relu1", "pool1", "conv2", "relu2", "flatten1", "fc1", "relu3", "fc2", "y"]
    per_example = 4 * (784 + 2 * 15680 + 3920 + 2 * 9800 + 2450 + 2 * 500 + 10) + 8
    assert saved_bytes(bwd, batch=1) == per_example and saved_bytes(bwd, batch=64) == 64 * per_example


def test_dead_code_is_eliminated():
    g = with_loss("lenet5")
    g.outputs = g.outputs[:1]       # only the loss: the logits output goes, the nodes it needs stay
    bwd = derive_backward(g)
    assert "fc2" in bwd and not any(n.provenance.get("wrt") == "input" and n.provenance["grad_of"] == "conv1"
                                    for n in bwd.topo())   # no gradient w.r.t. the image unless asked
    bwd_x = derive_backward(g, wrt=["x"])
    assert bwd_x.meta["grads"]["x"] == "dx" and bwd_x.node("dx").op == "conv2d_backward_data"


def test_backward_errors():
    g = MODELS["lenet5"]()
    with pytest.raises(gc.GraphError, match="the loss fc2 must be a float scalar"):
        derive_backward(g)
    g2 = with_loss("lenet5")
    with pytest.raises(gc.GraphError, match="no tensor 'nope'"):
        derive_backward(g2, wrt=["nope"])
    with pytest.raises(gc.GraphError, match="y holds integers"):
        derive_backward(g2, wrt=["y"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradcheck_passes_on_bundled_models(name):
    results = check_graph(with_loss(name), seed=1)
    assert all(r.ok for r in results), [(r.rule, r.error) for r in results if not r.ok]
    assert results[-1].rule == "model (end to end)"


def test_gradcheck_catches_a_wrong_rule(monkeypatch):
    from graphconv.ops import OPS
    op = OPS["linear"]
    original = op.grad

    def wrong(e, dy, needs):  # the input's gradient twice too large
        grads = original(e, dy, [False] + list(needs[1:]))
        if needs[0]:
            half = e.emit("matmul", [dy, e.inputs[1]], {"transpose_b": True})
            grads[0] = e.emit("add", [half, half], wrt=0)
        return grads

    monkeypatch.setattr(op, "grad", wrong)
    results = check_graph(with_loss("lenet5"), seed=0)
    failed = {r.rule for r in results if not r.ok}
    assert "linear.grad[input]" in failed and "model (end to end)" in failed


def test_mul_gradients_full_per_channel_and_scalar():
    """mul's gradients (sympy's dy * b and dy * a), summed over the broadcast axes of a per-channel or
    scalar operand, against finite differences."""
    a = RNG.standard_normal((2, 3, 4))
    assert_rule("mul", [a, RNG.standard_normal((2, 3, 4))], {})
    assert_rule("mul", [a, RNG.standard_normal(3)], {})
    assert_rule("mul", [a, RNG.standard_normal(())], {})


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape, dim", [((3, 5), 1), ((2, 3, 4), 1), ((2, 3, 4), -1), ((2, 70), 1)])
def test_softmax_gradients(op, shape, dim):
    """Written with the forward's output y: softmax y * (dy - sum(dy y)), log_softmax dy - exp(y) sum(dy)."""
    assert_rule(op, [3 * RNG.standard_normal(shape)], {"dim": dim})


@pytest.mark.parametrize("attrs", [{"dim": None}, {"dim": (2, 3)}, {"dim": 1, "keepdim": True}, {"dim": 0}])
def test_mean_gradients(attrs):
    assert_rule("mean", [RNG.standard_normal((2, 3, 4, 5))], attrs)


def test_sub_gradients_full_per_channel_and_scalar():
    a = RNG.standard_normal((2, 3, 4))
    for b in (RNG.standard_normal((2, 3, 4)), RNG.standard_normal(3), RNG.standard_normal(())):
        assert_rule("sub", [a, b], {})


@pytest.mark.parametrize("shape, attrs", [
    ((2, 3, 5, 4), {"size": (10, 8), "mode": "nearest"}),
    ((2, 3, 5, 4), {"size": (7, 9), "mode": "nearest"}),
    ((2, 3, 5, 4), {"size": (7, 9), "mode": "bilinear"}),
    ((2, 3, 5, 4), {"size": (3, 3), "mode": "bilinear", "align_corners": True}),
    ((2, 2, 6), {"size": (13,), "mode": "linear"}),
    ((1, 2, 3, 4, 2), {"size": (5, 5, 3), "mode": "trilinear"}),
])
def test_upsample_gradients(shape, attrs):
    assert_rule("upsample", [RNG.standard_normal(shape)], attrs)


@pytest.mark.parametrize("nd, attrs, c_in, c_out_g, kernel", [
    (2, dict(stride=2, padding=1, output_padding=(1, 0)), 3, 2, (3, 3)),
    (2, dict(stride=1, padding=(1, 0)), 2, 3, (3, 2)),
    (1, dict(stride=3, dilation=2, groups=2, output_padding=2), 4, 3, (2,)),
    (3, dict(stride=(1, 2, 1), padding=(1, 0, 0), output_padding=(0, 1, 0)), 2, 2, (3, 2, 2)),
])
def test_conv_transpose_gradients(nd, attrs, c_in, c_out_g, kernel):
    """Input: the conv with the same weight; weight: that conv's backward-weight (dy as its input);
    bias: the sum over batch and positions."""
    x = RNG.standard_normal((2, c_in) + (4,) * nd)
    w = RNG.standard_normal((c_in, c_out_g) + kernel)
    b = RNG.standard_normal(c_out_g * attrs.get("groups", 1))
    results = assert_rule(f"conv_transpose{nd}d", [x, w, b], attrs)
    assert len(results) == 3


@pytest.mark.parametrize("p", [0.0, 0.3, 0.8])
def test_dropout_gradient_draws_the_same_mask(p):
    """The mask is fixed by (seed, salt, step): the gradient is dropout of dy with the same key."""
    assert_rule("dropout", [RNG.standard_normal((4, 6, 5)), np.array(3.0)], {"p": p, "salt": 17, "seed": 2})


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("shape, out", [((2, 3, 10), (3,)), ((2, 3, 7, 5), (3, 2)), ((1, 2, 5, 4, 3), (2, 3, 2))])
def test_adaptive_pool_gradients_uneven_windows(mode, shape, out):
    assert_rule(f"adaptive_{mode}_pool{len(out)}d", [RNG.standard_normal(shape)], {"output_size": out})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(), (7,), (40, 30)])
def test_adam_and_select_numpy_forms_equal_their_expressions_bit_for_bit(dtype, shape):
    """The in-place Adam forms (with and without weight decay, 0-d parameters too) and the
    branch-free select that every Piecewise prints to give np.where's and the sympy forms' bits."""
    from graphconv.ops import OPS
    from graphconv.ops.base import select
    r = [RNG.standard_normal(shape).astype(dtype) for _ in range(3)]
    p, g, m = r
    v = np.abs(m)
    t, lr = np.array(3, dtype), np.array(1e-3, dtype)
    for name, args, attrs in (("adam_moment1", [m, g, p], {"weight_decay": 0.0}), ("adam_moment1", [m, g, p], {"weight_decay": 0.01}),
                              ("adam_moment2", [v, g, p], {"weight_decay": 0.0}), ("adam_moment2", [v, g, p], {"weight_decay": 0.01}),
                              ("adam_param", [p, m, v, t, lr], {})):
        op = OPS[name]
        a = op.check_attrs(attrs)
        got = op.reference(args, a)
        want = np.asarray(op.lambdified(*args, *a.values())).astype(dtype)
        assert got.dtype == np.dtype(dtype) and got.shape == shape
        np.testing.assert_array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}"), err_msg=name)
    special = np.array([np.nan, -0.0, np.inf, -np.inf, -1.0, 2.0], dtype)
    cond = np.array([False, False, False, True, False, True])
    for a, b in ((special, 0), (special, special[::-1]), (1.5, special), (special, np.float32(-0.0))):
        w = np.where(cond, a, b)
        s = select(cond, a, b)
        assert s.dtype == w.dtype
        np.testing.assert_array_equal(s.view(f"u{s.itemsize}"), w.view(f"u{w.itemsize}"))


@pytest.mark.parametrize("op", ["mul", "add", "sub"])
def test_an_operand_of_the_results_rank_gets_an_elementwise_gradient(op):
    """A (3, 4) parameter beside the [N, 4] output of a linear layer is elementwise at N = 3: its
    gradient is the full-size one (it was summed over the batch as if per channel, a [4] gradient
    the optimizer then broadcast to every row), end to end against finite differences; at N = 2
    the gradient graph is refused by name."""
    g = gc.Graph("rowwise", "float32")
    h = g.linear(g.input("x", ("N", 6)), 4, name="fc")
    s = g.apply(op, h, g.param("p", (3, 4), ("uniform", 1.0)), name="scaled")
    g.output(g.cross_entropy(s, g.input("y", ("N",), dtype="int64"), name="loss"), s)
    backward = derive_backward(g)
    assert len(backward.node(backward.meta["grads"]["p"]).shape) == 2
    results = check_graph(g, seed=3, batch=3)
    assert all(r.ok for r in results), [(r.rule, r.error) for r in results if not r.ok]
    with pytest.raises(gc.InputError, match="scaled"):
        check_graph(g, seed=3, batch=2)


def test_gradcheck_takes_a_learned_scalar_end_to_end():
    """A 0-d parameter (a learned offset) moved along a direction stayed a NumPy scalar, which the
    parameter check refused as if the user had passed it: now it is checked like any other."""
    from graphconv.training import attach_loss
    g = gc.Graph("scale")
    t = g.param("t", (), ("uniform", 1.0))
    h = g.relu(g.sub(g.conv2d(g.input("x", ("N", 3, 8, 8)), 4, 3, padding=1, name="c1"), t, name="s1"), name="r1")
    g.output(g.linear(g.flatten(g.max_pool2d(h, 2, name="p1")), 5, name="fc"))
    results = check_graph(attach_loss(g), seed=0)
    assert results[-1].rule == "model (end to end)" and all(r.ok for r in results), \
        [(r.rule, r.error) for r in results if not r.ok]
