"""The cuda backend's parts that need no GPU: its one-line refusals, the scalar typing of its
launches, and the bound step (static buffers, every argument fixed, launches captured once and
replayed: a CUDA graph on the GPU), exercised through the host runtime, which shares it."""
import functools
import sys
import types

import numpy as np
import pytest

import graphconv as gc
from codegen import cuda
from codegen.program import Program
from codegen.runner import CompiledProgram, HostRuntime
from graphconv.data import random_inputs
from graphconv.errors import BackendError, InputError
from graphconv.models import MODELS
from graphconv.pipeline import build


def test_without_cupy_the_cuda_backend_says_what_to_install_and_what_to_use(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)          # import cupy -> ImportError
    with pytest.raises(BackendError) as err:
        gc.compile(MODELS["lenet5"](), backend="cuda")
    text = str(err.value)
    assert "pip install '.[cuda]'" in text and "backend='host'" in text and "\n" not in text


def test_without_a_driver_the_cuda_backend_says_so_in_one_line(monkeypatch):
    class NoDriver(Exception):
        pass

    def count():
        raise NoDriver("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version")
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=count)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(BackendError) as err:
        CompiledProgram(MODELS["lenet5"](), "cuda")
    assert str(err.value) == ("backend 'cuda' found no usable NVIDIA GPU (cudaErrorInsufficientDriver); "
                              "use backend='host' (the same kernels on the CPU) or backend='numpy'")
    assert not cuda.available()


def test_scalar_arguments_go_to_the_device_as_their_declared_c_types():
    seen = []
    kernel = cuda.CudaKernel("k", None, lambda grid, block, args, stream=None: seen.append(args),
                             [None, np.int32, np.float32, np.int64])
    buffer = object()
    cuda.CudaRuntime.launch(kernel, (1, 1, 1), (32, 1, 1), [buffer, 7, 0.5, 2**40])
    args = seen[0]
    assert args[0] is buffer
    assert [type(a) for a in args[1:]] == [np.int32, np.float32, np.int64] and args[3] == 2**40


def test_the_device_finiteness_check_of_a_training_step_catches_nan_inf_and_only_them():
    """The cuda runtime's all_finite (one sync per step for all updates) run with NumPy standing in
    for CuPy: NaN and inf anywhere are caught, huge finite values (whose float32 sum overflows) and
    integer arrays are not, and the host runtime agrees on every case."""
    runtime = object.__new__(cuda.CudaRuntime)
    runtime.cp = np
    big = np.full(1000, 3e38, np.float32)                  # finite; float32 sum overflows to inf
    cases = [([np.ones(3, np.float32), np.zeros((2, 2))], True),
             ([np.ones(3, np.float32), np.array([1.0, np.nan])], False),
             ([np.array([np.inf], np.float32)], False),
             ([np.array(-np.inf)], False),
             ([big, np.arange(5)], True),
             ([np.full(10, 1e308), np.ones(1)], True),       # float64 sum overflows: the exact check decides
             ([np.arange(4, dtype=np.int64)], True), ([], True)]
    for arrays, finite in cases:
        with np.errstate(over="ignore"):                      # CuPy does not warn; NumPy would
            assert runtime.all_finite(arrays) is finite
        assert HostRuntime.all_finite(arrays) is finite
    # a step's updates: one concatenation a dtype and one sync, not a reduction an array
    calls = []
    counting = type("Counting", (), {"__getattr__": lambda self, name: getattr(np, name),
                                     "concatenate": staticmethod(lambda arrays: calls.append(len(arrays))
                                                                 or np.concatenate(arrays))})()
    runtime.cp = counting
    updates = [np.ones((20, 1, 5, 5), np.float32), np.ones(20, np.float32), np.array(3.0, np.float32),
               np.zeros(7)] * 6
    assert runtime.all_finite(updates) and sorted(calls) == [6, 18]
    updates[13] = np.array([1.0, np.nan], np.float32)
    assert not runtime.all_finite(updates)


def test_a_bound_step_replays_over_static_buffers_and_equals_a_plain_run():
    graph = build(MODELS["lenet5"](), "fused-train")
    program = CompiledProgram(graph, "host")
    step = program.bind(6)
    params = gc.init_params(graph, seed=0)
    addresses = None
    for seed in range(3):                                   # new data each call, the same buffers
        inputs = random_inputs(graph, 6, seed)
        views = step(inputs, params)
        now = {k: v.ctypes.data for k, v in views.items()}
        assert addresses is None or now == addresses
        addresses = now
        want = program.run(inputs, params)
        for key in want:
            assert np.array_equal(views[key], want[key]), key
    assert step.replay is not None and len(step.launches) == len(program.program.launches)
    with pytest.raises(InputError, match="bound to batch 6, got 5"):
        step(random_inputs(graph, 5, 0), params)


