"""Code generation end to end: every kernel of every bundled model and stage compiled by NVRTC for
sm_90 (no error, warning or spill) and run on the host backend against the NumPy reference of its
node with poisoned outputs; determinism; the committed kernels_generated/; the buffer plan; errors."""
import json
import os
import re
import pathlib

import numpy as np
import pytest

import graphconv as gc
from codegen import nvrtc
from codegen.check import check_kernels, check_races
from codegen.emit import BUNDLED, emit, regenerate_bundled
from codegen.program import Program
from graphconv.data import random_inputs
from graphconv.errors import BackendError, CompileError
from graphconv.models import MODELS
from graphconv.pipeline import STAGES, build

ROOT = pathlib.Path(__file__).resolve().parent.parent
CASES = [(m, s) for m in MODELS for s in STAGES if not (m == "seed_conv" and s in ("backward", "train", "fused-train"))]


def realistic_params(graph, seed=0):
    """Parameters with running statistics away from 0 / 1, so eval-mode batch norm matters."""
    params = gc.init_params(graph, seed=seed)
    rng = np.random.default_rng(seed)
    for name, value in params.items():
        if name.endswith("running_var"):
            params[name] = rng.uniform(0.5, 2.0, value.shape).astype(value.dtype)
        elif name.endswith("running_mean"):
            params[name] = rng.uniform(-0.5, 0.5, value.shape).astype(value.dtype)
    return params


@pytest.mark.parametrize("model,stage", CASES)
def test_every_kernel_compiles_for_sm90_and_matches_numpy_on_the_host(model, stage):
    graph = build(MODELS[model](), stage)
    program = Program(graph)
    if nvrtc.available():
        compiled = nvrtc.compile_many([(s.source, s.name) for s in program.kernels])
        assert all(c.spill_stores == 0 and c.spill_loads == 0 for c in compiled)
    results = check_kernels(graph, random_inputs(graph, 2, 0), realistic_params(graph))
    bad = [f"{r.node} [{r.op}] {r.kernels}: abs {r.max_abs:.3g} rel {r.max_rel:.3g} {r.note}" for r in results
           if not r.ok]
    assert not bad, "\n".join(bad)
    launched = {n for launch in program.launches for n in launch.computes}
    computed = {n.name for n in graph.topo() if n.role == "op"} - set(program.alias) - program.inlined
    assert computed == launched        # every node that computes something has a kernel


@pytest.mark.parametrize("model", ["lenet5", "vgg_small", "resnet8"])
def test_no_kernel_of_a_training_step_races_between_its_threads(model):
    """Every kernel of the fused training step under each of the host's schedules (a block's threads in
    both orders, cp.async copies landing at their wait and at their issue): a missing barrier or wait
    makes some schedule read a value before it is there, or after it is overwritten; each kernel must
    give the same bits under all four (and match NumPy under each)."""
    graph = build(MODELS[model](), "fused-train")
    bad = [f"{r.node} {r.kernels}: {r.note}" for r in
           check_races(graph, random_inputs(graph, 2, 0), realistic_params(graph)) if not r.ok]
    assert not bad, "\n".join(bad)


