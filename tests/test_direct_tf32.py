"""The TF32 direct convolution (codegen/lowering/direct_tf32.py, direct_conv_tf32.cu.j2 and its filter
kernel): under tf32=True, stride-1 2-D convolutions with 2 x 2 cells and at least 8 input channels
multiply on mma.sync m16n8k8. NVRTC compiles them for sm_90 (HMMA in the machine code, no spills); the
host backend runs the same text, its emulation of mma.sync gathering every lane's fragment with the
GPU's own loads, with every output poisoned first. The oracle is an independent NumPy convolution of
the TF32-rounded operands (frexp rounding, float64 sums): the results must equal it to FP32 summation
noise, so a fragment layout, a tile or stage offset, a halo row or a rounding off by one element fails
(the TF32 tolerance of `check` would hide most of those)."""
import numpy as np
import pytest

import graphconv as gc
from codegen import nvrtc, sass
from codegen.lowering import direct_tf32
from codegen.program import Program
from codegen.runner import CompiledProgram
from graphconv.pipeline import build

from test_tf32 import tf32_round


def conv_net(spatial, C, M, kernel, padding, pool=None, transpose=False):
    g = gc.Graph("t", "float32")
    x = g.input("x", ("N", C, *spatial))
    if transpose:
        h = g.conv_transpose2d(x, M, kernel, padding=padding, name="conv")
    else:
        h = g.relu(g.conv2d(x, M, kernel, padding=padding, name="conv"))
    if pool == "max":
        h = g.max_pool2d(h, 2)
    elif pool == "avg":
        h = g.avg_pool2d(h, 2)
    g.output(h)
    return g


def reference(x, w, b, padding, pool, transpose):
    """The convolution of TF32-rounded x and w in float64 (PyTorch's layouts), then bias, ReLU, pool."""
    x, w = tf32_round(x), tf32_round(w)
    KH, KW = w.shape[2:]
    if transpose:      # stride 1: a convolution with the flipped filter, in and out channels swapped
        w = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
        padding = (KH - 1 - padding[0], KW - 1 - padding[1])
    xp = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (KH, KW), axis=(2, 3))    # b, c, y, x, r, s
    y = np.einsum("bcyxrs,mcrs->bmyx", windows, w) + b[None, :, None, None]
    if transpose:
        return y
    y = np.maximum(y, 0)
    if pool:
        B, M, H, W = y.shape
        cells = y[:, :, :H // 2 * 2, :W // 2 * 2].reshape(B, M, H // 2, 2, W // 2, 2)
        y = cells.max(axis=(3, 5)) if pool == "max" else cells.mean(axis=(3, 5))
    return y


CASES = [
    # spatial, C, M, kernel, padding, pool, transpose, batch
    ((8, 8), 128, 128, 3, 1, "max", False, 2),       # vgg conv3_2: two blocks of 64 channels per image
    ((12, 12), 16, 32, 3, 1, "max", False, 3),
    ((16, 16), 20, 64, 3, 1, None, False, 2),        # 3 stages of 8 channels, the last past C (src < (C - c0) ...)
    ((14, 14), 20, 50, 5, 2, "max", False, 2),       # LeNet conv2: 50 = 3 x 16 + 2 output channels
    ((9, 11), 9, 20, 3, 1, None, False, 3),          # odd plane: half cells, tiles past the output
    ((11, 10), 12, 24, (3, 5), (0, 2), "avg", False, 2),   # a 3 x 5 filter, no row padding, average pool
    ((10, 10), 8, 16, 3, 2, "max", False, 1),        # padding 2: a 12 x 12 output from a 10 x 10 input
    ((7, 9), 24, 40, 3, 1, None, True, 2),           # conv_transpose2d: the backward-data kernel, flipped filter
    ((13, 6), 40, 10, 5, 2, None, True, 3),          # 10 output channels in a 16-channel block
]


def tf32_direct(graph):
    return [s for s in Program(graph, tf32=True).kernels if s.template == "direct_conv_tf32.cu.j2"]


@pytest.mark.parametrize("spatial, C, M, kernel, padding, pool, transpose, batch", CASES)
def test_tf32_direct_convolutions_equal_numpy_on_tf32_rounded_operands(spatial, C, M, kernel, padding, pool,
                                                                         transpose, batch):
    graph = build(conv_net(spatial, C, M, kernel, padding, pool, transpose), "fused")
    assert len(tf32_direct(graph)) == 1, [s.name for s in Program(graph, tf32=True).kernels]
    rng = np.random.default_rng(C * M + batch)
    x = rng.standard_normal((batch, C, *spatial)).astype(np.float32)
    params = gc.init_params(graph, seed=batch)
    params["conv.bias"] = rng.standard_normal(params["conv.bias"].shape).astype(np.float32)
    w, b = params["conv.weight"], params["conv.bias"]
    got = CompiledProgram(graph, "host", poison=True, tf32=True).run({"x": x}, params)
    got = next(iter(got.values())).astype(np.float64)
    pads = padding if isinstance(padding, tuple) else (padding, padding)
    want = reference(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), pads, pool, transpose)
    assert got.shape == want.shape and np.isfinite(got).all()          # every output written (poisoned: NaN)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale)   # FP32 sums of the same products