def test_outputs_come_back_as_the_kind_of_array_that_went_in():
    """NumPy in, NumPy out; a device array in (CuPy on cuda), device arrays out; to_numpy decides
    when given. The rule is the shared layer's, exercised with a stand-in device array type."""
    class DeviceArray(np.ndarray):
        pass
    graph = MODELS["lenet5"]()
    program = CompiledProgram(graph, "host")
    program.runtime.array_types = (np.ndarray, DeviceArray)
    x = random_inputs(graph, 2, 0)["x"]
    assert program.wants_numpy({"x": x}) is True
    assert program.wants_numpy({"x": x.view(DeviceArray)}) is False
    assert program.wants_numpy({"x": x.view(DeviceArray)}, to_numpy=True) is True
    assert program.wants_numpy({"x": x}, to_numpy=False) is False
    params = gc.init_params(graph, seed=0)
    plain = program.run({"x": x}, params)
    again = program.run({"x": x.view(DeviceArray)}, params, to_numpy=True)
    for name in plain:
        np.testing.assert_array_equal(plain[name], again[name])


def load_bench():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@functools.lru_cache(maxsize=None)
def bench_layers():
    """bench_gpu.py and the two layers its --variants rows rebuild (a worker builds them once)."""
    bench = load_bench()
    graphs = {layer: build(bench.layer_graph(c_in, c_out, size, k, pad, True), "fused-train")
              for _, layer, c_in, c_out, size, k, pad in (bench.LAYERS[1], bench.LAYERS[4])}
    return bench, graphs


@functools.lru_cache(maxsize=None)
def current_kernels(layer, tf32):
    return frozenset((s.name, s.source) for s in Program(bench_layers()[1][layer], tf32=tf32).kernels)


def check_bench_kernels(graph, kernels, tf32, races, only=None):
    from codegen import nvrtc
    from codegen.check import check_kernels, check_races
    nvrtc.compile_many([(s.source, s.name) for s in kernels if only is None or s.name in only])
    return [r for r in (check_races if races else check_kernels)(
        graph, random_inputs(graph, 2, 0), gc.init_params(graph, seed=0), tf32=tf32, only=only) if not r.ok]


def needs_nvrtc():
    from codegen import nvrtc
    if not nvrtc.available():
        pytest.skip("NVRTC not installed")


@pytest.mark.parametrize("tf32", [False, True])
def test_the_gpu_benchmarks_variant_layers_pass_under_the_current_rules(tf32):
    """The layers `bench_gpu.py --variants` rebuilds, under the current rules, per precision: compiled
    (NVRTC, sm_90, no warning or spill) and against NumPy under each of the host's schedules."""
    needs_nvrtc()
    _, graphs = bench_layers()
    for layer, graph in graphs.items():
        bad = check_bench_kernels(graph, Program(graph, tf32=tf32).kernels, tf32, True)
        assert not bad, ("current rules", layer, tf32, [(r.node, r.note) for r in bad])


@pytest.mark.parametrize("label", list(load_bench().VARIANTS))
def test_every_rule_the_gpu_benchmark_compares_compiles_for_sm90(label, monkeypatch):
    """`bench_gpu.py --variants` rebuilds a layer under each earlier rule on a scarce GPU lease: the
    kernels a rule changes must compile (NVRTC, sm_90, no warning or spill) and match NumPy here first;
    a rule that changes how stages are buffered or staged (and the TF32 and Winograd kernels) under
    each of the host's schedules too (no race between threads). A rule that changes neither layer's
    kernels is the step rules' business (test_the_step_variants_...)."""
    needs_nvrtc()
    bench, graphs = bench_layers()
    rule = bench.VARIANTS[label]
    tf32 = label.startswith("TF32")      # the TF32 rules change only --tf32's kernels
    for layer, graph in graphs.items():
        now = current_kernels(layer, tf32)
        with monkeypatch.context() as m:
            for name, value in rule.items():
                m.setattr(*bench.rule_place(name), value)
            kernels = Program(graph, tf32=tf32).kernels
            changed = {s.name for s in kernels if (s.name, s.source) not in now}
            if not changed:
                continue
            races = any(w in label for w in ("buffer", "staging", "TF32", "Winograd"))
            bad = check_bench_kernels(graph, kernels, tf32, races, only=changed)
            assert not bad, (label, layer, [(r.node, r.note) for r in bad])


