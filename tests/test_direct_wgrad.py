"""The direct weight-gradient kernel (codegen/lowering/direct_wgrad.py, direct_wgrad.cu.j2): every
stride-1 2-D convolution's dw with a filter at least 3 wide, compiled by NVRTC for sm_90 and run on
the host backend against NumPy (outputs and the partial sums' scratch poisoned), over the shapes its
tiling has edges for: column tiles and padded passes, position groups that do not divide a tile's
rows, channel blocks past the channels, float64, a gathered pool gradient, and batches whose tiles
do not divide into the splits."""
import numpy as np
import pytest

import graphconv as gc
from codegen import nvrtc, sass
from codegen.check import check_races
from codegen.lowering import direct_wgrad
from codegen.program import Program
from codegen.runner import CompiledProgram
from graphconv.data import random_inputs
from graphconv.pipeline import build

from test_codegen_gemm import assert_kernels_match


def net(spatial, channels, out, kernel, padding, dtype="float32", pool=False):
    g = gc.Graph("wg", dtype)
    x = g.input("x", ("N", channels, *spatial))
    h = g.relu(g.conv2d(x, out, kernel, padding=padding, name="conv"))
    if pool:
        h = g.max_pool2d(h, 2 if pool is True else pool)
    g.output(g.linear(g.flatten(h), 3, name="fc"))
    return g


def wgrad_specs(graph):
    return [s for s in Program(graph).kernels if s.template == "direct_wgrad.cu.j2"]


CASES = [
    # spatial, C, M, kernel, padding, dtype, pool, batches
    ((5, 40), 3, 4, 3, 1, "float32", False, (1, 3)),              # 4 output channels: 4 per thread; two column tiles of 20
    ((20, 34), 5, 12, 3, 1, "float32", False, (2,)),              # two column tiles of 17: passes of 9, padded to 18
    ((11, 13), 37, 9, (3, 5), (1, 2), "float32", False, (2,)),    # channel blocks past 37 and 9; a 3 x 5 filter
    ((12, 10), 6, 9, (5, 3), (2, 0), "float32", True, (3, 5)),    # gathered relu + 2 x 2 max-pool gradient
    ((13, 13), 2, 7, 5, 2, "float64", False, (2,)),               # float64: 4 channels per thread, 2-value vectors
    ((6, 6), 1, 3, 3, 0, "float32", False, (1, 33)),              # a 4 x 4 output; many images per split
]


@pytest.mark.parametrize("spatial, C, M, kernel, padding, dtype, pool, batches", CASES)
def test_direct_weight_gradients_match_numpy(spatial, C, M, kernel, padding, dtype, pool, batches):
    graph = build(net(spatial, C, M, kernel, padding, dtype, pool), "fused-train")
    specs = wgrad_specs(graph)
    assert len(specs) == 1, [s.name for s in Program(graph).kernels]
    spec = specs[0]
    assert ("gathered" in spec.name) == pool and (spec.params["g_source"] is None) == pool
    for i, batch in enumerate(batches):
        results = assert_kernels_match(graph, batch=batch, seed=batch, compile_nvrtc=i == 0)
        assert any(r.node == "dconv.weight" and r.ok for r in results)


