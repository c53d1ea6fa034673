"""Shape rules: the output-size formula against PyTorch over a random sweep, symbolic dims, and
errors only when a mismatch is provable."""
import itertools

import numpy as np
import pytest
import sympy as sp

import graphconv as gc
from graphconv.shapes import symbol, window_out
from torch_oracle import torch

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch not installed")


def test_lecture_formulas():
    # (W - K + 2P) / S + 1 from the lecture
    assert window_out(7, 3, 1, 0, 0) == 5
    assert window_out(7, 3, 2, 0, 0) == 3
    assert window_out(32, 5, 1, 2, 2) == 32
    assert window_out(28, 2, 2, 0, 0) == 14


@needs_torch
def test_conv_and_pool_sizes_match_pytorch_sweep():
    rng = np.random.default_rng(0)
    F = torch.nn.functional
    checked = 0
    for _ in range(300):
        size, k, s, d = int(rng.integers(1, 20)), int(rng.integers(1, 6)), int(rng.integers(1, 4)), int(rng.integers(1, 3))
        p = int(rng.integers(0, k // 2 + 1))
        ceil = bool(rng.integers(0, 2))
        g = gc.Graph("t")
        x = g.input("x", (1, 1, size))
        try:
            ours_pool = g.max_pool1d(x, k, stride=s, padding=p, dilation=d, ceil_mode=ceil).shape[2]
        except gc.ShapeError:
            ours_pool = None
        try:
            theirs = F.max_pool1d(torch.zeros(1, 1, size), k, s, p, d, ceil_mode=ceil).shape[2]
        except RuntimeError:
            theirs = None
        assert ours_pool == theirs, (size, k, s, p, d, ceil)
        if theirs is not None:  # values too, for max and avg pooling, partial windows included
            data = rng.standard_normal((1, 1, size))
            inc = bool(rng.integers(0, 2))
            gv = gc.Graph("v", "float64")
            xv = gv.input("x", (1, 1, size))
            gv.output(gv.max_pool1d(xv, k, stride=s, padding=p, dilation=d, ceil_mode=ceil),
                      gv.avg_pool1d(xv, k, stride=s, padding=p, ceil_mode=ceil, count_include_pad=inc))
            got_max, got_avg = gc.compile(gv)(data)
            t = torch.from_numpy(data)
            np.testing.assert_allclose(got_max, F.max_pool1d(t, k, s, p, d, ceil_mode=ceil).numpy())
            np.testing.assert_allclose(got_avg, F.avg_pool1d(t, k, s, p, ceil_mode=ceil, count_include_pad=inc).numpy())
        try:
            ours_conv = g.conv1d(x, 1, k, stride=s, padding=p, dilation=d).shape[2]
        except gc.ShapeError:
            ours_conv = None
        try:
            theirs = F.conv1d(torch.zeros(1, 1, size), torch.zeros(1, 1, k), None, s, p, d).shape[2]
        except RuntimeError:
            theirs = None
        assert ours_conv == theirs, (size, k, s, p, d)
        checked += theirs is not None
    assert checked > 100


def test_batch_stays_symbolic_and_spatial_dims_may_be_symbolic():
    g = gc.Graph("t")
    x = g.input("x", ("N", 3, "H", "W"))
    y = g.conv2d(x, 8, 3, stride=2, padding=1)
    N, H, W = symbol("N"), symbol("H"), symbol("W")
    assert y.shape[0] == N
    assert sp.simplify(y.shape[2] - (sp.floor((H - 1) / 2) + 1)) == 0
    z = g.max_pool2d(y, 2, ceil_mode=True)
    assert z.shape[0] == N
    # bound at run time: the symbolic rule gives the same sizes as the arrays
    g.output(z)
    params = gc.init_params(g)
    for h, w in itertools.product((5, 8), (7, 12)):
        out = gc.compile(g)(np.zeros((2, 3, h, w), np.float32), params=params)
        want = [int(sp.sympify(d).subs({N: 2, H: h, W: w})) for d in z.shape]
        assert list(out.shape) == want


def test_sizes_are_displayed_in_a_shorter_form_of_the_same_value():
    """tidy (fmt_dim, summary) rewrites floors and ceilings for display: checked equal to the shape's
    own expression at every H in 1..32 over random chains of conv and pool windows."""
    from graphconv.shapes import fmt_dim, tidy, window_out
    H = symbol("H")
    assert fmt_dim(window_out(H, 3, 2, 1, 1)) == "ceiling(H/2)"
    assert fmt_dim(window_out(window_out(H, 2, 2, 0, 0), 2, 2, 0, 0)) == "floor(H/4)"
    rng = np.random.default_rng(7)
    shorter = 0
    for _ in range(16):
        size = H
        for _ in range(rng.integers(1, 4)):
            k, s, d = int(rng.integers(1, 6)), int(rng.integers(1, 4)), int(rng.integers(1, 3))
            p = int(rng.integers(0, (d * (k - 1)) // 2 + 1))
            size = window_out(size, k, s, p, p, d, ceil_mode=bool(rng.integers(0, 2)))
        shown = tidy(size)
        shorter += len(str(shown)) < len(str(size))
        assert len(str(shown)) <= len(str(size))
        for h in range(1, 33):                 # exact integers (floats round 13/3 - 7/3 up past 2)
            assert shown.subs(H, h) == size.subs(H, h), (size, shown, h)
    assert shorter > 3


def test_symbolic_mismatch_is_not_reported_unless_provable():
    g = gc.Graph("t")
    a = g.input("a", ("N", "C"))
    b = g.input("b", ("N", 4))
    s = g.add(a, b)          # C may be 4: no error at build time
    g.output(s)
    run = gc.compile(g)
    np.testing.assert_array_equal(run(np.ones((2, 4), np.float32), np.ones((2, 4), np.float32)), 2)
    with pytest.raises(gc.InputError):
        run(np.ones((2, 4), np.float32), np.ones((3, 4), np.float32))


def test_channels_must_be_concrete_for_layers_that_create_weights():
    g = gc.Graph("t")
    x = g.input("x", ("N", "C", 8, 8))
    with pytest.raises(gc.ShapeError, match=r"conv1 \[conv2d\]: dim 1 of the input is symbolic \(C\); give in_channels="):
        g.conv2d(x, 4, 3, name="conv1")
    y = g.conv2d(x, 4, 3, in_channels=3, name="conv1")
    assert y.shape[1] == 4


@needs_torch
@pytest.mark.parametrize("nd", [2, 3])
def test_conv_and_pool_values_match_pytorch_random_sweep(nd):
    """Random hyperparameters in 2-D and 3-D: shapes (or the refusal) and values agree with PyTorch."""
    F = torch.nn.functional
    rng = np.random.default_rng(nd)
    compared = 0
    for _ in range(40):
        groups = int(rng.choice([1, 2, 3]))
        c_in, c_out = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
        spatial = tuple(int(v) for v in rng.integers(3, 9 if nd == 2 else 6, nd))
        k = tuple(int(v) for v in rng.integers(1, 4, nd))
        s = tuple(int(v) for v in rng.integers(1, 3, nd))
        d = tuple(int(v) for v in rng.integers(1, 3, nd))
        p = tuple(int(v) for v in rng.integers(0, 3, nd))
        mode = str(rng.choice(["zeros", "reflect", "replicate", "circular"]))
        x = rng.standard_normal((2, c_in, *spatial))
        w = rng.standard_normal((c_out, c_in // groups, *k))
        g = gc.Graph("t", "float64")
        xi = g.input("x", x.shape)
        try:
            y = g.conv2d(xi, c_out, k, stride=s, padding=p, dilation=d, groups=groups, padding_mode=mode, bias=False) \
                if nd == 2 else g.conv3d(xi, c_out, k, stride=s, padding=p, dilation=d, groups=groups,
                                         padding_mode=mode, bias=False)
        except gc.ShapeError:
            y = None
        tx = torch.from_numpy(x)
        if mode != "zeros":
            flat = [v for pad in reversed(p) for v in (pad, pad)]
            try:
                tx = F.pad(tx, flat, mode=mode)
            except (RuntimeError, NotImplementedError):
                assert y is None, ("torch refuses the padding", mode, p, spatial)
                continue
        try:
            conv = getattr(F, f"conv{nd}d")
            want = conv(tx, torch.from_numpy(w), None, s, p if mode == "zeros" else 0, d, groups).numpy()
        except RuntimeError:
            assert y is None, (spatial, k, s, p, d)
            continue
        assert y is not None, (spatial, k, s, p, d, mode)
        g.output(y)
        got = gc.compile(g)(x, params={y.name + ".weight": w})
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
        compared += 1
    assert compared > 15
