"""The opt-in TF32 tensor-core path: the GEMM-family kernels with mma.sync m16n8k8. NVRTC compiles
them for sm_90 (so the inline PTX is checked here); the host backend runs the same text with a lane-
by-lane emulation of the instruction on the same TF32-rounded operands, which these tests compare
with an independent NumPy rounding (frexp, not bit tricks) and with the FP32 results."""
import subprocess
import sys

import numpy as np
import pytest

import graphconv as gc
from codegen import nvrtc
from codegen.check import TF32_TOLERANCE, check_kernels, check_races
from codegen.lowering import direct_tf32
from codegen.program import Program
from graphconv.data import random_inputs
from graphconv.errors import GraphError
from graphconv.models import MODELS
from graphconv.pipeline import build
from test_codegen import realistic_params


def tf32_round(x):
    """Round float32 values to TF32 (10 explicit mantissa bits) to nearest, ties away from zero,
    as cvt.rna.tf32.f32 does: through frexp, in float64."""
    x = np.asarray(x, np.float64)
    mant, exp = np.frexp(x)                       # x = mant * 2**exp, 0.5 <= |mant| < 1
    exp = np.maximum(exp, -125)                   # subnormals: TF32 keeps float32's exponent range, so
    scaled = np.ldexp(x, 11 - exp)                # their grid is fixed at 2**-136 (10 bits below 2**-126)
    rounded = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    return np.ldexp(rounded, exp - 11)


def linear_graph(n_in, n_out):
    g = gc.Graph("lin", "float32")
    x = g.input("x", ("N", n_in))
    g.output(g.linear(x, n_out, name="fc"))
    return g


def test_the_reference_rounding_is_the_tensor_cores_rounding():
    one = 1.0
    assert tf32_round(one + 2.0 ** -11) == one + 2.0 ** -10          # a tie goes away from zero
    assert tf32_round(-(one + 2.0 ** -11)) == -(one + 2.0 ** -10)
    assert tf32_round(one + 2.0 ** -12) == one                       # below half an ulp: down
    assert tf32_round(one + 3 * 2.0 ** -12) == one + 2.0 ** -10      # above half: up
    assert tf32_round(0.0) == 0.0
    assert tf32_round(2.0 ** -140) == 0.0 and tf32_round(3 * 2.0 ** -137) == 2.0 ** -135   # subnormal grid


def test_a_tf32_product_equals_numpy_on_tf32_rounded_operands():
    rng = np.random.default_rng(3)
    g = linear_graph(37, 24)                      # 37: the k loop's last step of 8 is partial
    params = {"fc.weight": rng.standard_normal((37, 24)).astype(np.float32),
              "fc.bias": rng.standard_normal(24).astype(np.float32)}
    x = rng.standard_normal((5, 37)).astype(np.float32)
    program = gc.compile(g, backend="host", tf32=True)
    assert [s.name for s in program.program.kernels] == ["linear_f32_in37_out24_tf32"]
    assert "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32" in program.program.kernels[0].source
    got = program.run({"x": x}, params)["fc"].astype(np.float64)
    want = tf32_round(x) @ tf32_round(params["fc.weight"]) + params["fc.bias"]
    fp32 = x.astype(np.float64) @ params["fc.weight"].astype(np.float64) + params["fc.bias"]
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-6 * scale              # only the FP32 sums' order differs
    assert np.abs(got - fp32).max() >= 1e-5 * scale              # and the operands were rounded


def test_ties_and_exact_values_pass_through_an_identity_product():
    g = linear_graph(16, 16)
    ties = np.array([1 + 2.0 ** -11, -(1 + 2.0 ** -11), 1 + 2.0 ** -12, 3.0, 0.0, -2.5, 1e-30, 65504.0,
                     1 + 3 * 2.0 ** -12, 0.1, -0.1, 7.0, 2.0 ** -126, 1e20, 3 * 2.0 ** -137, 0.5], np.float32)
    params = {"fc.weight": np.eye(16, dtype=np.float32), "fc.bias": np.zeros(16, np.float32)}
    got = gc.compile(g, backend="host", tf32=True).run({"x": ties[None, :]}, params)["fc"][0]
    np.testing.assert_array_equal(got.astype(np.float64), tf32_round(ties))


def odd_tiles(name):
    """Graphs whose TF32 tiles the bundled models do not reach: 3 x 3 pools (a block tile 72 wide, 9
    columns of mma tiles: 6 of 8 warps busy, 2 x 3 tiles each); 2 x 2 x 2 pools in 3-D (windows of 8)."""
    g = gc.Graph(name, "float32")
    if name == "pool3x3":
        x = g.input("x", ("N", 3, 12, 12))
        h = g.max_pool2d(g.relu(g.conv2d(x, 64, 3, padding=2, dilation=2, name="conv")), 3)
    else:
        x = g.input("x", ("N", 2, 6, 6, 6))
        h = g.max_pool3d(g.relu(g.conv3d(x, 64, 3, padding=1, name="conv")), 2)
    g.output(g.linear(g.flatten(h), 10, name="fc"))
    return g