def test_edges_of_the_tiling_are_exercised():
    """The cases above reach each edge the template guards: a column tile narrower than the row
    (WB < OW), padded passes (WBP > WB), position groups over a tile's rows, output- and
    input-channel blocks past the channels, and more than one split at the batches tested."""
    seen = set()
    for spatial, C, M, kernel, padding, dtype, pool, batches in CASES:
        spec = wgrad_specs(build(net(spatial, C, M, kernel, padding, dtype, pool), "fused-train"))[0]
        p = spec.params
        seen |= {k for k, hit in {"column tiles": p["WB"] < p["OW"], "padded pass": p["WBP"] > p["WB"],
                                  "position groups": p["PG"] > 1, "m past M": -(-M // p["MB"]) * p["MB"] > M,
                                  "c past C": -(-C // p["CB"]) * p["CB"] > C,
                                  "splits": max(spec.launch_shape(b)[0][0] for b in batches) > 1}.items() if hit}
    assert seen == {"column tiles", "padded pass", "position groups", "m past M", "c past C", "splits"}


def test_the_bundled_models_weight_gradients_are_direct_where_eligible():
    """Every stride-1 2-D convolution of LeNet-5, vgg_small and resnet8 with a filter 3 or more wide
    gets its dw from the direct kernel; resnet8's stride-2 and 1 x 1 convolutions stay on the GEMM."""
    from graphconv.models import MODELS
    for model in ("lenet5", "vgg_small", "resnet8"):
        graph = build(MODELS[model](), "fused-train")
        kernels = Program(graph).kernels
        for node in graph.topo():
            if node.op != "conv2d_backward_weight":
                continue
            want = tuple(node.attrs["stride"]) == (1, 1) and int(node.shape[-1]) >= 3
            names = [s.name for s in kernels if node.name in s.nodes]
            assert names and all(("backward_weight_direct" in n) == want for n in names), (model, node.name, names)


def test_two_runs_give_the_same_bits_and_a_batch_with_a_partial_last_split():
    """No atomics: the partial sums and their reduce add in a fixed order, so two runs agree bit for
    bit; a batch whose tiles leave the last split short matches NumPy too."""
    graph = build(net((10, 10), 4, 8, 3, 1), "fused-train")
    spec = wgrad_specs(graph)[0]
    p = spec.params

    def per(b):        # the template's tiles per split
        return max(p["least"], -(-b * p["TILES"] // p["splits"]))
    assert all(spec.launch_shape(b)[0][0] == -(-b * p["TILES"] // per(b)) for b in range(1, 300))
    batch = next(b for b in range(2, 200) if spec.launch_shape(b)[0][0] > 1 and (b * p["TILES"]) % per(b))
    params, inputs = gc.init_params(graph, seed=4), random_inputs(graph, batch, 4)
    program = CompiledProgram(graph, "host", poison=True)
    first = program.run(inputs, params, keep=True)["dconv.weight"]
    second = program.run(inputs, params, keep=True)["dconv.weight"]
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    assert_kernels_match(graph, batch=batch, seed=4, compile_nvrtc=False)


def test_a_filter_too_wide_for_a_row_of_registers_or_narrower_than_3_uses_the_gemm():
    for kernel, padding in (((3, 19), (1, 9)), ((3, 1), (1, 0))):
        graph = build(net((12, 24), 2, 4, kernel, padding), "fused-train")
        assert not wgrad_specs(graph)
        names = [s.name for s in Program(graph).kernels if "backward_weight" in s.name]
        assert names and all(n.startswith("conv2d_backward_weight_f32") for n in names), names
        assert_kernels_match(graph, batch=2, compile_nvrtc=False)


def test_block_shapes_fit_their_budgets_and_read_shared_memory_without_conflicts():
    """Every bundled shape: at most 256 threads and 128 registers' worth of accumulators, the tiles
    (and the partial sums on the way out) within the static shared memory, the x tile's channel
    stride odd; where a warp is 32 input channels, its reads of one column hit 32 banks."""
    for C, M, K, O in ((20, 50, 5, 14), (1, 20, 5, 28), (32, 32, 3, 32), (128, 128, 3, 8), (3, 32, 3, 32),
                       (64, 64, 3, 16), (16, 16, 3, 32)):
        s = direct_wgrad.block_shape(C=C, M=M, KH=K, KW=K, OH=O, OW=O, itemsize=4)
        assert s["threads"] <= 256 and s["TM"] * s["RT"] * K + s["RT"] * K + s["TM"] <= direct_wgrad.LIVE_MOST
        smem = max(s["RB"] * s["WBP"] * s["MBP"] + s["CB"] * s["XS"], s["PG"] * s["MB"] * s["CB"] * K * K)
        assert smem * 4 <= direct_wgrad.SHARED_BUDGET and s["XS"] % 2 == 1
        assert s["MBP"] % 8 == 4                 # the g staging's 8 columns x 4 channels land in 32 banks
        assert len({(col * s["MBP"] + m) % 32 for col in range(8) for m in range(4)}) == 32
        if s["CB"] >= 32:
            assert direct_wgrad.wavefronts([c * s["XS"] + 5 for c in range(32)]) == 1
    assert direct_wgrad.wavefronts([0, 32, 64, 1]) == 3


@pytest.mark.skipif(sass.tool("nvdisasm") is None, reason="nvdisasm not installed (the test extra has it)")
def test_the_direct_weight_gradient_main_loop_is_multiply_adds():
    """In the machine code (sm_90) of vgg conv1_2's and LeNet-5 conv2's weight gradients, the main
    loop is at least 85% multiply-adds with no global load and no integer division (the im2col GEMM it
    replaces: 51% and 56%, sass-mix.md of session 4)."""
    from graphconv.models import MODELS
    for model, prefix in (("vgg_small", "conv2d_backward_weight_direct_f32_c32_k32"),
                          ("lenet5", "conv2d_backward_weight_direct_relu_maxpool2x2_gathered_f32_c20_k50")):
        spec = next(s for s in Program(build(MODELS[model](), "fused-train")).kernels if s.name.startswith(prefix))
        m = sass.mix(nvrtc.compile_kernel(spec.source, spec.name).cubin)
        assert m["fma_share"] >= 0.85 and m["global_loads"] == 0, (spec.name, m)
        assert m["integer/other"] <= 0.03 * m["instructions"], (spec.name, m)


def test_one_split_at_every_batch_writes_dw_without_a_reduce(monkeypatch):
    """Where the channel blocks alone give the GPU its blocks, the split is 1 at every batch: the
    kernel writes dw itself and no reduce kernel (a copy) runs."""
    monkeypatch.setattr(direct_wgrad, "THREADS_PER_SM", 0)     # one block wanted: the channel blocks are plenty
    graph = build(net((8, 8), 40, 8, 3, 1), "fused-train")
    names = [s.name for s in Program(graph).kernels if "backward_weight" in s.name]
    assert names == ["conv2d_backward_weight_direct_f32_c40_k8_r3x3_s1x1_p1x1_i8x8"], names
    for batch in (1, 4):
        assert_kernels_match(graph, batch=batch, seed=batch, compile_nvrtc=batch == 1)


@pytest.mark.skipif(not nvrtc.available(), reason="NVRTC not installed")
def test_shapes_off_the_bundled_models_compile_without_spills_or_fall_back():
    """A spread of shapes (a single-channel 28 x 28 first layer, wide and tall filters, float64, big
    and small planes, 512 channels) compiles for sm_90 without spills; float64 filters 9 wide, whose
    live values would pass the registers, take the GEMM instead."""
    shapes = [((28, 28), 1, 32, 3, 1, "float32", True), ((16, 16), 16, 16, (3, 17), (1, 8), "float32", True),
              ((16, 16), 3, 8, 9, 4, "float64", False), ((16, 16), 8, 16, (3, 9), (1, 4), "float64", False),
              ((56, 56), 2, 64, 3, 1, "float32", True), ((40, 40), 3, 5, 3, 1, "float64", True),
              ((9, 9), 512, 512, 3, 1, "float32", True), ((32, 32), 2, 64, 7, 3, "float32", True)]
    for spatial, C, M, kernel, padding, dtype, direct in shapes:
        specs = wgrad_specs(build(net(spatial, C, M, kernel, padding, dtype), "fused-train"))
        assert bool(specs) == direct, (spatial, C, M, kernel, dtype)
        for spec in specs:
            nvrtc.compile_kernel(spec.source, spec.name)      # raises on a spill


def test_double_buffered_tiles_match_numpy_and_compile_below_sm80(monkeypatch):
    """PIPELINE: two buffers, the next tile's cp.async copies issued before the current tile is computed
    (wait_group 1, a barrier); over several tiles per split, padded passes and column tiles it matches
    NumPy with the partial sums poisoned, a gathered g keeps one buffer, and without cp.async (sm_75)
    the same source compiles to plain copies."""
    monkeypatch.setattr(direct_wgrad, "PIPELINE", True)
    graph = build(net((20, 34), 5, 12, 3, 1), "fused-train")
    spec = wgrad_specs(graph)[0]
    assert spec.params["buffers"] == 2 and "cp.async.wait_group 1" in spec.source
    assert spec.params["SMEM"] >= 2 * spec.params["STAGE"] and spec.params["STAGE"] % 4 == 0
    for batch in (1, 5):
        assert spec.launch_shape(batch)[0][0] * 2 <= batch * spec.params["TILES"] or batch == 1
        assert_kernels_match(graph, batch=batch, seed=batch, compile_nvrtc=batch == 1)
    # a tile's copies waited for before the barrier that publishes them, the next tile's issued only into
    # the buffer every thread finished reading: the same bits however the threads and copies are ordered
    races = [r for r in check_races(graph, random_inputs(graph, 5, 5), gc.init_params(graph, seed=5))
             if r.node == "dconv.weight"]
    assert races and all(r.ok for r in races), [(r.node, r.note) for r in races]
    if nvrtc.available():
        nvrtc.compile_kernel(spec.source, spec.name, arch="sm_75")
    gathered = wgrad_specs(build(net((12, 10), 6, 9, (5, 3), (2, 0), pool=True), "fused-train"))[0]
    assert gathered.params["buffers"] == 1


@pytest.mark.parametrize("window_gather", [True, False])
def test_a_gathered_gradient_staged_a_pooling_window_per_gather(monkeypatch, window_gather):
    """WINDOW_GATHER: with tiles aligned to the pooling windows, a thread gathers one pooled position
    (code, aux, dy once) and writes its window (the gradient at the argmax, 0 elsewhere); positions no
    window covers (an odd conv output under a 2 x 2 pool), column tiles and 3 x 3 windows match NumPy,
    and so does the per-position gather it replaces."""
    monkeypatch.setattr(direct_wgrad, "WINDOW_GATHER", window_gather)
    for spatial, C, M, pool in (((11, 11), 16, 16, 2), ((6, 40), 2, 4, 2), ((12, 12), 16, 16, 3)):
        graph = build(net(spatial, C, M, 3, 1, pool=pool), "fused-train")
        spec = wgrad_specs(graph)[0]
        assert bool(spec.params.get("g_window")) == window_gather, spatial
        if window_gather:
            assert spec.params["RB"] % pool == 0 and spec.params["WB"] % pool == 0
            assert spec.source.count("gcode[gi]") == 1 and "codes[q] == i * " in spec.source
        for batch in (1, 3):
            assert_kernels_match(graph, batch=batch, seed=batch, compile_nvrtc=batch == 1)


@pytest.mark.parametrize("seed", range(10))
def test_random_shapes_match_numpy(seed):
    """Random shapes (channels 1-40, planes 3-40 on a side, filters 3-5 rows by 3-5 columns, padding
    0-2, a ReLU + 2 x 2 max-pool gradient gathered or not, float32 or float64, batch 1-5): the weight
    gradient's kernels match NumPy with the scratch poisoned, and compile for sm_90 without spills."""
    rng = np.random.default_rng(100 + seed)
    kernel = tuple(int(k) for k in rng.integers(3, 6, 2))
    padding = tuple(int(rng.integers(0, min(3, k))) for k in kernel)
    spatial = tuple(int(s) for s in rng.integers(max(kernel) + 1, 41, 2))
    C, M = (int(v) for v in rng.integers(1, 41, 2))
    pool = bool(rng.random() < 0.5)
    dtype = "float64" if rng.random() < 0.25 else "float32"
    graph = build(net(spatial, C, M, kernel, padding, dtype, pool), "fused-train")
    specs = wgrad_specs(graph)
    assert specs, (spatial, C, M, kernel, padding, dtype)
    assert_kernels_match(graph, batch=int(rng.integers(1, 6)), seed=seed, compile_nvrtc=False)
    if nvrtc.available():
        for spec in specs:
            nvrtc.compile_kernel(spec.source, spec.name)