def test_most_rules_the_gpu_benchmark_compares_reach_its_layers(monkeypatch):
    bench, graphs = bench_layers()
    changed_somewhere = 0
    for label, rule in bench.VARIANTS.items():
        tf32 = label.startswith("TF32")
        for layer, graph in graphs.items():
            with monkeypatch.context() as m:
                for name, value in rule.items():
                    m.setattr(*bench.rule_place(name), value)
                changed_somewhere += any((s.name, s.source) not in current_kernels(layer, tf32)
                                         for s in Program(graph, tf32=tf32).kernels)
    assert changed_somewhere >= len(bench.VARIANTS) // 2      # the rules reach these layers' kernels


def test_the_benchmark_times_a_kernel_alone_as_a_replayed_capture_of_many_launches(monkeypatch):
    """bench_gpu's kernel timing (bandwidth rows, profile): `calls` launches of the one kernel captured
    once (a CUDA graph on the GPU: no Python launch overhead between them) and each replay counted as
    `calls` launches; here through the host runtime, which shares the capture bookkeeping."""
    bench = load_bench()
    g = gc.Graph("one", "float32")
    g.output(g.relu(g.input("x", ("N", 4, 8, 8)), name="r"))
    program = gc.compile(g, backend="host")
    step = program.bind(3)
    step({"x": np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)}, {})
    bound = step.launches[0]
    launched = []
    real = type(program.runtime).launch
    monkeypatch.setattr(type(program.runtime), "launch", staticmethod(lambda *a: launched.append(a[0]) or real(*a)))
    timer = bench.Timer("host", repeats=3, warmup=1, inner=10)
    samples = []
    monkeypatch.setattr(bench.statistics, "median", lambda xs: samples.extend(xs) or 6.0)
    ms = bench.kernel_ms(program, bound, timer, calls=5)
    assert len(launched) == (1 + 3) * 5 and set(launched) == {bound[0]}     # warm-up and samples, 5 launches each
    assert len(samples) == 3 and ms == 6.0 / 5 and timer.inner == 10          # per launch; the timer as it was


def test_the_benchmark_reports_memory_bound_kernels_against_both_copies():
    bench = load_bench()
    rows = [{"model": "vgg_small", "kernel": "relu_grad_f32_32x32x32", "MB": 67.1, "GB_s": 3900.0, "of_copy": 0.94,
             "copy_same_GB_s": 4000.0, "of_same_copy": 0.975},
            {"model": "lenet5", "kernel": "relu_grad_f32_500", "MB": 1.5, "GB_s": 700.0, "of_copy": 0.17,
             "copy_same_GB_s": 1000.0, "of_same_copy": 0.7}]
    result = {"bandwidth": {"copy_GB_s": 4150.0, "kernels": rows}, "layers": [], "steps": [], "errors": [],
              "device": {}}
    lines = []
    bench.report(types.SimpleNamespace(tf32=False), result, lines.append)
    text = "\n".join(lines)
    assert "relu_grad_f32_32x32x32: 67.1 MB, 3900 GB/s = 94% of the copy, 98% of a copy of 67.1 MB (4000 GB/s)" in text
    assert "1 of 2 at >= 80% of a copy of their bytes (median 84%)" in text
    assert "those of >= 16 MB: 1 of 1 at >= 80% of the 256 MiB copy" in text


