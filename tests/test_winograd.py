"""3 x 3 convolutions by Winograd's F(2x2, 3x3) (codegen/lowering/winograd.py, winograd_conv.cu.j2,
winograd_filter.cu.j2; opt-in: direct.WINOGRAD): compiled by NVRTC for sm_90 without spills and run on
the host backend against NumPy with poisoned outputs, over the edges of its tiling (cells past the
plane, several images a block and an odd batch, stages past the channels, output-channel blocks past
the channels, several tiles a plane), the fused epilogues (bias, ReLU, 2 x 2 max pool with argmax
codes, residual add), backward-data through the flipped filter (plain and gathered dy) and a stride-1
transposed convolution; under every host schedule (no race); and its machine code."""
import numpy as np
import pytest

import graphconv as gc
from codegen import nvrtc, sass
from codegen.check import check_kernels, check_races
from codegen.lowering import direct, winograd
from codegen.program import Program
from graphconv.data import random_inputs
from graphconv.models import MODELS
from graphconv.pipeline import build

from test_codegen import realistic_params
from test_codegen_gemm import assert_kernels_match


@pytest.fixture(autouse=True)
def winograd_on(monkeypatch):
    monkeypatch.setattr(direct, "WINOGRAD", True)


def net(spatial, C, M, pool=False, pad=1, bias=True, dtype="float32", before=False):
    """conv (C -> M, 3 x 3) -> ReLU [-> 2 x 2 max pool] -> linear; `before`: a first conv (4 -> C) whose
    output gradient is conv's backward-data."""
    g = gc.Graph("wn", dtype)
    x = g.input("x", ("N", 4 if before else C, *spatial))
    if before:
        x = g.conv2d(x, C, 1, name="first")
    h = g.relu(g.conv2d(x, M, 3, padding=pad, bias=bias, name="conv"))
    if pool:
        h = g.max_pool2d(h, 2)
    g.output(g.linear(g.flatten(h), 3, name="fc"))
    return g


def wino(graph, tf32=False):
    return [s for s in Program(graph, tf32=tf32).kernels if s.template == "winograd_conv.cu.j2"]


CASES = [
    # spatial, C, M, pool, pad, stage, batches: what it reaches
    ((8, 8), 8, 32, True, 1, "fused", (1, 3)),         # 16 cells an image, 2 images a block: an odd batch leaves one empty
    ((6, 10), 5, 20, False, 1, "fused", (2,)),         # 15 cells (slots 30, 31 dead); 5 channels: a stage past them; 20 of 32 outputs
    ((9, 7), 12, 40, True, 0, "fused", (2,)),          # no padding, pooled 3 x 2; a second output block with 8 of 32
    ((33, 20), 4, 16, False, 1, "fused", (1,)),        # 17 x 10 cells: 6 tiles of 8 x 8, the last row of cells half outside
    ((8, 8), 16, 32, True, 1, "fused-train", (3,)),    # backward-data: dy gathered through the pool and ReLU, flipped filter
    ((12, 12), 24, 16, False, 1, "fused-train", (2,)),  # backward-data of a plain ReLU gradient, 24 outputs
]


@pytest.mark.parametrize("spatial, C, M, pool, pad, stage, batches", CASES)
def test_winograd_convolutions_match_numpy(spatial, C, M, pool, pad, stage, batches):
    graph = build(net(spatial, C, M, pool, pad, before=stage == "fused-train"), stage)
    specs = wino(graph)
    assert specs and all(s.name.endswith("_wino") for s in specs)
    assert ("backward_data" in " ".join(s.name for s in specs)) == (stage == "fused-train")
    for i, batch in enumerate(batches):
        results = assert_kernels_match(graph, batch=batch, seed=batch, compile_nvrtc=i == 0)
        assert any(any(k.endswith("_wino") for k in r.kernels) and r.ok for r in results)


def test_the_cases_reach_the_edges_of_the_tiling():
    p = {case[:3]: wino(build(net(*case[:5]), "fused"))[0].params for case in CASES[:4]}
    assert p[(8, 8), 8, 32]["IMGS"] == 2 and p[(8, 8), 8, 32]["CELLS"] == 16
    assert p[(6, 10), 5, 20]["CELLS"] * p[(6, 10), 5, 20]["IMGS"] < p[(6, 10), 5, 20]["P"]      # dead slots
    assert p[(6, 10), 5, 20]["C"] % winograd.CC and p[(9, 7), 12, 40]["M"] % winograd.OCB
    assert p[(33, 20), 4, 16]["TILES"] == 6 and p[(33, 20), 4, 16]["NCY"] * 2 > 33