def test_the_same_graph_gives_byte_identical_kernels(tmp_path):
    graph = build(MODELS["lenet5"](), "fused-train")
    first = [(s.name, s.source) for s in Program(graph).kernels]
    second = [(s.name, s.source) for s in Program(build(MODELS["lenet5"](), "fused-train")).kernels]
    assert first == second
    emit(graph, tmp_path, check_nvrtc=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    emit(graph, tmp_path, check_nvrtc=False)      # nothing changed: nothing rewritten
    assert stamps == {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}


@pytest.mark.skipif(not nvrtc.available(), reason="NVRTC not installed")
def test_re_emitting_keeps_the_reported_registers_of_unchanged_kernels(tmp_path):
    """ptxas now and then allocates a few registers more or fewer for one source: an unchanged kernel
    keeps the figures its manifest reports (nothing rewritten); a changed one gets NVRTC's new ones."""
    g = gc.Graph("tiny")
    x = g.input("x", ("N", 2, 6, 6))
    g.output(g.relu(g.conv2d(x, 3, 3, padding=1, name="conv")))
    emit(g, tmp_path)
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    reported = manifest["kernels"][0]["nvrtc_sm_90"]["registers"]
    manifest["kernels"][0]["nvrtc_sm_90"]["registers"] = reported + 7     # as another run of ptxas might say
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    stamp = path.stat().st_mtime_ns
    assert emit(g, tmp_path)["kernels"][0]["nvrtc_sm_90"]["registers"] == reported + 7
    assert path.stat().st_mtime_ns == stamp
    manifest["kernels"][0]["sha256"] = "0" * 64                               # as if its source had changed
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    assert emit(g, tmp_path)["kernels"][0]["nvrtc_sm_90"]["registers"] == reported


@pytest.mark.skipif(not nvrtc.available(), reason="NVRTC not installed")
def test_kernels_generated_is_what_the_generator_writes_today(tmp_path):
    regenerate_bundled(tmp_path)
    for model, stages in BUNDLED.items():
        for stage in stages:
            ours, committed = tmp_path / model / stage, ROOT / "kernels_generated" / model / stage
            assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in committed.iterdir()), \
                f"{model}/{stage}: run `python -m codegen.emit` and commit kernels_generated/"
            for path in ours.glob("*.cu"):
                assert path.read_text() == (committed / path.name).read_text(), f"{model}/{stage}/{path.name} differs"
            new, old = json.loads((ours / "manifest.json").read_text()), json.loads((committed / "manifest.json").read_text())
            # NVRTC's register counts are its report on the machine that emitted them: another NVRTC,
            # or ptxas now and then for one source (codegen.emit._keep_reported_resources), differs
            for m in (new, old):
                m["nvrtc"] = None
                for k in m["kernels"]:
                    assert k.pop("nvrtc_sm_90")["spill_stores"] == 0, f"{model}/{stage}/{k['name']} spills"
            assert new == old, f"{model}/{stage}/manifest.json differs"


def test_generated_file_header_names_kernel_nodes_layers_shapes_template_and_launch():
    spec = Program(build(MODELS["lenet5"](), "fused")).kernels[0]
    head = spec.source.splitlines()[:7]
    assert head[0] == f"// {spec.name}"
    assert "template direct_conv.cu.j2" in head[1]
    assert "pool1" in head[2] and "conv1.weight" in head[3] and "float32[N, 20, 14, 14]" in head[3]
    assert head[4].startswith("//   launch:    grid (") and "block (" in head[4]
    assert spec.name.startswith("conv2d_direct_relu_max_pool2d_f32_c1_k20_r5x5")


def test_buffer_plan_reuses_dead_buffers_and_never_shares_live_ones():
    program = Program(build(MODELS["vgg_small"](), "fused-train"))
    plan = program.plan(8)
    unshared = program.plan(8, reuse=False)
    assert sum(plan.sizes) < sum(unshared.sizes)
    first, last = {}, {}
    for step, launch in enumerate(program.launches):
        for arg in launch.spec.args:
            if arg.value is not None and program.resolve(arg.value) in program.values:
                key = program.resolve(arg.value)
                first.setdefault(key, step)
                last[key] = step
    keep = {program.resolve(o) for o in program.outputs}
    in_place = set(plan.inplace)
    assert in_place     # Adam's updates, relu gradients: results written over a dying operand
    for operand, result in in_place:
        assert program.launches[first[result]].spec.template == "pointwise.cu.j2"
        assert last[operand] == first[result] and program.values[operand] == program.values[result]
    for a in plan.slot:
        for b in plan.slot:
            if a < b and plan.slot[a] == plan.slot[b] and (a, b) not in in_place and (b, a) not in in_place:
                end_a = len(program.launches) if a in keep else last[a]
                end_b = len(program.launches) if b in keep else last[b]
                assert end_a < first[b] or end_b < first[a], f"{a} and {b} share a buffer while both live"


def test_one_compiled_program_serves_every_batch_size():
    graph = build(MODELS["lenet5"](), "fused")
    run = gc.compile(graph, backend="host")
    params = gc.init_params(graph, seed=3)
    for batch in (1, 5, 33):
        inputs = random_inputs(graph, batch, batch)
        np.testing.assert_allclose(run.run(inputs, params)["fc2"], gc.compile(graph).run(inputs, params)["fc2"],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not nvrtc.available(), reason="NVRTC not installed")
