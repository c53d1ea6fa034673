"""The GPU suite: the cuda backend on a real device (skipped without one; run it with
`python -m pytest -m gpu`). Every kernel of every bundled model and stage against NumPy, the
captured training step against plain launches, training to the numpy backend's accuracy with
bitwise-reproducible weights, and compute-sanitizer on LeNet-5's kernels where the tool exists."""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import graphconv as gc
from codegen.check import check_kernels
from graphconv.data import random_inputs
from graphconv.models import MODELS
from graphconv.pipeline import build
from test_codegen import CASES, realistic_params
from test_tf32 import TF32_GRAPHS, tf32_graph

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("model,stage", CASES)
def test_every_kernel_matches_numpy_on_the_device(model, stage):
    graph = build(MODELS[model](), stage)
    results = check_kernels(graph, random_inputs(graph, 3, 0), realistic_params(graph), backend="cuda")
    bad = [f"{r.node} [{r.op}] {r.kernels}: abs {r.max_abs:.3g} rel {r.max_rel:.3g} {r.note}" for r in results
           if not r.ok]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("model", TF32_GRAPHS)
@pytest.mark.parametrize("stage", ["fused", "fused-train"])
def test_every_tf32_kernel_matches_numpy_on_the_device(model, stage):
    """The tensor cores' mma.sync against NumPy (the host backend emulates the instruction from the
    same fragments; the hardware's own layout and summation are checked only here)."""
    graph = tf32_graph(model, stage)
    results = check_kernels(graph, random_inputs(graph, 3, 0), realistic_params(graph), backend="cuda", tf32=True)
    bad = [f"{r.node} [{r.op}] {r.kernels}: abs {r.max_abs:.3g} rel {r.max_rel:.3g} {r.note}" for r in results
           if not r.ok]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("model", ["vgg_small", "resnet8"])
@pytest.mark.parametrize("stage", ["fused", "fused-train"])
def test_every_winograd_kernel_matches_numpy_on_the_device(model, stage):
    """The opt-in Winograd F(2x2, 3x3) kernels (winograd=True) on the device before `--variants` times
    them: 16-byte cp.async copies and float4 shared reads, alignment the host does not check."""
    graph = build(MODELS[model](), stage)
    results = check_kernels(graph, random_inputs(graph, 3, 0), realistic_params(graph), backend="cuda", winograd=True)
    assert any(k.endswith("_wino") for r in results for k in r.kernels)
    bad = [f"{r.node} [{r.op}] {r.kernels}: abs {r.max_abs:.3g} rel {r.max_rel:.3g} {r.note}" for r in results
           if not r.ok]
    assert not bad, "\n".join(bad)


def new_layers_net():
    """Every layer added after the bundled models, in one network: dropout, a channel concat (and
    its gradient's slices), replicate and reflect padding, a transposed conv, bilinear upsampling, an
    uneven adaptive max pool, softmax over channels, log_softmax, mean."""
    g = gc.Graph("layers", "float32")
    x = g.input("x", ("N", 3, 12, 10))
    h = g.concat([g.relu(g.conv2d(x, 5, 3, padding=1, padding_mode="reflect", name="c1")),
                  g.conv2d(x, 3, 1, name="c1b")], name="cat")
    h = g.tanh(g.conv2d(h, 8, 3, padding=2, padding_mode="replicate", name="crep"), name="trep")     # 14 x 12
    h = g.dropout(h, p=0.2, name="drop")
    h = g.conv_transpose2d(h, 6, 3, stride=2, padding=1, output_padding=1, name="deconv")        # 28 x 24
    h = g.adaptive_max_pool2d(g.upsample(h, size=(15, 13), mode="bilinear", name="interp"), (4, 3), name="amax")
    h = g.mul(g.softmax(h, dim=1, name="attn"), h, name="gate")
    pooled = g.mean(h, dim=(2, 3), name="gap")
    scores = g.linear(g.log_softmax(g.linear(g.flatten(h), 100, name="fc1"), name="lsm"), 10, name="fc2")
    g.output(g.add(scores, g.linear(pooled, 10, name="fc_gap"), name="sum"))
    return g


@pytest.mark.parametrize("stage", ["forward", "train", "fused-train"])
def test_the_new_layers_kernels_match_numpy_on_the_device(stage):
    graph = build(new_layers_net(), stage)
    results = check_kernels(graph, random_inputs(graph, 3, 0), realistic_params(graph), backend="cuda")
    bad = [f"{r.node} [{r.op}] {r.kernels}: abs {r.max_abs:.3g} rel {r.max_rel:.3g} {r.note}" for r in results
           if not r.ok]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("stage, strided", [("fused", True), ("train", False), ("train", True)])
