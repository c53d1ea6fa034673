"""Every op's NumPy reference against an independent oracle: textbook loops (tests/naive.py) and,
where installed, PyTorch CPU (tests/torch_oracle.py)."""
import numpy as np
import pytest

import graphconv as gc
from naive import batch_norm_naive, conv_naive, cross_entropy_naive, hinge_naive, pool_naive
from graphconv.autodiff import derive_backward
from graphconv.gradcheck import check_rule
from torch_oracle import run_torch, torch

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch not installed")
RNG = np.random.default_rng(1234)


def run_single(g, out, dtype="float64", seed=0, inputs=None):
    g.output(out)
    g64 = gc.cast(g, dtype)
    params = gc.init_params(g64, seed=seed)
    if inputs is None:
        inputs = {n.name: RNG.standard_normal([int(d) for d in n.shape]).astype(dtype) for n in g64.inputs}
    values = gc.compile(g64).run(inputs, params, keep=True)
    return g64, inputs, params, values


CONV_CASES = [
    # nd, N, C_in, C_out, spatial, kernel, stride, padding, dilation, groups, padding_mode
    (1, 2, 3, 4, (11,), 3, 1, 0, 1, 1, "zeros"),
    (1, 2, 4, 6, (13,), 5, 2, 2, 2, 2, "reflect"),
    (1, 1, 2, 2, (9,), 3, 1, "same", 3, 1, "zeros"),
    (2, 2, 3, 4, (7, 8), 3, 1, 1, 1, 1, "zeros"),
    (2, 2, 4, 4, (9, 7), (3, 2), (2, 1), (1, 0), (1, 2), 4, "zeros"),   # depthwise, anisotropic
    (2, 1, 6, 4, (8, 8), 3, 2, 1, 2, 2, "replicate"),
    (2, 2, 2, 3, (6, 7), 3, 1, 2, 1, 1, "circular"),
    (2, 1, 2, 2, (6, 6), 4, 1, "same", 1, 1, "zeros"),                  # even kernel: asymmetric 'same'
    (2, 1, 2, 2, (7, 7), 3, 1, ((1, 2), (0, 1)), 1, 1, "reflect"),       # explicit (lo, hi) pairs
    (3, 1, 2, 4, (5, 6, 4), 3, 1, 1, 1, 2, "zeros"),
    (3, 2, 3, 3, (6, 5, 5), (2, 3, 1), (2, 1, 1), (1, 1, 0), 1, 3, "circular"),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"conv{c[0]}d-{c[-1]}-g{c[9]}")
def test_conv_matches_loops_and_torch(case):
    nd, n, c_in, c_out, spatial, k, s, p, d, groups, mode = case
    g = gc.Graph("t")
    x = g.input("x", (n, c_in, *spatial))
    y = getattr(g, f"conv{nd}d")(x, c_out, k, stride=s, padding=p, dilation=d, groups=groups, padding_mode=mode,
                                 name="c")
    g64, inputs, params, values = run_single(g, y)
    node = g64.node("c")
    from graphconv.ops.conv import Conv
    pads = Conv(nd).pads(node.attrs, params["c.weight"].shape)
    want = conv_naive(inputs["x"], params["c.weight"], params["c.bias"], node.attrs["stride"], pads,
                      node.attrs["dilation"], groups, mode)
    np.testing.assert_allclose(values["c"], want, rtol=1e-10, atol=1e-12)
    if torch is not None:
        np.testing.assert_allclose(run_torch(g64, inputs, params)["c"], values["c"], rtol=1e-10, atol=1e-12)


POOL_CASES = [
    # mode, nd, spatial, kernel, stride, padding, dilation, ceil_mode, count_include_pad
    ("max", 1, (9,), 3, 2, 1, 1, False, True),
    ("max", 1, (10,), 3, 2, 1, 2, True, True),
    ("max", 2, (7, 7), 2, 2, 0, 1, False, True),
    ("max", 2, (7, 8), 3, 2, 1, 1, True, True),
    ("max", 2, (9, 9), (3, 2), (2, 3), (1, 1), (2, 1), True, True),
    ("max", 3, (5, 6, 7), 2, 2, 0, 1, True, True),
    ("avg", 1, (9,), 3, 2, 1, 1, True, True),
    ("avg", 2, (7, 7), 3, 2, 1, 1, False, True),
    ("avg", 2, (7, 7), 3, 2, 1, 1, False, False),
    ("avg", 2, (8, 7), 3, 2, 1, 1, True, True),
    ("avg", 2, (8, 7), 3, 2, 1, 1, True, False),
    ("avg", 2, (6, 6), 2, None, 0, 1, False, True),
    ("avg", 3, (5, 5, 6), (3, 2, 2), 2, (1, 0, 1), 1, True, True),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: f"{c[0]}{c[1]}d-ceil{c[7]}-inc{c[8]}")