def test_the_operands_are_rounded_not_passed_through():
    """The same convolution against the unrounded operands differs by TF32's rounding, not FP32's."""
    graph = build(conv_net((8, 8), 16, 16, 3, 1), "fused")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 8, 8)).astype(np.float32)
    params = gc.init_params(graph, seed=0)
    got = next(iter(CompiledProgram(graph, "host", poison=True, tf32=True).run({"x": x}, params).values()))
    w, b = params["conv.weight"].astype(np.float64), params["conv.bias"].astype(np.float64)
    fp32 = next(iter(CompiledProgram(graph, "host", poison=True).run({"x": x}, params).values()))
    rounded = reference(x.astype(np.float64), w, b, (1, 1), None, False)
    scale = np.abs(rounded).max()
    assert np.abs(got - rounded).max() <= 2e-6 * scale
    assert np.abs(got - fp32).max() >= 2e-5 * scale


def test_the_tiles_reach_their_edges():
    """The cases above cover: output channels past M in a block, input channels past C in the last
    stage, more than one stage, tiles past the output plane, 1 and 2 m-tiles per warp, the hoisted
    (plain input) and the per-stage (wider tile) staging, double-buffered stages and single-buffered
    ones, and a conv_transpose's flipped filter."""
    seen = set()
    for spatial, C, M, kernel, padding, pool, transpose, batch in CASES:
        p = tf32_direct(build(conv_net(spatial, C, M, kernel, padding, pool, transpose), "fused"))[0].params
        seen |= {k for k, hit in {
            "m past M": -(-M // p["OCB"]) * p["OCB"] > M, "c past C": p["CP"] // p["CC"] * p["CC"] > C and p["CC"] < p["CP"],
            "stages": p["CP"] > p["CC"], "tile past the plane": p["TILES_X"] * p["TCX"] > p["NCX"] or
            -(-p["NCY"] // p["TCY"]) * p["TCY"] > p["NCY"], "FM 1": p["FM"] == 1, "FM 2": p["FM"] == 2,
            "hoisted staging": p["staging"]["array"] is not None, "staging per stage": p["staging"]["array"] is None,
            "two buffers": p["buffers"] == 2, "one buffer, stages": p["buffers"] == 1 and p["CP"] > p["CC"],
            "transpose": transpose}.items() if hit}
    assert seen == {"m past M", "c past C", "stages", "tile past the plane", "FM 1", "FM 2", "hoisted staging",
                    "staging per stage", "two buffers", "one buffer, stages", "transpose"}


def test_fragment_reads_are_free_of_bank_conflicts():
    """Lane 4g + t of a fragment reads k-row t (t + 4) at column g: with the tiles' channel strides 8
    mod 16 words, the 32 lanes' words fall in 32 different banks, for every chosen shape."""
    for C, M, NCY, NCX, KH, KW in ((128, 128, 4, 4, 3, 3), (64, 64, 16, 16, 3, 3), (20, 50, 7, 7, 5, 5),
                                   (50, 20, 7, 7, 5, 5), (16, 32, 6, 6, 3, 3), (256, 256, 2, 2, 3, 3)):
        shape = direct_tf32.ideal(C, M, NCY, NCX, KH, KW)
        for stride in (shape["CSP"], shape["CWS"]):
            banks = {(t * stride + g) % 32 for g in range(8) for t in range(4)}
            assert len(banks) == 32, (C, M, stride)
        assert shape["CC"] % 8 == 0 and shape["CP"] % 8 == 0 and shape["CP"] >= C


def test_the_bundled_models_multiply_on_the_tensor_cores_and_the_machine_code_says_so():
    """Under tf32, every direct convolution of vgg_small and LeNet-5 with >= 8 input channels is a
    TF32 one (the 1- and 3-channel first layers stay FP32); each compiles for sm_90 without spills,
    and its main loop issues HMMA.1688.F32.TF32 and no FFMA."""
    from graphconv.models import MODELS
    for model, wanted in (("lenet5", 2), ("vgg_small", 10)):
        graph = build(MODELS[model](), "fused-train")
        specs = tf32_direct(graph)
        assert len(specs) >= wanted, (model, [s.name for s in specs])
        fp32 = [s for s in Program(graph, tf32=True).kernels if s.template == "direct_conv.cu.j2"]
        assert all(s.params["C"] < direct_tf32.LEAST_CHANNELS for s in fp32), [s.name for s in fp32]
        if not nvrtc.available():
            continue
        compiled = nvrtc.compile_many([(s.source, s.name) for s in specs])
        assert all(c.spill_stores == 0 and c.spill_loads == 0 for c in compiled)
        if sass.nvdisasm():
            for c in compiled[:3]:
                m = sass.mix(c.cubin)
                assert m["mma"] >= 72 and m["fma"] == 0, m


def test_every_copy_is_waited_for_before_the_barrier_that_publishes_it():
    """In the rendered source, every stretch between two barriers that issues copies waits for them after
    the last one (the double-buffered kernels' one barrier per stage included). The behavioural check
    is the host's late copies (test_tf32's races test: a missing wait reads the old buffer) and
    racecheck on a GPU; this one names the stretch."""
    from graphconv.models import MODELS
    specs = tf32_direct(build(MODELS["vgg_small"](), "fused-train"))
    assert {s.params["buffers"] for s in specs} == {1, 2}
    for spec in specs:
        body = spec.source[spec.source.index("extern \"C\""):]
        for stretch in body.split("__syncthreads();")[:-1]:
            if "gc_cp_async16(" in stretch:
                assert stretch.rindex("gc_cp_async_wait_all();") > stretch.rindex("gc_cp_async16("), spec.name


# ---- weight gradients on the tensor cores (direct_wgrad_tf32.py) ----------------------------------
def wgrad_net(spatial, C, M, kernel, padding):
    """conv -> flatten -> linear: the conv's output gradient is a plain tensor (no fused ReLU/pool to
    gather), which is what the TF32 weight gradient takes."""
    g = gc.Graph("wg", "float32")
    x = g.input("x", ("N", C, *spatial))
    g.output(g.linear(g.flatten(g.conv2d(x, M, kernel, padding=padding, name="conv")), 3, name="fc"))
    return g


WGRAD_CASES = [
    # spatial, C, M, kernel, padding, batches
    ((8, 8), 32, 32, 3, 1, (2,)),              # 2 x 2 warps, one tile per image
    ((12, 40), 9, 20, 3, 1, (1, 3)),           # two column tiles of 20 (padded to 24); channels past 9 and 20
    ((7, 5), 24, 10, (2, 3), (0, 1), (5,)),    # a 2 x 3 filter, one warp along m, 16 channels of 24 per block
    ((16, 16), 16, 48, 3, 0, (4,)),            # no padding: a 14 x 14 output
]


@pytest.mark.parametrize("spatial, C, M, kernel, padding, batches", WGRAD_CASES)
def test_tf32_weight_gradients_equal_numpy_on_tf32_rounded_operands(spatial, C, M, kernel, padding, batches):
    graph = build(wgrad_net(spatial, C, M, kernel, padding), "fused-train")
    specs = [s for s in Program(graph, tf32=True).kernels if s.template == "direct_wgrad_tf32.cu.j2"]
    assert len(specs) == 1, [s.name for s in Program(graph, tf32=True).kernels]
    node = next(n for n in graph.topo() if n.op == "conv2d_backward_weight")
    pads = padding if isinstance(padding, tuple) else (padding, padding)
    from graphconv.data import random_inputs
    for batch in batches:
        params = gc.init_params(graph, seed=batch)
        got = CompiledProgram(graph, "host", poison=True, tf32=True).run(random_inputs(graph, batch, batch), params,
                                                                         keep=True)
        x, dy = (got[name] if name in got else params[name] for name in graph.operands(node.name))
        x = np.pad(tf32_round(x), ((0, 0), (0, 0), (pads[0],) * 2, (pads[1],) * 2))
        KH, KW = got[node.name].shape[2:]
        windows = np.lib.stride_tricks.sliding_window_view(x, (KH, KW), axis=(2, 3))[:, :, :dy.shape[2], :dy.shape[3]]
        want = np.einsum("bcyxrs,bmyx->mcrs", windows, tf32_round(dy))
        scale = np.abs(want).max()
        assert np.isfinite(got[node.name]).all()
        np.testing.assert_allclose(got[node.name].astype(np.float64), want, rtol=0, atol=2e-6 * scale)
        fp32 = np.einsum("bcyxrs,bmyx->mcrs", np.lib.stride_tricks.sliding_window_view(
            np.pad(got[graph.operands(node.name)[0]] if graph.operands(node.name)[0] in got else params[graph.operands(node.name)[0]],
                   ((0, 0), (0, 0), (pads[0],) * 2, (pads[1],) * 2)).astype(np.float64), (KH, KW),
            axis=(2, 3))[:, :, :dy.shape[2], :dy.shape[3]], dy.astype(np.float64))
        assert np.abs(got[node.name] - fp32).max() >= 1e-5 * scale        # the operands were rounded


def test_the_tf32_weight_gradient_tiles_reach_their_edges():
    seen = set()
    for spatial, C, M, kernel, padding, batches in WGRAD_CASES:
        graph = build(wgrad_net(spatial, C, M, kernel, padding), "fused-train")
        spec = next(s for s in Program(graph, tf32=True).kernels if s.template == "direct_wgrad_tf32.cu.j2")
        p = spec.params
        seen |= {k for k, hit in {"m past M": -(-M // p["MB"]) * p["MB"] > M, "c past C": -(-C // p["CB"]) * p["CB"] > C,
                                  "padded columns": p["WBP"] > p["WB"], "column tiles": p["TILES_X"] > 1,
                                  "rows past the output": -(-p["OH"] // p["RB"]) * p["RB"] > p["OH"],
                                  "one warp along m": p["WARPS_M"] == 1, "splits": max(
                                      spec.launch_shape(b)[0][0] for b in batches) > 1}.items() if hit}
        for stride, residue, modulus in ((p["MBP"], 8, 16), (p["XS"], 4, 8)):
            assert stride % modulus == residue
    assert seen == {"m past M", "c past C", "padded columns", "column tiles", "rows past the output",
                    "one warp along m", "splits"}


def test_vgg_smalls_weight_gradients_multiply_on_the_tensor_cores():
    """vgg_small's convolutions feed batch norm, so their weight gradients read a plain dy: under tf32
    all but the 3-channel first layer's are TF32 (LeNet-5's, gathered through the ReLU/pool, stay FP32
    direct); each compiles for sm_90 without spills and its main loop issues HMMA and no FFMA."""
    from graphconv.models import MODELS
    specs = [s for s in Program(build(MODELS["vgg_small"](), "fused-train"), tf32=True).kernels
             if s.template == "direct_wgrad_tf32.cu.j2"]
    assert len(specs) == 5, [s.name for s in specs]
    lenet = Program(build(MODELS["lenet5"](), "fused-train"), tf32=True).kernels
    assert not any(s.template == "direct_wgrad_tf32.cu.j2" for s in lenet)
    if nvrtc.available():
        compiled = nvrtc.compile_many([(s.source, s.name) for s in specs])
        assert all(c.spill_stores == 0 and c.spill_loads == 0 for c in compiled)
        if sass.nvdisasm():
            for c in compiled:
                m = sass.mix(c.cubin)
                assert m["mma"] >= 18 and m["fma"] == 0, m


# shapes whose kernels ptxas once spilled (24 of a review's 700-kernel scan, at 72-168 registers of
# 255: without a blocks-per-SM bound in __launch_bounds__ ptxas spills to reach a higher occupancy;
# the last two also hoisted offsets for their one stage): each must compile clean
ONCE_SPILLED = [
    # spatial, C, M, kernel, padding, pool, transpose
    ((11, 31), 40, 10, 5, (3, 1), None, True), ((4, 26), 12, 15, 2, (1, 2), "max", False),
    ((10, 16), 200, 200, (3, 5), (1, 2), None, True), ((23, 30), 40, 24, (3, 5), (1, 3), "avg", False),
    ((8, 26), 20, 48, 5, (2, 0), "max", False), ((39, 22), 8, 1, (2, 3), (2, 0), "max", False),
    ((36, 26), 20, 8, 5, (1, 1), "avg", False), ((9, 33), 32, 48, (3, 5), (1, 1), None, False),
    ((10, 25), 65, 32, (3, 5), (3, 2), None, False), ((15, 27), 32, 32, (3, 5), (2, 3), None, True),
    ((17, 14), 16, 50, (3, 5), (1, 1), "avg", False), ((16, 18), 64, 33, (3, 5), (3, 1), None, False),
    ((20, 5), 8, 8, (3, 5), (2, 3), None, False), ((6, 9), 12, 16, 3, (0, 3), None, False),   # one stage
]


def test_shapes_that_once_spilled_compile_without_spilling():
    if not nvrtc.available():
        pytest.skip("NVRTC not installed")
    specs = [s for case in ONCE_SPILLED for s in tf32_direct(build(conv_net(*case), "fused"))]
    assert len(specs) == len(ONCE_SPILLED) and {s.params["buffers"] for s in specs} == {1, 2}
    compiled = nvrtc.compile_many([(s.source, s.name) for s in specs])     # raises on a spill
    assert all(c.spill_stores == 0 and c.spill_loads == 0 for c in compiled)


def test_tf32_weight_gradients_that_once_spilled_compile_without_spilling():
    if not nvrtc.available():
        pytest.skip("NVRTC not installed")
    # the first three without a blocks-per-SM bound, the last two with 16 loads in flight beside the
    # accumulators (a second review's scan: 35 of 577 kernels; 8 now)
    specs = [s for spatial, C, M, kernel, padding in (((14, 9), 11, 40, (2, 3), 1), ((9, 20), 57, 86, 3, (2, 1)),
                                                       ((22, 11), 103, 26, (2, 3), (1, 2)), ((2, 4), 126, 78, 3, (2, 0)),
                                                       ((3, 12), 74, 46, (1, 4), 0))
             for s in Program(build(wgrad_net(spatial, C, M, kernel, padding), "fused-train"), tf32=True).kernels
             if s.template == "direct_wgrad_tf32.cu.j2"]
    assert len(specs) == 5
    compiled = nvrtc.compile_many([(s.source, s.name) for s in specs])     # raises on a spill
    assert all(c.spill_stores == 0 and c.spill_loads == 0 for c in compiled)