def test_the_depthwise_kernels_match_numpy_on_the_device(stage, strided):
    """The depthwise forward, input-gradient and weight-gradient kernels (no bundled model has a
    depthwise conv): a multiplier, a 3 x 5 dilated filter, a stride-2 residual block, a strided
    conv's gathering input gradient, 70 images so that the weight gradient's reduce adds several
    blocks' partial sums."""
    from test_depthwise import net, train_net
    graph = build(net((17, 19), 4, 1, 3, residual=True, stride=2, padding=1) if stage == "fused" else
                  train_net((23, 30), 3, 2, 3, stride=(2, 3), padding=1) if strided else
                  train_net((12, 11), 5, 3, (3, 5), padding=(1, 2), dilation=(2, 1)), stage)
    results = check_kernels(graph, random_inputs(graph, 70, 0), realistic_params(graph), backend="cuda")
    assert any("depthwise" in k for r in results for k in r.kernels)
    bad = [f"{r.node} [{r.op}] {r.kernels}: abs {r.max_abs:.3g} rel {r.max_rel:.3g} {r.note}" for r in results
           if not r.ok]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("model", ["lenet5", "vgg_small", "resnet8"])
def test_a_captured_training_step_equals_plain_launches(model):
    graph = build(MODELS[model](), "fused-train")
    program = gc.compile(graph, backend="cuda")
    step = program.bind(32)
    params = realistic_params(graph)
    for seed in range(2):
        inputs = random_inputs(graph, 32, seed)
        got, want = step.run(inputs, params), program.run(inputs, params)
        for key in want:
            assert np.array_equal(got[key], want[key]), key


def test_lenet5_trains_on_cuda_as_on_numpy_and_reproducibly():
    from graphconv import data
    from graphconv.training import Optimizer, Trainer, batches
    graph = MODELS["lenet5"]()
    x_tr, y_tr, x_te, y_te = data.load("digits", graph.inputs[0].shape)
    runs = {}
    for name, backend in (("numpy", "numpy"), ("cuda", "cuda"), ("cuda again", "cuda")):
        trainer = Trainer(graph, Optimizer("adam", lr=1e-3), backend=backend, seed=0)
        for epoch in range(2):
            for idx in batches(len(x_tr), 64, 0, epoch):
                trainer.step(x_tr[idx], y_tr[idx])
        runs[name] = (trainer.evaluate(x_te, y_te)[1], trainer.params)
    assert abs(runs["cuda"][0] - runs["numpy"][0]) <= 0.01, runs
    for key, value in runs["cuda"][1].items():
        assert value.tobytes() == runs["cuda again"][1][key].tobytes(), key


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not installed")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_finds_nothing_in_lenet5s_kernels(tool):
    """LeNet-5's kernels, and a small TF32 net whose direct convolutions double-buffer their stages
    (cp.async copies and register loads of the next stage in flight: racecheck's business)."""
    script = textwrap.dedent("""
        import graphconv as gc
        from graphconv.data import random_inputs
        from graphconv.models import lenet5
        from graphconv.pipeline import build
        for stage in ("fused", "fused-train"):
            graph = build(lenet5(), stage)
            gc.compile(graph, backend="cuda").run(random_inputs(graph, 4, 0), gc.init_params(graph, seed=0))
        g = gc.Graph("tf32net", "float32")
        h = g.max_pool2d(g.relu(g.conv2d(g.input("x", ("N", 32, 8, 8)), 64, 3, padding=1, name="c1")), 2)
        h = g.relu(g.conv2d(h, 64, 3, padding=1, name="c2"))
        g.output(g.linear(g.flatten(h), 10, name="fc"))
        graph = build(g, "fused-train")
        gc.compile(graph, backend="cuda", tf32=True).run(random_inputs(graph, 4, 0), gc.init_params(graph, seed=0))
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(["compute-sanitizer", f"--tool={tool}", "--error-exitcode=3", sys.executable, "-c", script],
                          cwd=root, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout + done.stderr      # memcheck: "ERROR SUMMARY: 0 errors"; racecheck: "(0 errors, 0 warnings)"
    assert "ERROR SUMMARY: 0 errors" in summary or "(0 errors, 0 warnings)" in summary, summary[-3000:]