def images_net(fixed):
    """Every convolution family on inputs whose image count is not the batch: a graph with a fixed
    batch of 3 (no batch symbol), or a reshape that makes 2 x N images of N examples."""
    g = gc.Graph("images")
    if fixed:
        x = g.input("x", (3, 4, 10, 10))
    else:
        x = g.reshape(g.input("x", ("N", 8, 10, 10)), (-1, 4, 10, 10), name="two")
    h = g.relu(g.conv2d(x, 16, 3, padding=1, name="direct"))                      # direct, its dw direct
    h = g.relu(g.conv2d(h, 16, 3, padding=1, groups=16, name="dw"))              # depthwise
    h = g.max_pool2d(g.relu(g.conv2d(h, 8, 3, stride=2, padding=1, name="strided")), 2)   # the GEMM, pooled
    h = g.conv_transpose2d(h, 4, 2, stride=2, name="up")
    g.output(g.linear(g.flatten(h), 3, name="fc"))
    return g


@pytest.mark.parametrize("fixed", [True, False])
@pytest.mark.parametrize("variant", ["fp32", "tf32", "winograd"])
def test_convolutions_launch_every_image_when_the_images_are_not_the_batch(fixed, variant):
    """A graph without a batch dim ran every convolution on its first image only (the kernels took
    their image count from the batch, 1 there); a conv after a reshape to 2 x N images, on N."""
    tf32, winograd = variant == "tf32", variant == "winograd"
    for stage in ("forward", "fused-train") if variant == "fp32" else ("fused-train",):
        graph = build(images_net(fixed), stage)
        if stage == "forward" and variant == "fp32":
            params = gc.init_params(graph, seed=1)
            x = random_inputs(graph, 2, 1)
            ours = gc.compile(graph, backend="host").run(x, params)["fc"]
            np.testing.assert_allclose(ours, gc.compile(graph).run(x, params)["fc"], rtol=1e-4, atol=1e-5)
        results = check_kernels(graph, random_inputs(graph, 2, 0), realistic_params(graph), tf32=tf32,
                                winograd=winograd)
        bad = [f"{r.node} [{r.op}] {r.kernels}: {r.note}" for r in results if not r.ok]
        assert not bad, "\n".join(bad)
        families = {k.split("_")[1] for r in results for k in r.kernels if k.startswith("conv2d_")}
        assert "depthwise" in families and ("direct" in families or stage != "forward"), families


def test_nan_and_roots_of_negatives_come_out_of_the_kernels_as_numpy_gives_them():
    """relu(NaN) is NaN (the C form was "x where x > 0": 0), sympy's Max/Min propagate NaN as
    np.maximum does (C's fmax drops it), x**(1/3) is NaN below 0 (C's cbrt(-8) is -2), and a fused
    conv -> relu -> max-pool keeps a NaN its window holds (the epilogue's v > best never took it)."""
    import sympy as sp
    t = sp.Symbol("x", real=True)
    for name, expr in (("nan_max", sp.Max(t, 0, t - 1)), ("nan_min", sp.Min(t, 1)), ("root3", sp.cbrt(t))):
        if name not in gc.ops.OPS:
            gc.define_activation(name, expr)
    for dtype in ("float32", "float64"):
        g = gc.Graph("nan", dtype)
        x = g.input("x", ("N", 6))
        g.output(*[g.activation(x, act, name=act) for act in ("relu", "leaky_relu", "nan_max", "nan_min", "root3")])
        xs = {"x": np.array([[np.nan, -np.inf, np.inf, -8, 0, 8]], dtype)}
        want, got = gc.compile(g).run(xs), gc.compile(g, backend="host").run(xs)
        for act in want:
            np.testing.assert_array_equal(got[act], want[act], err_msg=f"{act} {dtype}")
        assert np.isnan(want["relu"][0, 0]) and np.isnan(want["root3"][0, 3]) and np.isnan(want["nan_min"][0, 0])
    for stage in ("fused", "fused-train"):
        g = gc.Graph("pooled")
        h = g.max_pool2d(g.relu(g.conv2d(g.input("x", ("N", 1, 4, 4)), 2, 1, name="c")), 2)
        g.output(g.linear(g.flatten(h), 2, name="fc") if stage == "fused-train" else h)
        graph = build(g, stage)
        params = gc.init_params(graph, seed=0)
        params["c.weight"][:], params["c.bias"][:] = 1, 0
        xs = np.arange(32, dtype=np.float32).reshape(2, 1, 4, 4)
        xs[0, 0, 0, 0] = np.nan
        inputs = {**random_inputs(graph, 2, 0), "x": xs}
        want = gc.compile(graph).run(inputs, params, keep=True)["pool1"]
        got = gc.compile(graph, backend="host").run(inputs, params, keep=True)["pool1"]
        assert np.isnan(got[0, :, 0, 0]).all() and np.array_equal(got, want, equal_nan=True), (stage, got, want)


