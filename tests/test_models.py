"""Every bundled model builds, verifies, keeps the batch symbolic, runs on the numpy backend and
agrees with the same graph run by PyTorch; user models load from path:function."""
import textwrap

import numpy as np
import pytest
import sympy as sp

import graphconv as gc
from graphconv.models import MODELS, load
from torch_oracle import run_torch, torch

RNG = np.random.default_rng(7)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_runs_and_matches_torch(name):
    g = load(name)
    for node in g.topo():  # the batch stays a symbol through the whole graph
        if node.role in ("input", "op"):
            assert node.shape[0] == sp.Symbol("N", integer=True, positive=True), node.name
    g64 = gc.cast(g, "float64")
    params = gc.init_params(g64, seed=1)
    x = RNG.standard_normal([3] + [int(d) for d in g64.inputs[0].shape[1:]])
    values = gc.compile(g64).run({"x": x}, params, keep=True)
    out = values[g64.outputs[0]]
    assert np.isfinite(out).all() and out.shape[0] == 3
    if torch is not None:
        want = run_torch(g64, {"x": x}, params)
        for node in g64.topo():
            if node.role == "op":
                np.testing.assert_allclose(values[node.name], want[node.name], rtol=1e-9, atol=1e-10,
                                           err_msg=f"{name}:{node.name}")


def test_batch_norm_eval_mode_uses_running_statistics():
    g = load("vgg_small")
    params = gc.init_params(g)
    params["bn1_1.running_mean"] = np.full(32, 0.5, np.float32)
    x = RNG.standard_normal((2, 3, 32, 32)).astype(np.float32)
    train = gc.compile(g).run({"x": x}, params, keep=True)
    evals = gc.compile(g, training=False).run({"x": x}, params, keep=True)
    conv = train["conv1_1"]
    np.testing.assert_allclose(evals["bn1_1"], (conv - 0.5) / np.sqrt(1 + 1e-5), rtol=1e-5, atol=1e-6)
    assert abs(train["bn1_1"].mean()) < 1e-5  # batch statistics centre the batch


def test_user_model_from_path(tmp_path):
    src = tmp_path / "mynet.py"
    src.write_text(textwrap.dedent("""
        import graphconv as gc

        def tiny():
            g = gc.Graph("tiny")
            x = g.input("x", ("N", 2, 8))
            g.output(g.linear(g.flatten(g.relu(g.conv1d(x, 4, 3, padding=1, name="c"))), 3, name="fc"))
            return g

        def not_a_graph():
            return 42
    """))
    g = load(f"{src}:tiny")
    assert g.name == "tiny" and g.outputs == ["fc"]
    with pytest.raises(gc.GraphError, match="returned int, not a graphconv Graph"):
        load(f"{src}:not_a_graph")
    with pytest.raises(gc.GraphError, match="has no function 'nope'"):
        load(f"{src}:nope")
    with pytest.raises(gc.GraphError, match="does not exist"):
        load(f"{tmp_path}/missing.py:tiny")
    with pytest.raises(gc.GraphError, match="unknown model 'lenet'"):
        load("lenet")