def test_a_residual_block_and_a_transposed_convolution():
    g = gc.Graph("res", "float32")
    x = g.input("x", ("N", 16, 10, 10))
    h = g.relu(g.batch_norm2d(g.conv2d(x, 16, 3, padding=1, bias=False, name="c1"), name="bn"))
    h = g.relu(g.add(g.conv2d(h, 16, 3, padding=1, name="c2"), x, name="add"))
    h = g.conv_transpose2d(h, 16, 3, padding=1, name="up")      # stride 1: a direct convolution of the flipped filter
    g.output(g.linear(g.flatten(h), 3, name="fc"))
    for stage in ("fused", "fused-train"):
        graph = build(g, stage)
        names = [s.name for s in wino(graph)]
        assert any("_add" in n for n in names) and any(n.startswith("conv_transpose2d") for n in names), names
        assert_kernels_match(graph, batch=3, seed=1, compile_nvrtc=stage == "fused")


def test_no_race_between_threads_under_any_host_schedule():
    """Double-buffered stages (the filter by cp.async, the input patches through registers) and the
    epilogue's rounds through shared memory: the same bits under all four host schedules."""
    for case in (CASES[0], CASES[4]):
        graph = build(net(*case[:5], before=case[5] == "fused-train"), case[5])
        bad = [(r.node, r.note) for r in check_races(graph, random_inputs(graph, 3, 0), gc.init_params(graph, seed=0))
               if not r.ok]
        assert not bad, bad


def test_the_bundled_models_3x3_convolutions_under_winograd():
    """vgg_small's and resnet8's training steps with every 3 x 3 forward and backward-data convolution by
    Winograd (resnet8's stride-2 and 1 x 1 ones stay as they are): every kernel matches NumPy, compiles
    without a spill, and vgg_small's give the same bits under every schedule."""
    for model in ("vgg_small", "resnet8"):
        graph = build(MODELS[model](), "fused-train")
        specs = wino(graph)
        assert len(specs) == {"vgg_small": 10, "resnet8": 6}[model], [s.name for s in specs]
        if nvrtc.available():
            compiled = nvrtc.compile_many([(s.source, s.name) for s in specs])
            assert all(c.spill_stores == 0 and c.spill_loads == 0 for c in compiled)
        check = check_races if model == "vgg_small" else check_kernels
        bad = [(r.node, r.note) for r in check(graph, random_inputs(graph, 2, 0), realistic_params(graph)) if not r.ok]
        assert not bad, bad


def test_where_winograd_does_not_apply_the_direct_kernel_stays(monkeypatch):
    assert not wino(build(net((8, 8), 8, 32, dtype="float64"), "fused"))          # float64: direct
    assert not wino(build(net((8, 8), 8, 32), "fused"), tf32=True)                # TF32: the tensor cores
    assert not wino(build(net((8, 8), 2, 32), "fused"))                           # 2 input channels
    assert not wino(build(net((8, 8), 8, 8), "fused"))                            # 8 output channels
    g = gc.Graph("k5", "float32")
    g.output(g.conv2d(g.input("x", ("N", 8, 12, 12)), 32, 5, padding=2, name="conv"))
    assert not wino(build(g, "fused"))                                            # 5 x 5
    gathered = build(net((8, 8), 16, 32, pool=True, before=True), "fused-train")   # dy gathered through pool, ReLU
    assert any("backward_data" in s.name for s in wino(gathered))
    monkeypatch.setattr(winograd, "GATHERED", False)
    assert [s.name for s in wino(gathered)] == ["conv2d_direct_relu_max_pool2d_save_f32_c16_k32_r3x3_s1x1_p1x1_i8x8_wino"]
    monkeypatch.setattr(direct, "WINOGRAD", False)                                # the default
    assert not any(wino(build(MODELS[m](), "fused-train")) for m in ("vgg_small", "resnet8"))