def test_pool_matches_loops_and_torch(case):
    mode, nd, spatial, k, s, p, d, ceil, inc = case
    g = gc.Graph("t")
    x = g.input("x", (2, 3, *spatial))
    extra = {"dilation": d} if mode == "max" else {"count_include_pad": inc}
    y = getattr(g, f"{mode}_pool{nd}d")(x, k, stride=s, padding=p, ceil_mode=ceil, name="p", **extra)
    g64, inputs, params, values = run_single(g, y)
    a = g64.node("p").attrs
    out_sp = [int(v) for v in g64.node("p").shape[2:]]
    want = pool_naive(inputs["x"], mode, a["kernel_size"], a["stride"], a["padding"], a.get("dilation", (1,) * nd),
                      out_sp, a.get("count_include_pad", True))
    np.testing.assert_allclose(values["p"], want, rtol=1e-12)
    if torch is not None:
        got = run_torch(g64, inputs, params)["p"]
        assert got.shape == values["p"].shape, "shape rule disagrees with PyTorch"
        np.testing.assert_allclose(got, values["p"], rtol=1e-12)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 4, 5), (2, 2, 3, 3, 2)])
def test_batch_norm(shape, training):
    nd = max(1, len(shape) - 2)
    g = gc.Graph("t")
    x = g.input("x", shape)
    y = getattr(g, f"batch_norm{nd}d")(x, eps=1e-3, training=training, name="bn")
    g.output(y)
    g64 = gc.cast(g, "float64")
    params = gc.init_params(g64)
    c = shape[1]
    params["bn.weight"] = RNG.uniform(0.5, 1.5, c)
    params["bn.bias"] = RNG.standard_normal(c)
    params["bn.running_mean"] = RNG.standard_normal(c)
    params["bn.running_var"] = RNG.uniform(0.5, 2, c)
    inputs = {"x": RNG.standard_normal(shape) * 3 + 1}
    got = gc.compile(g64)(inputs["x"], params=params)
    want = batch_norm_naive(inputs["x"], params["bn.running_mean"], params["bn.running_var"], params["bn.weight"],
                            params["bn.bias"], 1e-3, training)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    if torch is not None:
        np.testing.assert_allclose(run_torch(g64, inputs, params)["bn"], got, rtol=1e-10, atol=1e-12)


def test_activations_linear_add_concat_flatten_reshape():
    g = gc.Graph("t")
    a = g.input("a", (4, 6, 3, 2))
    b = g.input("b", (4, 2, 3, 2))
    h = g.concat([g.relu(a, name="r"), g.leaky_relu(b, 0.2, name="lr")], dim=1, name="cat")   # 4,8,3,2
    h = g.add(h, g.sigmoid(h, name="sg"), name="sum")
    f = g.flatten(g.tanh(h, name="th"), name="fl")                                              # 4,48
    r = g.reshape(f, (4, 8, -1), name="rs")
    y = g.linear(g.flatten(r, name="fl2"), 5, name="fc")
    g64, inputs, params, v = run_single(g, y)
    A, B = inputs["a"], inputs["b"]
    cat = np.concatenate([np.maximum(A, 0), np.where(B > 0, B, 0.2 * B)], axis=1)
    s = cat + 1 / (1 + np.exp(-cat))
    flat = np.tanh(s).reshape(4, -1)
    want = flat @ params["fc.weight"] + params["fc.bias"]
    assert v["rs"].shape == (4, 8, 6)
    np.testing.assert_allclose(v["fc"], want, rtol=1e-12)
    if torch is not None:
        np.testing.assert_allclose(run_torch(g64, inputs, params)["fc"], want, rtol=1e-12)


def test_sigmoid_is_stable_at_extremes():
    g = gc.Graph("t")
    y = g.sigmoid(g.input("x", (4,)))
    g.output(y)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out = gc.compile(g)(np.array([-1e4, -50, 50, 1e4], np.float32))
    np.testing.assert_allclose(out, [0, 1 / (1 + np.exp(50)), 1 / (1 + np.exp(-50)), 1], rtol=1e-6)


@pytest.mark.parametrize("loss", ["cross_entropy", "hinge_loss"])
def test_losses(loss):
    g = gc.Graph("t")
    s = g.input("s", ("N", 7))
    y = g.input("y", ("N",), dtype="int64")
    g.output(getattr(g, loss)(s, y, name="L"))
    g64 = gc.cast(g, "float64")
    S = RNG.standard_normal((9, 7)) * 4
    Y = RNG.integers(0, 7, 9)
    got = gc.compile(g64)(S, Y)
    want = cross_entropy_naive(S, Y) if loss == "cross_entropy" else hinge_naive(S, Y)
    assert got.shape == ()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    if torch is not None:
        np.testing.assert_allclose(run_torch(g64, {"s": S, "y": Y}, {})["L"], want, rtol=1e-12)


def test_float32_and_float64_graphs_agree():
    from graphconv.models import lenet5
    g32 = lenet5()
    params = gc.init_params(g32, seed=3)
    x = RNG.standard_normal((5, 1, 28, 28)).astype(np.float32)
    y32 = gc.compile(g32)(x, params=params)
    y64 = gc.compile(g32, dtype="float64")(x.astype(np.float64), params={k: v.astype(np.float64) for k, v in params.items()})
    assert y32.dtype == np.float32 and y64.dtype == np.float64
    np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-5)


