"""The depthwise convolution kernel (codegen/lowering/depthwise.py, depthwise_conv.cu.j2): every 2-D
convolution with one input channel per group and a group per channel, compiled by NVRTC for sm_90
and run on the host backend against NumPy with its output poisoned, over the shapes its tiling has
edges for: rows wider than a tile, several channels a block past the channels, channel multipliers,
strides, dilations, asymmetric ("same") padding, a fused epilogue with a full-size operand, float64."""
import numpy as np
import pytest

import graphconv as gc
from codegen.check import check_races
from codegen.lowering import depthwise
from codegen.program import Program
from graphconv.data import random_inputs
from graphconv.pipeline import build

from test_codegen_gemm import assert_kernels_match


def net(spatial, C, mult, kernel, dtype="float32", residual=False, **conv):
    g = gc.Graph("dw", dtype)
    x = g.input("x", ("N", C, *spatial))
    h = g.conv2d(x, C * mult, kernel, groups=C, name="dw", **conv)
    if residual:                          # an epilogue reading a full-size operand at the output's position
        h = g.add(h, g.conv2d(x, C * mult, 1, stride=conv.get("stride", 1), name="side"), name="add")
    g.output(g.relu(h, name="act"))
    return g


def depthwise_specs(graph):
    return [s for s in Program(graph).kernels if s.template == "depthwise_conv.cu.j2"]


CASES = [
    # spatial, C, mult, kernel, conv options, dtype, residual, batches
    ((9, 9), 3, 1, 3, {"padding": 1}, "float32", False, (1, 3)),                 # small planes: 3 channels a block
    ((7, 150), 2, 1, 3, {"padding": 1}, "float32", False, (2,)),                  # rows wider than a tile: 2 column tiles
    ((12, 11), 5, 3, (3, 5), {"padding": (1, 2), "bias": False}, "float32", False, (2,)),   # multiplier 3, no bias
    ((17, 19), 4, 1, 3, {"stride": 2, "padding": 1}, "float32", True, (2,)),      # stride 2 and a residual add
    ((16, 16), 6, 2, 3, {"dilation": 2, "padding": "same"}, "float32", False, (2,)),   # dilation, "same" padding
    ((10, 13), 3, 1, 4, {"padding": "same"}, "float64", False, (3,)),            # an even filter: uneven padding
    ((40, 40), 37, 1, 5, {"stride": (2, 3), "padding": 2}, "float32", False, (1,)),   # strides of two sizes
    ((6, 6), 9, 1, 3, {"padding": 1}, "float32", False, (2,)),                  # 7 channels a block: 2 blocks past 9
    ((23, 40), 2, 1, 3, {"padding": 1}, "float32", False, (2,)),                # 2 row tiles of 12 for 23 rows
]


@pytest.mark.parametrize("spatial, C, mult, kernel, conv, dtype, residual, batches", CASES)
def test_depthwise_convolutions_match_numpy(spatial, C, mult, kernel, conv, dtype, residual, batches):
    for stage in ("forward", "fused"):
        graph = build(net(spatial, C, mult, kernel, dtype, residual, **conv), stage)
        specs = depthwise_specs(graph)
        assert len(specs) == 1, [s.name for s in Program(graph).kernels]
        if stage == "fused":                  # the activation (and the add) run in its epilogue
            assert "relu" in specs[0].name and ("add" in specs[0].name) == residual
        for i, batch in enumerate(batches):
            results = assert_kernels_match(graph, batch=batch, seed=batch, compile_nvrtc=i == 0)
            assert any(r.node in ("dw", "act") and r.ok for r in results)


def test_edges_of_the_tiling_are_exercised():
    """The cases reach each edge the template guards: column tiles past the row, row tiles past the
    plane, channel blocks past the channels, several outputs per thread, and a multiplier > 1."""
    seen = set()
    for spatial, C, mult, kernel, conv, dtype, residual, _ in CASES:
        p = depthwise_specs(build(net(spatial, C, mult, kernel, dtype, residual, **conv), "fused"))[0].params
        seen |= {k for k, hit in {"columns past": p["TILES_X"] * p["TW"] > p["OW"],
                                  "rows past": p["TILES_Y"] * p["TYT"] > p["OH"],
                                  "channels past": p["NCB"] * p["CB"] > C, "channels a block": p["CB"] > 1,
                                  "outputs a thread": p["PX"] > 1, "multiplier": p["MULT"] > 1}.items() if hit}
    assert seen == {"columns past", "rows past", "channels past", "channels a block", "outputs a thread", "multiplier"}