def test_exact_gelu_from_erf_runs_on_numpy_and_the_kernels_and_matches_pytorch():
    """x (1 + erf(x / sqrt 2)) / 2, PyTorch's default nn.GELU, was refused: NumPy has no erf."""
    import sympy as sp
    from graphconv.gradcheck import check_rule
    from torch_oracle import torch
    t = sp.Symbol("x", real=True)
    if "gelu_erf" not in gc.ops.OPS:
        gc.define_activation("gelu_erf", t * (1 + sp.erf(t / sp.sqrt(2))) / 2)
    xs = np.linspace(-4, 4, 33).reshape(1, -1)
    for dtype in ("float32", "float64"):
        g = gc.Graph("gelu", dtype)
        g.output(g.activation(g.input("x", ("N", 33)), "gelu_erf", name="act"))
        want = gc.compile(g)(xs.astype(dtype))
        np.testing.assert_allclose(gc.compile(g, backend="host")(xs.astype(dtype)), want,
                                   rtol=2e-6 if dtype == "float32" else 1e-14, atol=1e-7 if dtype == "float32" else 1e-15)
        if torch is not None:
            np.testing.assert_allclose(want, torch.nn.functional.gelu(torch.tensor(xs)).numpy(),
                                       rtol=1e-6 if dtype == "float32" else 1e-14, atol=1e-7 if dtype == "float32" else 1e-15)
    checks = check_rule("gelu_erf", [np.random.default_rng(0).standard_normal((3, 5))], {}, np.random.default_rng(1))
    assert checks and all(c.ok for c in checks), checks          # its sympy derivative, by finite differences


def test_a_kernel_that_does_not_compile_is_reported_with_node_layer_template_and_line(tmp_path, monkeypatch):
    program = Program(build(MODELS["lenet5"](), "fused"))
    spec = program.kernels[0]
    spec.source = spec.source.replace("const int tid = threadIdx.x;", "const int tid = threadIdx.x", 1)
    from codegen.emit import where_of
    with pytest.raises(CompileError) as err:
        nvrtc.compile_kernel(spec.source, spec.name, where=where_of(program, spec.name))
    text = str(err.value)
    assert text.startswith(f"conv1: pool1 [fused_conv] template direct_conv.cu.j2: {spec.name}: NVRTC failed")
    assert "error: expected a \";\"" in text
    number, quoted = re.search(r"\n  line (\d+): (.*)$", text).groups()     # the line NVRTC points at, quoted
    assert spec.source.splitlines()[int(number) - 1].strip() == quoted


def test_cuda_backend_without_a_gpu_says_what_to_use_instead():
    with pytest.raises(BackendError, match="backend='host'"):
        gc.compile(MODELS["lenet5"](), backend="cuda")


def test_a_symbolic_spatial_dim_must_be_given_a_size():
    g = gc.Graph("free")
    x = g.input("x", ("N", 3, "H", "W"))
    g.output(g.relu(g.conv2d(x, 4, 3, name="conv")))
    with pytest.raises(CompileError, match="--dim H=SIZE"):
        Program(g)


def test_an_op_without_a_kernel_is_refused_with_the_layer_and_the_way_out():
    from graphconv.ops import OPS, Op, register

    class Halve(Op):                  # a user's op with a NumPy reference and no lowering
        name = "test_halve_nokernel"

        def infer(self, ins, attrs):
            return ins[0]

        def reference(self, xs, attrs):
            return xs[0] / 2

    if Halve.name not in OPS:
        register(Halve())
    g = gc.Graph("user_op")
    g.output(g.apply(Halve.name, g.relu(g.input("x", ("N", 4))), name="half"))
    with pytest.raises(CompileError, match=r"^half \[test_halve_nokernel\]: no kernel for op test_halve_nokernel yet; "
                                           r"run this graph with backend='numpy'"):
        Program(g)


def test_lenet5_trains_on_the_host_backend_as_on_numpy():
    """A short run of the README's training on both backends: the same batches, the same seed; the
    host backend runs the fused training step's kernels and must land where the numpy backend does."""
    from graphconv import data
    from graphconv.training import Optimizer, Trainer, batches
    graph = MODELS["lenet5"]()
    x_tr, y_tr, x_te, y_te = data.load("digits", graph.inputs[0].shape)
    results = {}
    for backend in ("numpy", "host"):
        trainer = Trainer(graph, Optimizer("adam", lr=1e-3), backend=backend, seed=0)
        losses = [trainer.step(x_tr[idx], y_tr[idx])[0] for idx in list(batches(len(x_tr), 64, 0, 0))[:12]]
        results[backend] = (losses, trainer.evaluate(x_te, y_te)[1])
    np.testing.assert_allclose(results["host"][0], results["numpy"][0], rtol=2e-3)
    assert abs(results["host"][1] - results["numpy"][1]) <= 0.01, results
    assert results["host"][1] > 0.5