TF32_GRAPHS = ["lenet5", "vgg_small", "resnet8", "conv1d_net", "conv3d_net", "pool3x3", "pool2x2x2"]


def tf32_graph(name, stage):
    return gc.cast(build(MODELS[name]() if name in MODELS else odd_tiles(name), stage), "float32")


def test_the_odd_graphs_reach_the_tile_shapes_the_bundled_models_do_not():
    shapes = {name: [(s.params["WARPS"], s.params["WARPS_M"], s.params["WARPS_N"], s.params["WARP_MT"],
                      s.params["WARP_NT"], s.params["BM"], s.params["BN"])
                     for s in Program(tf32_graph(name, "fused"), tf32=True).kernels if s.params.get("tf32")]
              for name in ("pool3x3", "pool2x2x2")}
    for warps, wm, wn, mt, nt, bm, bn in shapes["pool3x3"] + shapes["pool2x2x2"]:
        assert wm * mt * 16 == bm and wn * nt * 8 == bn and wm * wn <= warps      # the warps cover the tile
    assert (8, 2, 3, 2, 3, 64, 72) in shapes["pool3x3"], shapes                     # two warps idle
    assert any(mt * nt == 8 for _, _, _, mt, nt, _, _ in shapes["pool2x2x2"]), shapes  # 2 x 4 tiles per warp


@pytest.mark.parametrize("model", TF32_GRAPHS)
@pytest.mark.parametrize("stage", ["fused", "fused-train"])
def test_every_tf32_kernel_compiles_for_sm90_and_matches_numpy_on_the_host(model, stage):
    graph = tf32_graph(model, stage)
    program = Program(graph, tf32=True)
    tf32 = [s for s in program.kernels if s.params.get("tf32")]
    assert tf32, "no kernel took the TF32 path"
    fp32 = [s for s in Program(graph).kernels if s.template == "direct_conv.cu.j2"]
    names = {s.name for s in program.kernels}
    for s in fp32:      # a direct convolution takes the tensor cores where it has 2 x 2 cells and >= 8 channels
        tensor_cores = s.params["CH"] == s.params["CW"] == 2 and s.params["C"] >= direct_tf32.LEAST_CHANNELS
        assert (s.name + "_tf32" in names and s.name + "_tf32_filter" in names and s.name not in names) \
            if tensor_cores else (s.name in names), s.name
    if model in ("lenet5", "vgg_small", "resnet8"):
        assert any(s.template == "direct_conv_tf32.cu.j2" for s in program.kernels)
    if nvrtc.available():
        compiled = nvrtc.compile_many([(s.source, s.name) for s in tf32])
        assert all(c.spill_stores == 0 and c.spill_loads == 0 for c in compiled)
    results = check_kernels(graph, random_inputs(graph, 3, 1), realistic_params(graph, 1), tf32=True)
    bad = [f"{r.node} [{r.op}] {r.kernels}: abs {r.max_abs:.3g} rel {r.max_rel:.3g} {r.note}" for r in results
           if not r.ok]
    assert not bad, "\n".join(bad)
    on_tf32 = [r for r in results if any(k.endswith("_tf32") or "_tf32_" in k for k in r.kernels)]
    assert on_tf32 and max(r.max_rel for r in on_tf32) < TF32_TOLERANCE / 3     # the tolerance has room


@pytest.mark.parametrize("model", ["lenet5", "vgg_small", "resnet8"])
def test_no_tf32_kernel_of_a_training_step_races_between_its_threads(model):
    """The TF32 training step's kernels (double-buffered tensor-core convolutions, their filter kernels,
    the weight gradients) under each of the host's schedules: the same bits under all four."""
    graph = tf32_graph(model, "fused-train")
    bad = [f"{r.node} {r.kernels}: {r.note}" for r in
           check_races(graph, random_inputs(graph, 2, 0), realistic_params(graph), tf32=True) if not r.ok]
    assert not bad, "\n".join(bad)


def test_tf32_is_refused_where_it_cannot_apply():
    g = linear_graph(4, 3)
    with pytest.raises(GraphError, match="kernel backends"):
        gc.compile(g, backend="numpy", tf32=True)
    with pytest.raises(GraphError, match="needs a float32 graph"):
        gc.compile(gc.cast(g, "float64"), backend="host", tf32=True)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "graphconv.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_check_tf32_on_the_cli():
    done = run_cli("check", "lenet5", "--backend", "host", "--dtype", "float32", "--tf32")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "TF32 tensor cores on conv2, fc1, fc2," in done.stdout and "0 mismatched (rtol 0.02)" in done.stdout
    for args, message in ((("--tf32",), "--tf32 is for the kernel backends"),
                          (("--tf32", "--backend", "host"), "needs a float32 graph")):
        done = run_cli("check", "lenet5", *args)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