def test_avg_pool_divisor_override_and_batch_norm_single_value():
    g = gc.Graph("t", "float64")
    x = g.input("x", (2, 3, 6, 6))
    g.output(g.avg_pool2d(x, 3, stride=2, padding=1, divisor_override=4, name="p"))
    data = RNG.standard_normal((2, 3, 6, 6))
    got = gc.compile(g)(data)
    sums = pool_naive(data, "avg", (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), (3, 3)) * 9   # count_include_pad
    np.testing.assert_allclose(got, sums / 4, rtol=1e-12)
    if torch is not None:
        np.testing.assert_allclose(run_torch(g, {"x": data}, {})["p"], got, rtol=1e-12)
    results = check_rule("avg_pool2d", [data], g.node("p").attrs, RNG)
    assert all(r.ok for r in results)
    b = gc.Graph("bn")
    b.output(b.batch_norm1d(b.input("x", ("N", 4)), name="bn1"))
    with pytest.raises(gc.InputError, match=r"bn1 \[batch_norm\]: batch statistics need more than one value per channel"):
        gc.compile(b)(np.ones((1, 4), np.float32), params=gc.init_params(b))


def test_mul_against_numpy_and_torch():
    g = gc.Graph("gate")
    x = g.input("x", (2, 3, 4, 4))
    h = g.conv2d(x, 4, 3, padding=1, name="c")
    s = g.param("scale", (4,), ("uniform", 1.0))
    y = g.mul(g.mul(g.sigmoid(h, name="sg"), h, name="gated"), s, name="scaled")
    g64, inputs, params, v = run_single(g, y)
    sig = 1 / (1 + np.exp(-v["c"]))
    want = sig * v["c"] * params["scale"].reshape(1, 4, 1, 1)
    np.testing.assert_allclose(v["scaled"], want, rtol=1e-12)
    if torch is not None:
        np.testing.assert_allclose(run_torch(g64, inputs, params)["scaled"], want, rtol=1e-12)
    rows = {line.split("|")[1].strip(): line.split("|") for line in g.summary().splitlines() if line.startswith("|")}
    assert rows["scaled"][5].strip() == "4" and rows["Total"][5].strip() == "116"   # the scale's 4 params count


@pytest.mark.skipif(torch is None, reason="PyTorch not installed")
@pytest.mark.parametrize("nd,spatial,out", [(1, (12,), 3), (2, (12, 8), (3, 2)), (2, (6, 6), 1), (3, (4, 6, 8), (2, 3, 4)),
                                            (1, (10,), 3), (2, (7, 5), (3, 2)), (2, (6, 6), (4, 4)),
                                            (3, (5, 4, 3), (2, 3, 2))])     # windows of two sizes, overlapping