DETERMINISM_CHILD = r'''
import sys
sys.path.insert(0, sys.argv[1])
import graphconv as gc
from graphconv.data import random_inputs
from graphconv.models import MODELS
from graphconv.pipeline import build
from test_codegen import realistic_params
graph = build(MODELS["vgg_small"](), "fused-train")
run = gc.compile(graph, backend="host")
params, inputs = realistic_params(graph), random_inputs(graph, 4, 1)
first, second = run.run(inputs, params), run.run(inputs, params)
print(sorted(key for key in first if first[key].tobytes() != second[key].tobytes()))
'''


def test_training_step_kernels_are_bitwise_deterministic(tmp_path):
    """No float atomics anywhere: two runs of a training step give the same bits while blocks run in
    parallel on the host backend, in any order. In a child process on every core with at least two
    OpenMP threads (a pytest-xdist worker is pinned to one core, where blocks would run one by one;
    conftest keeps the cores it had in GRAPHCONV_TEST_CPUS)."""
    import subprocess
    import sys
    script = tmp_path / "child.py"
    script.write_text(DETERMINISM_CHILD)
    cpus = [int(c) for c in os.environ.get("GRAPHCONV_TEST_CPUS", "").split(",") if c] or os.sched_getaffinity(0)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(2, len(cpus))),
           "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), os.path.dirname(__file__)], env=env, capture_output=True,
                          text=True, timeout=900, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout


def cli(capsys, *argv):
    from graphconv.cli import main
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_emit_writes_kernels_and_a_manifest(capsys, tmp_path):
    code, out, _ = cli(capsys, "emit", "lenet5", "--stage", "fused", "-o", str(tmp_path))
    assert code == 0 and "lenet5 --stage fused: 5 kernels, 5 launches" in out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    first = manifest["kernels"][0]
    assert first["nodes"] == ["pool1"] and first["replaces"] == ["conv1", "relu1", "pool1"]
    assert [a["type"] for a in first["arguments"]] == ["const float*", "const float*", "const float*", "float*", "int"]
    assert first["arguments"][0]["binds"] == "x" and first["arguments"][-1]["binds"] == "batch size"
    source = (tmp_path / first["file"]).read_text()
    assert __import__("hashlib").sha256(source.encode()).hexdigest() == first["sha256"]
    if nvrtc.available():
        assert first["nvrtc_sm_90"]["spill_stores"] == 0 and first["nvrtc_sm_90"]["registers"] > 0
    assert manifest["buffer_plan"]["peak_live_bytes"] > 0