def test_no_thread_reads_what_another_writes_unordered():
    """Tiles staged before a barrier and read after it, rewritten after the next, and the weight
    gradient's sums reduced through shared memory: the host's four schedules agree."""
    for graph in (build(net((9, 9), 3, 2, 3, padding=1), "fused"), build(train_net((6, 7), 3, 2, 3, padding=1), "train"),
                  build(train_net((7, 9), 3, 1, 3, stride=2, padding=1), "backward")):      # the gathering dx
        params = gc.init_params(graph, seed=1)
        results = check_races(graph, random_inputs(graph, 11, 1), params,
                              only=[s.name for s in Program(graph).kernels if "depthwise" in s.name])
        assert results and all(r.ok for r in results), [r for r in results if not r.ok]


def test_other_grouped_convolutions_and_pooled_chains_stay_on_the_gemm():
    g = gc.Graph("grouped")
    x = g.input("x", ("N", 4, 8, 8))
    g.output(g.conv2d(x, 8, 3, groups=2, padding=1, name="grouped"),
             g.max_pool2d(g.relu(g.conv2d(x, 4, 3, groups=4, padding=1, name="pooled")), 2))
    kernels = Program(build(g, "fused")).kernels
    assert not [s for s in kernels if s.template == "depthwise_conv.cu.j2"]
    assert depthwise.eligible({"nd": 2, "Cg": 1, "groups": 4, "C": 4}, ())


def train_net(spatial, C, mult, kernel, dtype="float32", pool=False, **conv):
    g = gc.Graph("dwt", dtype)
    h = g.conv2d(g.input("x", ("N", 2, *spatial)), C, 1, name="pw")       # so that dw's input has a gradient
    h = g.relu(g.conv2d(h, C * mult, kernel, groups=C, name="dw", **conv))
    if pool:
        h = g.max_pool2d(h, 2)
    g.output(g.linear(g.flatten(h), 3, name="fc"))
    return g


TRAIN_CASES = [
    # spatial, C, mult, kernel, conv options, dtype, pool, batches
    ((9, 9), 3, 1, 3, {"padding": 1}, "float32", False, (2, 130)),      # 130 images: 9 splits of 16 tiles
    ((12, 11), 5, 3, (3, 5), {"padding": (1, 2), "dilation": (2, 1)}, "float32", False, (2,)),   # multiplier 3
    ((10, 13), 4, 1, 4, {"padding": "same"}, "float64", True, (3,)),     # uneven padding; a gathered pool gradient
    ((15, 12), 6, 2, 3, {"stride": 2, "padding": 1}, "float32", False, (2,)),   # stride 2, multiplier 2
    ((23, 30), 3, 1, (3, 5), {"stride": (2, 3), "dilation": (2, 1)}, "float32", False, (2,)),  # no padding: dx past dy's reach
    ((40, 17), 35, 1, 4, {"stride": 3, "padding": (2, 1)}, "float64", False, (1,)),   # an even filter; channel blocks
]


@pytest.mark.parametrize("spatial, C, mult, kernel, conv, dtype, pool, batches", TRAIN_CASES)
def test_depthwise_gradients_match_numpy(spatial, C, mult, kernel, conv, dtype, pool, batches):
    """dx of a depthwise conv by the same kernel (at stride 1 dy's planes correlated with the flipped
    filters; strided, each dx position gathering the taps whose dy position is whole; a
    multiplier's planes summed), dw by the depthwise weight-gradient kernel (every thread a
    channel's weight sums over its positions, the blocks' partial sums added by the split reduce);
    a gathered pool gradient (fused-train with a max-pool) stays on the GEMM, which gathers it.
    (The backward graphs: no optimizer kernels to build.)"""
    for stage in ("backward", "fused-train") if pool else ("backward",):
        graph = build(train_net(spatial, C, mult, kernel, dtype, pool, **conv), stage)
        names = [s.name for s in Program(graph).kernels]
        data = [n for n in names if n.startswith("conv2d_backward_data")]
        weight = [n for n in names if n.startswith("conv2d_backward_weight") and "_g" in n and n.endswith("_partial")]
        direct = stage == "backward"
        assert len(data) == 1 and ("depthwise" in data[0]) == direct, names
        assert len(weight) == 1 and ("depthwise" in weight[0]) == direct, names
        for i, batch in enumerate(batches):
            assert_kernels_match(graph, batch=batch, seed=batch, compile_nvrtc=stage == "backward" and i == 0)
    if batches[-1] > 16:                  # the reduce added more than one block's partial sums
        spec = next(s for s in Program(graph).kernels if "backward_weight_depthwise" in s.name)
        assert spec.launch_shape(batches[-1])[0][0] > spec.params["NCB"]