def test_the_variants_run_times_only_the_rules_that_change_a_layers_kernels():
    """`--variants` on a lease: a rule that leaves a layer's kernel sources as they are (the 8 x 8 rule on
    LeNet's 14 x 14 layer) repeats now's row instead of timing it again; one that changes them (the same
    rule on vgg's 8 x 8 layer, one buffer on LeNet's) is timed. `under` puts every setting back."""
    import types as _types
    from codegen.lowering import direct, direct_wgrad, gemm
    bench = load_bench()
    args = _types.SimpleNamespace(tf32=False)
    shapes = {layer: (c_in, c_out, size, k, pad, layer != "conv1") for _, layer, c_in, c_out, size, k, pad in bench.LAYERS}
    before = (gemm.GEMM_PLANE_MOST, direct.PIPELINE, direct.SPLIT_SMALL_PLANES, direct.STAGE_LOADS, direct.WINOGRAD)

    def changes(label, layer):
        now = bench.layer_sources(args, *shapes[layer])
        return bench.under(bench.VARIANTS[label], lambda: bench.layer_sources(args, *shapes[layer])) != now
    assert not changes("8 x 8 planes as the GEMM", "conv2")
    assert changes("8 x 8 planes as the GEMM", "conv3_2")
    assert changes("direct: one buffer, staged through registers", "conv2")
    assert changes("weight gradients as the im2col GEMM", "conv1")
    assert changes("Winograd F(2x2, 3x3) for 3 x 3 convolutions", "conv3_2")           # opt-in: a 3 x 3 layer
    assert not changes("Winograd F(2x2, 3x3) for 3 x 3 convolutions", "conv2")          # LeNet's 5 x 5: direct
    assert not changes("TF32: direct convolutions on the FP32 cores", "conv3_2")     # FP32 rows: same kernels
    args.tf32 = True
    assert changes("TF32: direct convolutions on the FP32 cores", "conv3_2")
    assert changes("TF32 direct: one buffer", "conv3_2") and not changes("TF32 direct: one buffer", "conv2")
    assert not changes("TF32: weight gradients on the FP32 cores", "conv3_2")      # gathered dy: FP32 anyway
    args.tf32 = False
    for name in ("vgg_small", "lenet5"):      # the TF32 weight gradients: vgg_small's plain dy only
        now = bench.step_sources(_types.SimpleNamespace(tf32=True), name)
        fp32 = bench.under(bench.VARIANTS["TF32: weight gradients on the FP32 cores"],
                           lambda: bench.step_sources(_types.SimpleNamespace(tf32=True), name))
        assert (now != fp32) == (name == "vgg_small")
    assert (gemm.GEMM_PLANE_MOST, direct.PIPELINE, direct.SPLIT_SMALL_PLANES, direct.STAGE_LOADS, direct.WINOGRAD) == before
    assert direct_wgrad.ENABLED and direct_wgrad.THREADS_PER_SM == 512


def test_the_variants_run_reports_every_rule_and_times_each_changed_one_once_per_batch(monkeypatch):
    import types as _types
    bench = load_bench()
    monkeypatch.setattr(bench, "LAYERS", [("lenet5", "conv2", 20, 50, 14, 5, 2)])
    timed = []
    monkeypatch.setattr(bench, "graphconv_layer", lambda args, *a: timed.append(a) or
                        {"forward": {"ms": 1.0}, "backward": {"ms": 2.0}})
    lines = []
    rows = bench.variants(_types.SimpleNamespace(tf32=False, backend="host"), bench.Timer("host", 3), lines.append)
    same = rows[0]["same_as_now"]
    assert "8 x 8 planes as the GEMM" in same and "direct: one buffer, staged through registers" not in same
    assert len(timed) == 2 * (1 + len(bench.VARIANTS) - len(same)) and [r["batch"] for r in rows] == [64, 256]
    assert all(set(bench.VARIANTS) <= set(r) for r in rows) and "8 x 8 planes as the GEMM: same kernels" in lines[0]


def test_the_step_variants_time_each_weight_gradient_rule_where_it_changes_a_step(monkeypatch):
    """`--variants` also times vgg_small's and LeNet-5's steps under the weight-gradient rules: vgg's
    plain-dy weight gradients change under all three (the double buffer among them), LeNet's gathered
    ones not under the double buffer (a gathered g keeps one buffer), which is reported, not timed."""
    import types as _types
    bench = load_bench()
    timed = []
    monkeypatch.setattr(bench, "bound_step", lambda graph, *a: (None, _types.SimpleNamespace(replay=lambda: None)))
    monkeypatch.setattr(bench, "Timer", lambda *a: (lambda fn: timed.append(fn) or 1.5))
    lines = []
    rows = bench.step_variants(_types.SimpleNamespace(tf32=False, backend="host"),
                               _types.SimpleNamespace(repeats=3, warmup=1, inner=1), lines.append)
    vgg, lenet = rows
    assert all(isinstance(vgg[label], float) for label in bench.STEP_RULES)
    assert lenet["direct weight gradients: double-buffered tiles"] == "same kernels"
    assert lenet["Winograd F(2x2, 3x3) for 3 x 3 convolutions"] == "same kernels"     # no 3 x 3 convolution
    assert isinstance(lenet["weight gradients as the im2col GEMM"], float)
    assert isinstance(lenet["GEMM: one shared buffer per operand"], float)        # fc1's GEMMs
    assert isinstance(lenet["reductions: a finish kernel of their own"], float)      # its bias gradients
    assert len(timed) == 2 + 6 + 4 and "step variants vgg_small batch 256: now 1.500 ms" in lines[0]
    # each build its own attempt: a rule that fails (the double buffer faulting on a device) loses only its cell
    def attempt(what, fn, default=None):
        if "double-buffered" in what:
            return default
        return fn()
    rows = bench.step_variants(_types.SimpleNamespace(tf32=False, backend="host"),
                               _types.SimpleNamespace(repeats=3, warmup=1, inner=1), lines.append, attempt=attempt,
                               in_budget=lambda what: "lenet5" not in what)
    assert [r["model"] for r in rows] == ["vgg_small"]
    assert rows[0]["direct weight gradients: double-buffered tiles"] == "failed"
    assert rows[0]["weight gradients as the im2col GEMM"] == 1.5 and "double-buffered tiles: failed" in lines[-1]