def test_cli_check_run_and_backend_errors(capsys):
    code, out, _ = cli(capsys, "check", "lenet5", "--backend", "host", "--dtype", "float32")
    assert code == 0 and "5 kernels for 4 nodes, 0 mismatched" in out and "1 outputs, 0 mismatched" in out
    code, out, _ = cli(capsys, "run", "lenet5", "--backend", "host", "--batch", "3")
    assert code == 0 and "lenet5 on host: batch 3" in out and "fc2: f32[N,10] -> float32[3, 10]" in out
    code, out, err = cli(capsys, "run", "lenet5", "--backend", "cuda")
    assert code == 2 and "backend='host'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_optimizers_updates_of_one_parameter_are_one_kernel():
    """Adam's m', v' and p' for one parameter: one kernel that reads g, p, m, v once, hands m' and v'
    on in registers and stores all three (each is a graph output)."""
    graph = build(MODELS["lenet5"](), "fused-train")
    program = Program(graph)
    groups = [l for l in program.launches if l.members]
    assert len(groups) == 1 and groups[0].spec.name.startswith("adam_moment1_adam_moment2_adam_param_f32_8tensors")
    members = groups[0].members
    assert members[12:15] == ("fc1.weight.adam_m.next", "fc1.weight.adam_v.next", "fc1.weight.next")
    writes = [a.value for a in groups[0].spec.args if a.writes]
    assert writes == list(members) and len(writes) == 24
    assert len(program.launches) == 24           # fc1 + relu: a split-K partial + reduce; Adam: one launch;
    # each bias gradient and the loss one kernel (the last block to arrive adds the chunks); dloss a literal


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_one_launch_updates_every_parameter_to_the_bits_of_one_launch_each(optimizer, monkeypatch):
    """An optimizer's update of each parameter is one elementwise rule over different tensors: the
    Program runs them as one multi-tensor launch (each tensor its own range of blocks, the scalar
    operands passed once) with every update's bits as with a launch per parameter, outputs poisoned
    first. vgg_small's 22 parameters: one launch; within it the buffer plan writes a result over an
    operand only of the same tensor (another tensor's blocks run at the same time)."""
    from codegen.lowering import pointwise
    from codegen.runner import CompiledProgram
    from graphconv.training import Optimizer
    graph = build(MODELS["vgg_small"](), "fused-train", optimizer=Optimizer(kind=optimizer, weight_decay=0.01))
    program = Program(graph)
    merged = [l for l in program.launches if l.spec.params.get("segments")]
    assert len(merged) == 1 and len(merged[0].spec.params["segments"]) == 22
    segments = merged[0].spec.params["segments"]
    assert segments[0]["first"] == 0 and all(a["end"] == b["first"] for a, b in zip(segments, segments[1:]))
    assert merged[0].spec.grid[0] == segments[-1]["end"]
    assert set(merged[0].computes) == {n for n in graph.meta["updates"].values() if n != "opt.step.next"
                                       and ".running_" not in n}
    segment_of = merged[0].spec.params["segment_of"]
    step = program.launches.index(merged[0])
    plan = program.plan(4)
    for operand, result in plan.inplace:
        if result in segment_of:
            assert segment_of[operand] == segment_of[result], (operand, result)
    inputs, params = random_inputs(graph, 3, 0), realistic_params(graph)
    if "opt.step" in params:
        params["opt.step"] = np.full_like(params["opt.step"], 4)
    together = CompiledProgram(graph, "host", poison=True).run(inputs, params)
    monkeypatch.setattr(pointwise, "MAX_TENSORS", 1)
    import codegen.program as program_module
    monkeypatch.setattr(program_module, "MAX_TENSORS", 1)
    apart = Program(graph)
    assert len(apart.launches) == len(program.launches) + 21 and step < len(program.launches)
    alone = CompiledProgram(graph, "host", poison=True).run(inputs, params)
    for name in graph.meta["updates"].values():
        assert together[name].tobytes() == alone[name].tobytes(), name


def test_a_value_two_tensors_of_a_launch_read_is_never_written_over_in_place():
    """A fixed batch makes every elementwise op a candidate: sigmoid(h) twice is one two-tensor launch
    reading h in both segments; neither result may take h's buffer in place (the other segment's
    blocks may still be reading it): the same numbers with blocks in either order."""
    from codegen import host
    from codegen.runner import CompiledProgram
    g = gc.Graph("mt")
    h = g.linear(g.input("x", (4, 8)), 300, name="fc")
    g.output(g.sigmoid(h, name="s1"), g.sigmoid(h, name="s2"))
    program = Program(g)
    merged = [l for l in program.launches if l.spec.params.get("segments")]
    assert len(merged) == 1 and merged[0].spec.params["segment_of"]["fc"] is None
    assert program.plan(4).inplace == []
    params, xs = gc.init_params(g, seed=0), np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    want = gc.compile(g).run({"x": xs}, params)
    for order in ("forward", "reverse"):
        with host.schedule(order):
            got = CompiledProgram(g, "host").run({"x": xs}, params)
        for name in ("s1", "s2"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=f"{order} {name}")