@pytest.mark.parametrize("buffers", [1, 2])
def test_the_weight_gradient_with_one_buffer_or_two(buffers, monkeypatch):
    """By default the weight gradient copies its next unit's tiles by cp.async into a second buffer
    while it computes the current one (the host lands a copy at the wait that covers it, or at
    once: both schedules); depthwise.WGRAD_BUFFERS = 1 (the benchmark's comparison) waits for each
    unit's copies. Both give NumPy's sums over units, blocks and an uneven last split."""
    monkeypatch.setattr(depthwise, "WGRAD_BUFFERS", buffers)
    graph = build(train_net((13, 10), 5, 2, 3, padding=1), "backward")
    spec = next(s for s in Program(graph).kernels if "backward_weight_depthwise" in s.name)
    assert spec.params["buffers"] == buffers and ("gc_cp_async(" in spec.source) == (buffers == 2)
    assert_kernels_match(graph, batch=37, seed=4)
    results = check_races(graph, random_inputs(graph, 37, 2), gc.init_params(graph, seed=2), only=[spec.name])
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]


def test_a_depthwise_transposed_convolution_is_the_same_kernel():
    """conv_transpose2d with a group per channel is the input gradient of a depthwise conv: the same
    kernel, its bias in the store; strided (an upsampling layer), the gathering kernel, an output
    padding's last row and column past every tap (the bias alone)."""
    g = gc.Graph("dwup")
    h = g.conv_transpose2d(g.input("x", ("N", 6, 7, 9)), 6, 3, groups=6, padding=1, dilation=2, name="up")
    h2 = g.conv_transpose2d(g.input("z", ("N", 5, 6, 7)), 5, 3, stride=2, groups=5, padding=1, output_padding=1,
                            name="up2")
    g.output(h, h2)
    graph = build(g, "forward")
    assert [s.name for s in depthwise_specs(graph)] == ["conv_transpose2d_depthwise_f32_c6_k6_r3x3_s1x1_p1x1_i9x11_g6",
                                                        "conv_transpose2d_depthwise_f32_c5_k5_r3x3_s2x2_p1x1_i12x14_g5"]
    assert depthwise_specs(graph)[1].params["gather"]
    assert_kernels_match(graph, batch=2, seed=3)


@pytest.mark.parametrize("size, channels, stride, dtype", [
    (7, 1024, 1, "float32"), (14, 512, 2, "float32"), (112, 32, 1, "float64"), (56, 128, 1, "float64"),
    (112, 64, 2, "float64")])
def test_mobilenet_layers_compile_without_spilling(size, channels, stride, dtype):
    """MobileNet-like layers' depthwise kernels through NVRTC for sm_90 (a spill is refused): with
    __launch_bounds__(threads) alone ptxas aimed at 64 registers and spilled 8-12 bytes in these
    weight gradients, so their training was refused."""
    from codegen import nvrtc
    if not nvrtc.available():
        pytest.skip("NVRTC not installed")
    g = gc.Graph("mb", dtype)
    h = g.conv2d(g.input("x", ("N", channels, size, size)), channels, 1, name="pw")
    h = g.relu(g.conv2d(h, channels, 3, stride=stride, padding=1, groups=channels, name="dw"))
    g.output(g.linear(g.flatten(g.global_avg_pool(h)), 3, name="fc"))
    specs = [s for s in Program(build(g, "fused-train")).kernels if "depthwise" in s.name]
    assert any("backward_weight" in s.name for s in specs)
    for spec in specs:
        nvrtc.compile_kernel(spec.source, spec.name)          # raises on an error, a warning or a spill