def test_filter_transform_is_g_g_gt():
    """The filter kernel's output, read back from scratch, is G g G^T of each (output, input) channel
    pair (float64 NumPy), in the chunk order the convolution copies, zeros past the channels."""
    from codegen.runner import CompiledProgram
    graph = build(net((8, 8), 6, 40), "fused")
    compiled = CompiledProgram(graph, "host")
    params = gc.init_params(graph, seed=3)
    spec = next(s for s in compiled.program.kernels if s.name.endswith("_wino_filter"))
    w = params["conv.weight"].astype(np.float64)
    G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    U = np.einsum("ir,mcrs,js->mcij", G, w, G)                    # (M, C, 4, 4)
    p = spec.params
    assert [a.name for a in spec.args] == ["w", "ut", "batch"]
    ut = np.full(p["total"], np.nan, np.float32)                   # poisoned: every value must be written
    compiled.runtime.launch(compiled.kernels[spec.name], *spec.launch_shape(1),
                            [params["conv.weight"], ut, np.int32(1)])
    chunks = ut.reshape(-(-p["M"] // p["OCB"]), p["STAGES"], 16, p["CC"], p["OCB"])
    want = np.zeros_like(chunks, dtype=np.float64)
    for m in range(p["M"]):
        for c in range(p["C"]):
            want[m // p["OCB"], c // p["CC"], :, c % p["CC"], m % p["OCB"]] = U[m, c].reshape(16)
    np.testing.assert_allclose(chunks, want, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(sass.tool("nvdisasm") is None, reason="nvdisasm not installed (the test extra has it)")
def test_the_stage_loop_is_mostly_multiply_adds():
    """sm_90 machine code of vgg conv3_2's and conv1_2's Winograd kernels: a stage is CC x 128 = 512
    FFMA (each worth 2.25 of the direct kernel's) among at most 720 instructions (the filter copies a
    static count, the input offsets computed once); the direct kernels do 0.9 multiply-adds of a
    convolution per instruction, these >= 1.6."""
    specs = {s.name: s for s in wino(build(MODELS["vgg_small"](), "fused-train"))}
    for name in ("conv2d_direct_f32_c128_k128_r3x3_s1x1_p1x1_i8x8_wino", "conv2d_direct_f32_c32_k32_r3x3_s1x1_p1x1_i32x32_wino"):
        m = sass.mix(nvrtc.compile_kernel(specs[name].source, name).cubin)
        assert m["fma"] == 128 * winograd.CC and m["instructions"] <= 720, (name, m)
        assert 2.25 * m["macs_per_instruction"] >= 1.6, (name, m)


# ---- the option: compile(winograd=True), Trainer(winograd=True), --winograd --------------------------
@pytest.fixture
def winograd_default(monkeypatch):
    monkeypatch.setattr(direct, "WINOGRAD", False)      # the option alone, not the module-wide default


def test_compile_with_winograd_runs_the_winograd_kernels_and_matches_numpy(winograd_default):
    g = net((10, 10), 8, 32, pool=True)
    x = np.random.default_rng(0).standard_normal((3, 8, 10, 10)).astype(np.float32)
    params = gc.init_params(g, seed=0)
    run = gc.compile(g, backend="host", winograd=True)
    assert [s for s in run.program.kernels if s.template == "winograd_conv.cu.j2"]
    assert not [s for s in gc.compile(g, backend="host").program.kernels if s.template == "winograd_conv.cu.j2"]
    np.testing.assert_allclose(run(x, params=params), gc.compile(g)(x, params=params), rtol=1e-4, atol=1e-5)
    for kwargs, message in (({"backend": "numpy"}, "kernel backends"),
                            ({"backend": "host", "dtype": "float64"}, "needs a float32 graph"),
                            ({"backend": "host", "tf32": True}, "choose one")):
        with pytest.raises(gc.GraphError, match=message):
            gc.compile(g, winograd=True, **kwargs)


def test_training_with_winograd_tracks_the_direct_kernels(winograd_default):
    """Two Adam steps of a small 3 x 3 net on the host backend: the losses with Winograd convolutions
    (forward and the input gradient) agree with the direct kernels' to float32 rounding."""
    from graphconv.cli import program_variants
    from graphconv.training import Trainer
    g = gc.Graph("tiny", "float32")
    x = g.input("x", ("N", 3, 12, 12))
    h = g.max_pool2d(g.relu(g.conv2d(x, 16, 3, padding=1, name="c1")), 2)
    h = g.max_pool2d(g.relu(g.conv2d(h, 16, 3, padding=1, name="c2")), 2)
    g.output(g.linear(g.flatten(h), 10, name="fc"))
    rng = np.random.default_rng(1)
    xs, ys = rng.standard_normal((8, 3, 12, 12)).astype(np.float32), rng.integers(0, 10, 8)
    losses = {}
    for winograd in (False, True):
        trainer = Trainer(g, backend="host", seed=0, winograd=winograd)
        kernels = [s.template for s in trainer.step_program.program.kernels]
        assert ("winograd_conv.cu.j2" in kernels) == winograd
        assert program_variants(trainer.step_program)["winograd"] == (("c2",) if winograd else ())  # train's header
        losses[winograd] = [float(trainer.step(xs, ys)[0]) for _ in range(3)]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


def test_winograd_on_the_cli(tmp_path, winograd_default, capsys):
    from graphconv.cli import main
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "graphconv.cli", "check", "vgg_small", "--backend", "host", "--dtype",
                           "float32", "--winograd"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Winograd F(2x2, 3x3) on conv1_2, conv2_1, conv2_2, conv3_1, conv3_2," in done.stdout   # conv layers, bn folded in
    assert "_wino " in done.stdout and " 0 mismatched" in done.stdout
    assert main(["emit", "vgg_small", "--winograd", "--no-nvrtc", "-o", str(tmp_path)]) in (0, None)
    assert "vgg_small --stage fused, Winograd F(2x2, 3x3) on conv1_2, conv2_1, " in capsys.readouterr().out
    assert main(["run", "lenet5", "--backend", "host", "--winograd"]) in (0, None)    # 5 x 5 only: never silent
    assert capsys.readouterr().out.startswith("lenet5 on host, --winograd changes no kernel here (it takes 3 x 3 "
                                              "stride-1 convolutions with at least 4 input and 16 output channels)")
    assert len(list(tmp_path.glob("*_wino.cu"))) == 5 and len(list(tmp_path.glob("*_wino_filter.cu"))) == 5
    done = subprocess.run([sys.executable, "-m", "graphconv.cli", "check", "vgg_small", "--winograd"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "--winograd is for the kernel backends" in done.stderr