def test_multi_tensor_launches_of_results_without_operands_and_within_the_parameter_limit(monkeypatch):
    """Zero gradients of a layer the loss does not reach are fills (no tensor operand): merged, they
    compile (NVRTC and g++) and the step matches NumPy. A launch's kernel parameters stay within
    PARAM_BYTES: a smaller limit splits vgg_small's Adam launch into several, each within it."""
    from codegen.runner import CompiledProgram
    from graphconv.training import Optimizer, attach_loss, build_train_step
    g = gc.Graph("unreached")
    x = g.input("x", ("N", 4))
    g.output(g.linear(x, 3, name="fc1"))
    g.linear(x, 3, name="fc2")
    step = build_train_step(attach_loss(g), Optimizer("sgd", lr=0.1))
    fills = [k for k in Program(step).kernels if k.name.startswith("fill_") and k.params.get("segments")]
    assert fills and all("const float \n" not in k.source for k in fills)
    if nvrtc.available():
        nvrtc.compile_many([(k.source, k.name) for k in fills])
    inputs, params = random_inputs(step, 3, 0), gc.init_params(step, seed=0)
    got, want = CompiledProgram(step, "host", poison=True).run(inputs, params), gc.compile(step).run(inputs, params)
    for name in step.meta["updates"].values():
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    import codegen.program as program_module
    monkeypatch.setattr(program_module, "PARAM_BYTES", 600)
    merged = [l.spec for l in Program(build(MODELS["vgg_small"](), "fused-train")).launches if l.spec.params.get("segments")]
    assert len(merged) >= 3 and sum(len(s.params["segments"]) for s in merged) == 22
    assert all(8 * sum(a.is_pointer for a in s.args) + 4 <= 600 for s in merged)


def test_updates_between_backward_kernels_still_become_one_launch():
    """lenet5_swish's fully connected layers' updates come before its conv layers' gradients are
    computed; the earlier updates move down to the last one (nothing between reads what they write):
    one Adam launch, the step's last."""
    program = Program(build(MODELS["lenet5_swish"](), "fused-train"))
    adam = [i for i, l in enumerate(program.launches) if "adam" in l.spec.name]
    assert adam == [len(program.launches) - 1] and len(program.launches[-1].spec.params["segments"]) == 8


def test_launches_that_read_each_others_results_stay_apart():
    """Two launches of one rule where the second reads the first's result (through a view) are not
    one multi-tensor launch: their blocks would run at once. Launches of a rule whose size grows with
    the batch never join either."""
    from codegen.runner import CompiledProgram
    g = gc.Graph("chain", "float32")
    x = g.input("x", ("N", 6))
    p = g.param("p", (6,), ("uniform", 1.0))
    a = g.relu(p, name="a")
    b = g.relu(g.reshape(a, (2, 3)), name="b")
    c = g.relu(x, name="c")
    d = g.relu(g.reshape(c, ("N", 2, 3)), name="d")
    g.output(b, d)
    program = Program(g)
    assert [l.node for l in program.launches] == ["a", "b", "c", "d"]
    got = CompiledProgram(g, "host", poison=True).run(random_inputs(g, 2, 0), gc.init_params(g, seed=0))
    np.testing.assert_array_equal(got["b"].reshape(-1), np.maximum(gc.init_params(g, seed=0)["p"], 0))