def test_adaptive_and_global_pools_equal_pytorchs(nd, spatial, out):
    F = torch.nn.functional
    g = gc.Graph("adaptive", "float64")
    x = g.input("x", ("N", 3, *spatial))
    g.output(getattr(g, f"adaptive_avg_pool{nd}d")(x, out, name="aa"), getattr(g, f"adaptive_max_pool{nd}d")(x, out, name="am"),
             g.global_avg_pool(x, name="gap"))
    xv = np.random.default_rng(nd).standard_normal((2, 3, *spatial))
    got = gc.compile(g).run({"x": xv}, {})
    t = torch.from_numpy(xv)
    np.testing.assert_allclose(got["aa"], getattr(F, f"adaptive_avg_pool{nd}d")(t, out).numpy(), rtol=1e-12)
    np.testing.assert_array_equal(got["am"], getattr(F, f"adaptive_max_pool{nd}d")(t, out).numpy())
    np.testing.assert_allclose(got["gap"], getattr(F, f"adaptive_avg_pool{nd}d")(t, 1).numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.skipif(torch is None, reason="PyTorch not installed")
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_adaptive_pools_with_uneven_windows_match_torch_autograd_ties_included(mode):
    """Gradients against PyTorch's autograd on small integers (many ties: the max goes to the first of
    equal maxima, as PyTorch's scan), and as ops of their own (a plain pool where windows are equal)."""
    g = gc.Graph("adaptive", "float64")
    x = g.input("x", (2, 3, 7, 5))
    g.output(getattr(g, f"adaptive_{mode}_pool2d")(x, (3, 2), name="p"))
    assert g.node("p").op == f"adaptive_{mode}_pool2d"
    xv = np.random.default_rng(5).integers(0, 3, (2, 3, 7, 5)).astype(np.float64)
    dy = np.random.default_rng(6).standard_normal((2, 3, 3, 2))
    from graphconv.ops import OPS
    dx = OPS[f"adaptive_{mode}_pool2d_backward"].reference(
        [dy] if mode == "avg" else [xv, dy], {"output_size": (3, 2), "input_size": (7, 5)})
    t = torch.tensor(xv, requires_grad=True)
    getattr(torch.nn.functional, f"adaptive_{mode}_pool2d")(t, (3, 2)).backward(torch.tensor(dy))
    np.testing.assert_allclose(dx, t.grad.numpy(), rtol=1e-13, atol=1e-15)


def test_adaptive_pools_refuse_what_they_cannot_compute():
    g = gc.Graph("adaptive")
    x = g.input("x", ("N", 3, 12, "W"))
    with pytest.raises(gc.GraphError, match=r"output_size is a positive int or 2 of them \(None: keep that axis's "
                                            r"size\), got \(2, 0\)"):
        g.adaptive_avg_pool2d(x, (2, 0))
    with pytest.raises(gc.GraphError, match=r"output_size \(2, None\): None keeps the input's size, which is "
                                            r"symbolic here \(\[12,W\]\); give that size as a number"):
        g.adaptive_avg_pool2d(x, (2, None))
    assert len(list(g.topo())) == 1                      # nothing was added
    kept = gc.Graph("kept", "float64")
    xv = np.random.default_rng(1).standard_normal((2, 3, 7, 5))
    kept.output(kept.adaptive_max_pool2d(kept.input("x", (2, 3, 7, 5)), (None, 3), name="p"))   # PyTorch's None
    assert kept.node("p").attrs["output_size"] == (7, 3)
    np.testing.assert_array_equal(gc.compile(kept)(xv, params={}),
                                  torch.nn.functional.adaptive_max_pool2d(torch.tensor(xv), (None, 3)).numpy())
    g.output(g.flatten(g.adaptive_avg_pool2d(g.conv2d(x, 2, 1), 2, name="p")))   # symbolic W: fine forward (below)
    from graphconv.autodiff import derive_backward
    from graphconv.training import attach_loss
    with pytest.raises(gc.ShapeError, match=r"p \[adaptive_avg_pool2d\]: the spatial size W is symbolic; "
                                            r"adaptive_avg_pool2d's gradient needs it known \(give it a size: --dim on the "
                                            r"command line, graphconv.passes.bind_dims in Python\)"):
        derive_backward(attach_loss(g, "cross_entropy"))


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_adaptive_pools_take_symbolic_sizes_and_become_plain_pools_when_bound(mode):
    """A fully convolutional net with a global pool on symbolic H, W: the output size is known, a run
    binds the sizes (PyTorch's windows, even or not), and bind_dims makes the plain pool the builder
    would have made for sizes that divide (so it fuses with the conv)."""
    from graphconv.passes import bind_dims
    g = gc.Graph("fcn", "float64")
    x = g.input("x", ("N", 3, "H", "W"))
    g.output(getattr(g, f"adaptive_{mode}_pool2d")(g.relu(g.conv2d(x, 4, 3, padding=1, name="c")), (2, 3), name="p"))
    assert g.node("p").op == f"adaptive_{mode}_pool2d" and g.node("p").shape[2:] == (2, 3)
    auto = [gc.Graph("n"), gc.Graph("n")]                # an unnamed one is named as the plain pool it may become
    for a, shape in zip(auto, (("N", 3, "H", "W"), ("N", 3, 8, 8))):
        getattr(a, f"adaptive_{mode}_pool2d")(a.input("x", shape), 2)
    assert [[n.name for n in a.topo()] for a in auto] == [["x", "pool1"], ["x", "pool1"]]
    params = gc.init_params(g)
    for hw in ((8, 9), (7, 5)):
        xv = np.random.default_rng(sum(hw)).standard_normal((2, 3, *hw))
        built = gc.Graph("fcn", "float64")
        h = built.relu(built.conv2d(built.input("x", ("N", 3, *hw)), 4, 3, padding=1, name="c"))
        built.output(getattr(built, f"adaptive_{mode}_pool2d")(h, (2, 3), name="p"))
        bound = bind_dims(g, {"H": hw[0], "W": hw[1]})
        assert bound.node("p").op == built.node("p").op == (f"{mode}_pool2d" if hw == (8, 9) else f"adaptive_{mode}_pool2d")
        assert bound.node("p").attrs == built.node("p").attrs
        want = gc.compile(built).run({"x": xv}, params)["p"]
        for graph in (g, bound):                    # a mean and a sum / count: an ulp apart at most
            np.testing.assert_allclose(gc.compile(graph).run({"x": xv}, params)["p"], want, rtol=1e-15, atol=1e-16)


@pytest.mark.parametrize("shape, dim", [((4, 10), 1), ((2, 3, 5, 4), 1), ((2, 3, 5, 4), -1), ((6,), 0)])
def test_softmax_and_log_softmax_against_numpy_and_torch(shape, dim):
    g = gc.Graph("sm")
    x = g.input("x", shape)
    p = g.softmax(x, dim=dim, name="p")
    g64, inputs, params, v = run_single(g, g.log_softmax(x, dim=dim, name="lp"), inputs={"x": 30 * RNG.standard_normal(shape)})
    xv = inputs["x"]
    e = np.exp(xv - xv.max(axis=dim, keepdims=True))    # scores of +-60: a naive exp(x) / sum would still fit; shifted here
    want = e / e.sum(axis=dim, keepdims=True)
    np.testing.assert_allclose(v["p"], want, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(v["lp"], np.log(want), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(v["p"].sum(axis=dim), 1.0, rtol=1e-12)
    if torch is not None:
        t = run_torch(g64, inputs, params)
        np.testing.assert_allclose(t["p"], v["p"], rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(t["lp"], v["lp"], rtol=1e-12, atol=1e-12)


def test_log_softmax_stays_finite_where_softmax_underflows():
    g = gc.Graph("sm")
    x = g.input("x", (1, 3))
    p = g.softmax(x, name="p")
    _, _, _, v = run_single(g, g.log_softmax(x, name="lp"), inputs={"x": np.array([[0.0, -800.0, 800.0]])})
    assert v["p"][0, 1] == 0.0 and v["p"][0, 2] == 1.0
    np.testing.assert_allclose(v["lp"][0], [-800.0, -1600.0, 0.0])


@pytest.mark.parametrize("bad, message", [
    (dict(dim=2), r"s \[softmax\]: dim 2 is out of range for a 2-D input \(valid: -2\.\.1\)"),
    (dict(dim=1.0), r"s \[softmax\]: dim must be an int, got 1\.0"),
])
def test_softmax_bad_dim_names_the_layer(bad, message):
    g = gc.Graph("sm")
    with pytest.raises(gc.GraphConvError, match=message):
        g.softmax(g.input("x", ("N", 4)), name="s", **bad)


@pytest.mark.parametrize("dim, keepdim", [(None, False), ((2, 3), False), (1, True), (0, False), (-1, True)])
def test_mean_against_numpy_and_torch(dim, keepdim):
    g = gc.Graph("m")
    x = g.input("x", (2, 3, 4, 5))
    g64, inputs, params, v = run_single(g, g.mean(x, dim=dim, keepdim=keepdim, name="m"))
    want = inputs["x"].mean(axis=dim if not isinstance(dim, int) else (dim,), keepdims=keepdim)
    np.testing.assert_allclose(v["m"], want, rtol=1e-13)
    assert v["m"].shape == want.shape == tuple(int(d) for d in g64.node("m").shape)
    if torch is not None:
        np.testing.assert_allclose(run_torch(g64, inputs, params)["m"], want, rtol=1e-13)


def test_mse_loss_against_numpy_and_torch_forward_and_gradients():
    g = gc.Graph("reg")
    x = g.input("x", ("N", 3, 6, 6))
    t = g.input("t", ("N", 4))
    pooled = g.mean(g.relu(g.conv2d(x, 4, 3, padding=1, name="c")), dim=(2, 3), name="gap")
    g.output(g.mse_loss(g.linear(pooled, 4, name="fc") - t * g.param("k", (), ("constant", 0.5)), t, name="loss"))
    g64 = gc.cast(g, "float64")
    params = gc.init_params(g64, seed=3)
    feed = {"x": RNG.standard_normal((3, 3, 6, 6)), "t": RNG.standard_normal((3, 4))}
    bwd = derive_backward(g64)
    ours = gc.compile(bwd).run(feed, params)
    v = gc.compile(g64).run(feed, params, keep=True)
    np.testing.assert_allclose(ours["loss"], np.mean((v["fc"] - 0.5 * feed["t"] - feed["t"]) ** 2), rtol=1e-13)
    if torch is not None:
        tensors = {k: torch.tensor(a, requires_grad=True) for k, a in params.items()}
        tensors.update({k: torch.tensor(a) for k, a in feed.items()})
        c = torch.nn.functional.conv2d(tensors["x"], tensors["c.weight"], tensors["c.bias"], padding=1)
        fc = torch.relu(c).mean(dim=(2, 3)) @ tensors["fc.weight"] + tensors["fc.bias"]
        loss = torch.nn.functional.mse_loss(fc - tensors["t"] * tensors["k"], tensors["t"])
        loss.backward()
        np.testing.assert_allclose(ours["loss"], loss.item(), rtol=1e-13)
        for name, grad in bwd.meta["grads"].items():
            np.testing.assert_allclose(ours[grad], tensors[name].grad.numpy(), rtol=1e-10, atol=1e-13, err_msg=name)


@pytest.mark.parametrize("build_it, message", [
    (lambda g, x: g.mean(x, dim=4, name="m"), r"m \[mean\]: dim=4 is out of range for a 4-D input"),
    (lambda g, x: g.mean(x, dim=(1, -3), name="m"), r"m \[mean\]: dim \(1, -3\) names an axis twice"),
    (lambda g, x: g.mean(x, dim=1.5, name="m"), r"m \[mean\]: dim must be None, an int or a tuple of ints, got 1\.5"),
    (lambda g, x: g.mean(x, dim=(), name="m"), r"m \[mean\]: dim=\(\) reduces nothing"),
    (lambda g, x: g.mse_loss(x, g.input("t", ("N", 3)), name="l"),
     r"l: target has shape \[N,3\] but the prediction \[N,3,4,5\]; mse_loss compares them element by element"),
])
def test_mean_and_mse_loss_bad_input_names_the_layer(build_it, message):
    g = gc.Graph("m")
    x = g.input("x", ("N", 3, 4, 5))
    with pytest.raises(gc.GraphConvError, match=message):
        build_it(g, x)
    assert [n.name for n in g.topo()] == ["x"] or "t" in g     # nothing of the failed layer was left


UPSAMPLE_CASES = [
    ((2, 3, 5, 4), dict(scale_factor=2)),
    ((2, 3, 5, 4), dict(size=(7, 9))),                                   # nearest, ratios 5/7 and 4/9
    ((2, 3, 5, 4), dict(size=(3, 2))),                                   # nearest down
    ((2, 3, 5, 4), dict(scale_factor=2, mode="bilinear")),
    ((2, 3, 5, 4), dict(size=(7, 9), mode="bilinear")),
    ((2, 3, 5, 4), dict(size=(3, 3), mode="bilinear")),                  # down
    ((2, 3, 5, 4), dict(size=(7, 9), mode="bilinear", align_corners=True)),
    ((2, 3, 5, 4), dict(size=(1, 1), mode="bilinear", align_corners=True)),
    ((2, 2, 6), dict(scale_factor=3, mode="linear")),
    ((1, 2, 3, 4, 2), dict(size=(5, 5, 3), mode="trilinear")),
    ((1, 2, 3, 4, 2), dict(scale_factor=(1, 2, 3))),
]


@pytest.mark.parametrize("shape, kw", UPSAMPLE_CASES, ids=lambda c: str(c))
def test_upsample_against_torch_interpolate(shape, kw):
    g = gc.Graph("u")
    x = g.input("x", shape)
    g64, inputs, params, v = run_single(g, g.interpolate(x, name="u", **kw))
    if kw.get("mode", "nearest") == "nearest":     # a gather: every output is an input value
        assert np.isin(v["u"], inputs["x"]).all()
    if torch is not None:
        np.testing.assert_allclose(run_torch(g64, inputs, params)["u"], v["u"], rtol=1e-13, atol=1e-14)


@pytest.mark.skipif(torch is None, reason="needs PyTorch")
@pytest.mark.parametrize("shape, kw", [((1, 1, 4, 4), dict(scale_factor=2, mode="bilinear")),
                                       ((1, 1, 4, 4), dict(size=(7, 9), mode="bilinear", align_corners=True)),
                                       ((1, 2, 5), dict(scale_factor=3, mode="linear")),
                                       ((1, 1, 3, 4, 2), dict(size=(5, 5, 3), mode="trilinear"))], ids=str)
def test_an_inf_upsamples_where_pytorch_puts_it_not_along_whole_rows(shape, kw):
    """The linear modes read two inputs per axis: an inf reaches the outputs that read it (NaN only where
    a read's weight is exactly 0, as in PyTorch), not every output of its row and column as a product
    with a dense interpolation matrix would make it."""
    g = gc.Graph("u")
    g.output(g.interpolate(g.input("x", shape), name="u", **kw))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x.flat[0], x.flat[5] = np.inf, -np.inf
    want = torch.nn.functional.interpolate(torch.tensor(x), **kw).numpy()
    got = gc.compile(g)(x, params={})
    assert np.isinf(got).sum() == np.isinf(want).sum() > 0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)          # inf and NaN where torch has them


@pytest.mark.parametrize("call, message", [
    (dict(), r"up \[upsample\]: give exactly one of size and scale_factor"),
    (dict(size=4, scale_factor=2), r"up \[upsample\]: give exactly one of size and scale_factor"),
    (dict(scale_factor=1.5), r"up \[upsample\]: scale_factor is a whole number >= 1 or 2 of them, got 1\.5 \(for other ratios give the output size\)"),
    (dict(size=(4, 4, 4)), r"up \[upsample\]: size is a positive int or 2 of them, got \(4, 4, 4\)"),
    (dict(size=(4, 0)), r"up \[upsample\]: size must be positive ints, got \(4, 0\)"),
    (dict(size=4, mode="cubic"), r"up \[upsample\]: mode must be one of nearest, linear, bilinear, trilinear, got 'cubic'"),
    (dict(size=4, mode="trilinear"), r"up \[upsample\]: mode 'trilinear' is for 3-D inputs .*got 4-D \[N,3,5,4\]"),
    (dict(size=4, align_corners=True), r"up \[upsample\]: align_corners applies to the linear modes only"),
    (dict(size=4, mode="bilinear", align_corners="False"), r"up \[upsample\]: align_corners must be True or False, got 'False'"),
])
def test_upsample_bad_input_names_the_layer(call, message):
    g = gc.Graph("u")
    x = g.input("x", ("N", 3, 5, 4))
    with pytest.raises(gc.GraphConvError, match=message):
        g.upsample(x, name="up", **call)
    assert "up" not in g


def test_upsample_of_a_symbolic_size_by_a_scale_is_refused_and_to_a_size_is_bound_later():
    """scale_factor needs the input's size to give the output's; a size= does not: the graph builds
    and runs on numpy at any input size, and its gradient (which needs the input size) is refused
    until the size is bound (--dim), then derived."""
    from graphconv.passes import bind_dims
    from graphconv.pipeline import build
    g = gc.Graph("u")
    x = g.input("x", ("N", 3, "H", "W"))
    with pytest.raises(gc.GraphConvError, match=r"up \[upsample\]: the spatial size \[H,W\] is symbolic; upsampling "
                                                 r"by scale_factor needs it known while the graph is built: give the "
                                                 r"input's spatial sizes as numbers, or upsample to a size="):
        g.upsample(x, scale_factor=2, name="up")
    up = g.upsample(g.conv2d(x, 2, 1, name="c"), size=(6, 4), mode="bilinear", name="up")
    g.output(g.linear(g.flatten(up), 3, name="fc"))
    assert [str(d) for d in up.shape] == ["N", "2", "6", "4"]
    params = gc.init_params(g, seed=0)
    for size in ((3, 2), (9, 5)):
        xs = np.random.default_rng(0).standard_normal((2, 3, *size)).astype(np.float32)
        assert gc.compile(g).run({"x": xs}, params)["fc"].shape == (2, 3)
    with pytest.raises(gc.GraphConvError, match=r"the spatial size H is symbolic; upsampling needs it known "
                                                 r"\(give it a size: --dim"):
        build(g, "train")
    bound = bind_dims(g, {"H": 5, "W": 3})
    assert [str(d) for d in bound.node("up").shape] == ["N", "2", "6", "4"]
    assert any(n.op == "upsample_backward" for n in build(bound, "train").topo())


CONV_TRANSPOSE_CASES = [
    # nd, C_in, C_out, spatial, builder keywords
    (2, 4, 6, (5, 4), dict(kernel_size=3, stride=2, padding=1, output_padding=1)),
    (2, 4, 6, (5, 4), dict(kernel_size=(3, 2), stride=1, padding=(1, 0))),
    (1, 4, 6, (7,), dict(kernel_size=2, stride=3, dilation=2, groups=2, output_padding=2)),
    (3, 2, 3, (3, 4, 2), dict(kernel_size=(3, 2, 2), stride=(1, 2, 1), padding=(1, 0, 0), output_padding=(0, 1, 0),
                              bias=False)),
]


@pytest.mark.parametrize("case", CONV_TRANSPOSE_CASES, ids=lambda c: f"conv_transpose{c[0]}d")
def test_conv_transpose_against_torch_and_as_the_adjoint_of_conv(case):
    nd, c_in, c_out, spatial, kw = case
    g = gc.Graph("d")
    x = g.input("x", (2, c_in, *spatial))
    g64, inputs, params, v = run_single(g, getattr(g, f"conv_transpose{nd}d")(x, c_out, name="up", **kw))
    if torch is not None:
        np.testing.assert_allclose(run_torch(g64, inputs, params)["up"], v["up"], rtol=1e-12, atol=1e-13)
        layer = getattr(torch.nn, f"ConvTranspose{nd}d")(c_in, c_out, **kw).double()
        assert tuple(layer.weight.shape) == params["up.weight"].shape             # PyTorch's weight layout
    # the adjoint: <conv_transpose(x), z> = <x, conv(z)> for the conv with the same weight, no bias
    node = g64.node("up")
    z = RNG.standard_normal(v["up"].shape)
    conv = {k: node.attrs[k] for k in ("stride", "padding", "dilation", "groups")}
    w = params["up.weight"]
    from graphconv.ops import OPS
    y = v["up"] - (params["up.bias"].reshape((1, -1) + (1,) * nd) if "up.bias" in params else 0)
    conv_z = OPS[f"conv{nd}d"].reference([z, w], {**conv, "padding_mode": "zeros"})
    np.testing.assert_allclose(np.vdot(y, z), np.vdot(inputs["x"], conv_z), rtol=1e-11)


@pytest.mark.parametrize("kw, message", [
    (dict(kernel_size=3, stride=2, output_padding=2), r"up \[conv_transpose2d\]: output_padding \(2, 2\) must be smaller than the stride \(2, 2\)"),
    (dict(kernel_size=3, padding="same"), r"up \[conv_transpose2d\]: padding must be ints .* got 'same'"),
    (dict(kernel_size=3, groups=3), r"up \[conv_transpose2d\]: groups=3 does not divide in_channels=4"),
    (dict(kernel_size=2, padding=3), r"up \[conv_transpose2d\]: the output along H would have size -3: padding 3 is too large for an input of 2"),
    (dict(kernel_size=3, output_size=5), r"up \[conv_transpose2d\]: conv_transpose2d has no attribute 'output_size' \(did you mean 'output_padding'\?\)"),
])
def test_conv_transpose_bad_input_names_the_layer(kw, message):
    g = gc.Graph("d")
    x = g.input("x", ("N", 4, 2, 2))
    with pytest.raises(gc.GraphConvError, match=message):
        g.conv_transpose2d(x, 6, name="up", **kw)
    assert "up" not in g and "up.weight" not in g


def test_dropout_keeps_one_minus_p_scales_them_and_is_the_identity_in_eval():
    from graphconv.ops.dropout import keep_mask
    g = gc.Graph("dr")
    x = g.input("x", (64, 32, 8))
    g64, inputs, params, v = run_single(g, g.dropout(x, p=0.3, name="d"), inputs={"x": np.ones((64, 32, 8))})
    y = v["d"]
    assert set(np.unique(y)) <= {0.0, 1 / 0.7}
    kept = (y != 0).mean()
    n = y.size
    assert abs(kept - 0.7) < 4 * np.sqrt(0.7 * 0.3 / n)              # binomial: within 4 sigma
    if torch is not None:                                             # PyTorch's scaling of the kept elements
        t = torch.nn.functional.dropout(torch.ones(1000, dtype=torch.float64), 0.3, training=True)
        assert set(np.unique(t.numpy())) <= {0.0, 1 / 0.7}
    # a pure function of (seed, layer, step, index): again the same; another step, layer or seed differs
    again = gc.compile(g64).run(inputs, params)["d"]
    assert np.array_equal(again, y)
    masks = [keep_mask(1000, 0, 1, 0, 0.5), keep_mask(1000, 0, 1, 1, 0.5), keep_mask(1000, 0, 2, 0, 0.5),
             keep_mask(1000, 5, 1, 0, 0.5)]
    for other in masks[1:]:
        assert 0.35 < (masks[0] != other).mean() < 0.65                # independent-looking draws
    # eval mode and p = 0: the identity, as nn.Dropout
    ev = gc.set_training(g64, False)
    np.testing.assert_array_equal(gc.compile(ev).run(inputs, params)["d"], inputs["x"])
    if torch is not None:
        np.testing.assert_array_equal(run_torch(ev, inputs, params)["d"], inputs["x"])


@pytest.mark.parametrize("kw, message", [
    (dict(p=1.0), r"d \[dropout\]: p must be in \[0, 1\) \(the probability of dropping an element\), got 1\.0"),
    (dict(p=-0.1), r"d \[dropout\]: p must be in \[0, 1\)"),
    (dict(p="0.5"), r"d \[dropout\]: p must be a number, got '0\.5'"),
    (dict(seed=-1), r"d \[dropout\]: seed must be an int in \[0, 2\^32\), got -1"),
    (dict(training="yes"), r"d \[dropout\]: training must be True or False, got 'yes'"),
    (dict(p=1e-9), r"d \[dropout\]: p=1e-09 is below the mask's resolution of 2\^-24 \(it would drop nothing\)"),
])
def test_dropout_bad_input_names_the_layer(kw, message):
    g = gc.Graph("dr")
    x = g.input("x", ("N", 8))
    with pytest.raises(gc.GraphConvError, match=message):
        g.dropout(x, name="d", **kw)
    assert "d" not in g and "dropout.step" not in g                  # the failed layer left nothing behind


@pytest.mark.parametrize("backend", ["numpy", "host"])
def test_a_step_counter_that_is_not_a_whole_number_it_can_count_is_refused(backend):
    """dropout.step (and Adam's opt.step) given as NaN, inf, negative, fractional or past 2^24 in
    float32 (where + 1 no longer changes it: every later step would draw the same masks): one error
    naming the buffer, on every backend, where numpy raised a raw ValueError and the kernels drew a mask."""
    g = gc.Graph("dr")
    g.output(g.dropout(g.input("x", ("N", 8)), p=0.5, name="d"))
    run = gc.compile(g, backend=backend)
    x = np.ones((2, 8), np.float32)
    assert run.run({"x": x}, {"dropout.step": np.array(2.0 ** 24 - 1, np.float32)})["d"].shape == (2, 8)
    for bad in (np.nan, np.inf, -1.0, 2.5, 2.0 ** 24):
        with pytest.raises(gc.InputError, match=r"dropout\.step: a step counter must be a whole number in "
                                                r"\[0, 2\^24\) \(what float32 counts exactly\), got "):
            run.run({"x": x}, {"dropout.step": np.array(bad, np.float32)})


def test_chunked_convolutions_and_max_pool_backward_equal_the_whole_batch(monkeypatch):
    """Large im2col matrices (and max-pool backward's passes) go a few images at a time for the
    cache: the same numbers as the whole batch at once (the weight gradient's chunk sums aside)."""
    import graphconv.ops.conv as conv
    import graphconv.ops.pool as pool
    from graphconv.ops import OPS
    x, w, dy = RNG.standard_normal((9, 3, 8, 7)), RNG.standard_normal((4, 3, 3, 2)), RNG.standard_normal((9, 4, 8, 8))
    pads = ((1, 1), (1, 1))

    def run():
        return (conv.conv_nd(x, w, None, (1, 1), pads, (1, 1), 1), conv.conv_backward_weight(x, dy, (3, 2), (1, 1), pads, (1, 1), 1),
                conv.conv_backward_data(dy, w, (8, 7), (1, 1), pads, (1, 1), 1),
                conv.conv_backward_data(RNG.standard_normal((9, 4, 4, 4)) * 0 + 1, w, (8, 7), (2, 2), pads, (1, 1), 1),
                OPS["max_pool2d_backward"].reference([x, dy[:, :3, :4, :3]], OPS["max_pool2d"].check_attrs({"kernel_size": 2})))
    whole = run()
    monkeypatch.setattr(conv, "COLUMNS_BYTES", 2000)
    monkeypatch.setattr(pool, "CHUNK_BYTES", 1000)
    assert conv.images_per_chunk(x, (3, 2), (1, 1), pads, (1, 1)) < len(x)
    for a, b in zip(whole, run()):
        np.testing.assert_allclose(b, a, rtol=1e-13, atol=1e-13)


def test_scalars_on_either_side_and_global_pool_ranks_are_refused_by_the_layer():
    g = gc.Graph("u")
    a = g.input("a", (2, 8))
    for expr, op in ((lambda: 1.0 - a, "sub"), (lambda: 2.0 * a, "mul"), (lambda: 1 + a, "add"), (lambda: a - 1.0, "sub")):
        with pytest.raises(gc.GraphError, match=rf"{op}1: operand 1(\.0)? is not a tensor|{op}1: operand 2\.0 is not a tensor"):
            expr()
    with pytest.raises(gc.GraphError, match=r"gap: global_avg_pool expects an input \[N, C, \*spatial\] with 1 to 3 spatial axes, got \[2,8\]"):
        g.global_avg_pool(a, name="gap")
    x = g.input("x", ("N", 3, 4, 4))
    assert g.adaptive_avg_pool2d(x, np.int64(2), name="ap").shape[2:] == (2, 2)      # NumPy ints are ints


@pytest.mark.skipif(torch is None, reason="PyTorch not installed")
def test_a_per_channel_operand_first_in_sub_and_mul_lines_up_with_the_channels():
    """s - conv and s * h with s a [C] vector first: the reference broadcasts s along dim 1, as
    PyTorch does with s reshaped to [1, C, 1, 1] (the oracle now lines up either operand)."""
    g = gc.Graph("first", "float64")
    s = g.param("s", (4,), ("uniform", 1.0))
    h = g.sub(s, g.conv2d(g.input("x", ("N", 3, 6, 8)), 4, 3, name="c"), name="d")
    g.output(g.mul(s, h, name="m"))
    params = gc.init_params(g, seed=1)
    inputs = {"x": np.random.default_rng(0).standard_normal((2, 3, 6, 8))}
    want = run_torch(g, inputs, params)
    got = gc.compile(g).run(inputs, params, keep=True)
    for name in ("d", "m"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-12)