def test_the_bandwidth_rows_count_the_bytes_a_kernel_moves():
    """A pointwise kernel whose expression ignores an operand (mul's gradient with respect to a: dy * b)
    does not read it, so its bytes are not counted; the others' every array argument is."""
    bench = load_bench()
    g = gc.Graph("gate", "float32")
    x = g.input("x", ("N", 3, 4, 4))
    h = g.conv2d(x, 4, 3, padding=1, name="c")
    g.output(g.linear(g.flatten(g.mul(h, g.sigmoid(h, name="s"), name="m")), 2, name="fc"))
    program = gc.compile(build(g, "train"), backend="host")
    step = program.bind(2)
    sizes = {}
    for launch, bound in zip(program.program.launches, step.launches):
        sizes[launch.spec.name] = (bench.moved_bytes(launch.spec, bound[3]),
                                   sum(int(a.nbytes) for a in bound[3] if hasattr(a, "nbytes") and a.size > 1))
    grad_a = next(k for k in sizes if k.startswith("mul_grad_a"))
    assert sizes[grad_a][1] - sizes[grad_a][0] == 2 * 4 * 4 * 4 * 4     # a (2 x 4 x 4 x 4 floats) is not read
    assert all(moved == every for name, (moved, every) in sizes.items() if not name.startswith("mul_grad"))


def test_the_step_variants_time_the_tf32_rules_under_tf32_only(monkeypatch):
    """With --tf32 the steps are also timed with the FP32 direct convolutions and weight gradients the
    session-6 tensor-core kernels replace; LeNet-5's gathered weight gradients are FP32 either way."""
    import types as _types
    bench = load_bench()
    monkeypatch.setattr(bench, "bound_step", lambda graph, *a: (None, _types.SimpleNamespace(replay=lambda: None)))
    monkeypatch.setattr(bench, "Timer", lambda *a: (lambda fn: 1.5))
    timer = _types.SimpleNamespace(repeats=3, warmup=1, inner=1)
    fp32 = bench.step_variants(_types.SimpleNamespace(tf32=False, backend="host"), timer, [].append)
    assert not any(label in row for row in fp32 for label in bench.TF32_STEP_RULES)
    vgg, lenet = bench.step_variants(_types.SimpleNamespace(tf32=True, backend="host"), timer, [].append)
    assert all(vgg[label] == 1.5 for label in bench.TF32_STEP_RULES)
    assert lenet["TF32: weight gradients on the FP32 cores"] == "same kernels"
    assert lenet["TF32: direct convolutions on the FP32 cores"] == 1.5


def test_the_depthwise_benchmark_times_the_depthwise_kernels_and_the_gemm_they_replaced():
    """`--depthwise` on a lease: each layer's forward and backward launches are the depthwise kernels
    (the strided layer's input gradient too: the gathering kernel), and under depthwise.ENABLED =
    False the GEMM's; `under` puts the setting back."""
    from codegen.lowering import depthwise
    from codegen.program import Program
    bench = load_bench()

    def picked(graph):
        out = {"forward": [], "backward": []}
        for launch in Program(graph).launches:
            phase = bench.layer_phase(graph, launch)
            if phase:
                out[phase].append(launch.spec.template)
        return out
    for layer, c, size, stride in bench.DEPTHWISE:
        graph = build(bench.depthwise_graph(c, size, stride), "fused-train")
        now = picked(graph)
        assert now["forward"] == ["depthwise_conv.cu.j2"], (layer, now)
        assert "depthwise_wgrad.cu.j2" in now["backward"] and "depthwise_conv.cu.j2" in now["backward"], (layer, now)
        before = bench.under({"depthwise.ENABLED": False}, lambda: picked(graph))
        assert not any("depthwise" in t for phase in before.values() for t in phase), (layer, before)
    assert depthwise.ENABLED