def test_what_the_scalars_alone_give_is_computed_once_per_thread_to_the_same_bits(monkeypatch):
    """Adam's bias corrections 1 - beta**t depend on the step count alone: computed before the
    element loop, not per element, and the updates come out bit for bit as with them inside it."""
    from codegen.lowering import pointwise
    from codegen.runner import CompiledProgram
    g = gc.Graph("opt", "float32")
    g.output(g.linear(g.flatten(g.input("x", ("N", 2, 4, 4))), 3, name="fc"))
    step = build(g, "fused-train")
    adam = next(k for k in Program(step).kernels if k.name.startswith("adam_moment1"))
    before_loop, loop = adam.source.split("for (long long i", 1)
    assert before_loop.count("expf(") == 2 and "expf(" not in loop and "_h2_0*(sqrtf(-r1/_h2_1)" in loop
    inputs, params = random_inputs(step, 5, 0), realistic_params(step)
    params["opt.step"] = np.full_like(params["opt.step"], 6)     # a later step: the corrections are not trivial
    hoisted = CompiledProgram(step, "host").run(inputs, params)
    from codegen.cprinter import c_expression_hoisting
    monkeypatch.setattr(pointwise, "c_expression_hoisting",
                        lambda expr, dtype, names, invariant, prefix: c_expression_hoisting(expr, dtype, names, (), prefix))
    inline = Program(step)
    assert "expf(" in next(k for k in inline.kernels if k.name == adam.name).source.split("for (long long i", 1)[1]
    inside = CompiledProgram(step, "host").run(inputs, params)
    for name in step.meta["updates"].values():
        assert inside[name].tobytes() == hoisted[name].tobytes(), name


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_hoisting_keeps_the_bits_of_any_scalar_expression(dtype, monkeypatch):
    """The review's cases: a scalar's exp(s)/3, 1/(s*s + 0.5)**2, 1/sqrt(s*s + 1.5) and a relu of x*s1 - s1*s2, fused
    into pointwise kernels with full-size operands: hoisted and inline give the same bits."""
    import sympy as sp
    from codegen.cprinter import c_expression_hoisting
    from codegen.lowering import pointwise
    from codegen.runner import CompiledProgram
    for name, fn in (("third_exp", lambda v: sp.exp(v) / 3), ("inv_square", lambda v: 1 / (v * v + 0.5) ** 2),
                     ("rsqrt", lambda v: 1 / sp.sqrt(v * v + 1.5))):
        gc.define_activation(name, fn)
    g = gc.Graph("sc", dtype)
    x = g.input("x", ("N", 3, 5))
    s1, s2 = g.param("s1", (), ("uniform", 1.0)), g.param("s2", (), ("uniform", 1.0))
    outs = [g.mul(x, g.activation(s1, fn), name=f"y_{fn}") for fn in ("third_exp", "inv_square", "rsqrt")]
    outs.append(g.relu(g.sub(g.mul(x, s1), g.mul(s1, s2)), name="y_relu"))
    t = sp.Symbol("t", real=True)                  # a negative power standing alone (powf), a Piecewise of
    gc.define_activation("clip1", sp.Piecewise((-1, t <= -1), (1, t >= 1), (t, True)))    # scalars, and a
    gc.define_activation("neg_inv_square", lambda v: -v ** -2)      # condition pair of scalars alone
    outs.append(g.sub(x, g.activation(g.sub(g.activation(s1, "clip1"), s2), "neg_inv_square"), name="y_pow"))
    outs.append(g.apply("leaky_relu_grad", x, s1, name="y_pair"))
    g.output(*outs)
    fused = build(g, "fused")
    kernels = Program(fused).kernels
    sources = "".join(k.source for k in kernels)
    assert "_h" in sources                                          # something was hoisted
    if nvrtc.available():
        for k in kernels:                                           # warnings are errors: no unused name
            nvrtc.compile_kernel(k.source, k.name)
    inputs, params = random_inputs(fused, 4, 1), realistic_params(fused, seed=3)
    hoisted = CompiledProgram(fused, "host").run(inputs, params)
    monkeypatch.setattr(pointwise, "c_expression_hoisting",
                        lambda expr, dtype, names, invariant, prefix: c_expression_hoisting(expr, dtype, names, (), prefix))
    inline = CompiledProgram(fused, "host").run(inputs, params)
    for name in hoisted:
        assert hoisted[name].tobytes() == inline[name].tobytes(), name


def test_emit_into_an_earlier_emits_folder_removes_only_the_files_its_manifest_listed(capsys, tmp_path):
    """Emitting another model or stage into a folder removes the .cu files the folder's previous
    manifest listed and the new one does not; a .cu file no graphconv manifest there lists (a user's,
    or a kernel copied in by hand) is kept, and so is everything in a folder without a manifest."""
    folder = tmp_path / "k"
    assert cli(capsys, "emit", "lenet5", "--stage", "fused-train", "-o", str(folder), "--no-nvrtc")[0] == 0
    earlier = {p.name for p in folder.glob("*.cu")}
    copied = folder / "copied_kernel.cu"                    # graphconv's text, not listed by its manifest
    copied.write_text((folder / sorted(earlier)[0]).read_text())
    (folder / "mine.cu").write_text("// my kernel\n")
    assert cli(capsys, "emit", "seed_conv", "-o", str(folder), "--no-nvrtc")[0] == 0
    listed = {row["file"] for row in json.loads((folder / "manifest.json").read_text())["kernels"]}
    assert {p.name for p in folder.glob("*.cu")} == listed | {"copied_kernel.cu", "mine.cu"}
    assert not listed & earlier
    bare = tmp_path / "bare"                                # no manifest: nothing is removed
    bare.mkdir()
    (bare / "old.cu").write_text(copied.read_text())
    assert cli(capsys, "emit", "seed_conv", "-o", str(bare), "--no-nvrtc")[0] == 0 and (bare / "old.cu").exists()
    outside = tmp_path / "outside.cu"                       # a manifest naming a file outside its folder
    outside.write_text(copied.read_text())
    (bare / "manifest.json").write_text(json.dumps({"graph": "x", "kernels": [{"file": "../outside.cu",
                                                                               "sha256": "0"}]}))
    assert cli(capsys, "emit", "seed_conv", "-o", str(bare), "--no-nvrtc")[0] == 0 and outside.exists()
