"""The GEMM family (convolutions forward, fused, backward-data, backward-weight; linear; matmul):
every kernel compiled by NVRTC for sm_90 and run on the host backend against the NumPy reference of
its node, outputs poisoned first."""
import re

import numpy as np
import pytest

import graphconv as gc
import graphconv.models
from codegen import nvrtc, sass
from codegen.check import check_kernels
from codegen.program import Program
from codegen.runner import CompiledProgram
from graphconv.data import random_inputs
from graphconv.pipeline import build


def assert_kernels_match(graph, batch=3, seed=0, compile_nvrtc=True):
    params = gc.init_params(graph, seed=seed)
    results = check_kernels(graph, random_inputs(graph, batch, seed), params)
    bad = [r for r in results if not r.ok]
    assert not bad, "\n".join(f"{r.node} [{r.op}] {r.kernels}: abs {r.max_abs:.3g} rel {r.max_rel:.3g} {r.note}"
                              for r in bad)
    if compile_nvrtc and nvrtc.available():
        for spec in Program(graph).kernels:
            nvrtc.compile_kernel(spec.source, spec.name)      # raises on an error, a warning or a spill
    return results


def conv_net(nd, spatial, channels=3, out=4, pool=None, dtype="float32", **conv):
    g = gc.Graph(f"conv{nd}", dtype)
    x = g.input("x", ("N", channels, *spatial))
    h = getattr(g, f"conv{nd}d")(x, out, conv.pop("kernel", 3), name="conv", **conv)
    h = g.relu(h)
    if pool:
        kind, kw = pool
        h = getattr(g, f"{kind}_pool{nd}d")(h, **kw)
    g.output(h)
    return g


CASES = [
    (2, (9, 9), {}, None),
    (2, (11, 10), {"stride": 2, "padding": 1}, ("max", {"kernel_size": 2, "stride": 2})),
    (2, (12, 12), {"dilation": 2, "padding": 2, "groups": 1}, ("max", {"kernel_size": 3, "stride": 2, "padding": 1})),
    (2, (10, 10), {"padding": 1, "bias": False}, ("avg", {"kernel_size": 2})),
    (2, (9, 9), {"padding": 1}, ("avg", {"kernel_size": 3, "stride": 2, "padding": 1, "count_include_pad": False})),
    (1, (17,), {"padding": 2, "kernel": 5}, ("max", {"kernel_size": 2})),
    (3, (6, 7, 6), {"padding": 1}, ("max", {"kernel_size": 2})),
    (2, (5, 5), {"padding": 1}, ("max", {"kernel_size": 2, "ceil_mode": True})),    # overhang: not direct
    (1, (60,), {"padding": 1}, ("max", {"kernel_size": 3})),                         # window of 3 columns
    (2, (9, 9), {"padding": 1}, ("max", {"kernel_size": (1, 3)})),
]


@pytest.mark.parametrize("nd,spatial,conv,pool", CASES)
@pytest.mark.parametrize("stage", ["fused", "fused-train"])
def test_conv_kernels_match_numpy(nd, spatial, conv, pool, stage):
    g = conv_net(nd, spatial, pool=pool, **conv)
    if stage == "fused-train":
        g = conv_classifier(g)
    built = build(g, stage)
    results = assert_kernels_match(built)
    ops = {r.op for r in results}
    assert "fused_conv" in ops or "conv%dd" % nd in ops


def conv_classifier(g):
    """The graph with flatten + linear to 5 classes, so it can be trained."""
    out = g.node(g.outputs[0])
    g.outputs.clear()
    from graphconv.ir import Tensor
    h = g.flatten(Tensor(g, out.name))
    g.output(g.linear(h, 5, name="fc"))
    return g


PADDING_MODE_CASES = [   # nd, spatial, the padded conv's kernel and attributes, pooled after it
    (2, (8, 8), 3, {"padding": 2, "padding_mode": "reflect", "groups": 2}, True),
    (2, (8, 7), 3, {"padding": 2, "stride": 2, "padding_mode": "replicate"}, False),
    (2, (2, 6), (1, 3), {"padding": (1, 2), "padding_mode": "replicate"}, True),
    (2, (6, 8), 3, {"padding": (1, 3), "dilation": 2, "padding_mode": "circular"}, True),
    (1, (10,), 4, {"padding": "same", "padding_mode": "reflect"}, False),
    (3, (4, 4, 4), 3, {"padding": 2, "padding_mode": "replicate"}, False),    # 5 copies an axis at an edge: loops
]


@pytest.mark.parametrize("nd,spatial,kernel,conv,pool", PADDING_MODE_CASES)
def test_reflect_replicate_and_circular_padding_train_on_the_host(nd, spatial, kernel, conv, pool):
    """A padding mode other than zeros: the forward and weight-gradient GEMMs read the input through
    the mode's index map, the data gradient adds at each input position what every padded copy of it
    received (up to 1 + pad copies an axis under replicate); a fused pool/activation gradient is
    stored, not gathered, by such a data gradient."""
    g = gc.Graph("padded")
    h = getattr(g, f"conv{nd}d")(g.input("x", ("N", 2, *spatial)), 4, 1, name="conv0")
    h = g.relu(getattr(g, f"conv{nd}d")(h, 4, kernel, name="conv", **conv))
    if pool:
        h = getattr(g, f"max_pool{nd}d")(h, 2)
    g.output(h)
    built = build(conv_classifier(g), "fused-train")
    results = assert_kernels_match(built)
    mode = conv["padding_mode"]
    padded = {r.op for r in results if any(k.endswith(mode) or f"_{mode}_" in k for k in r.kernels)}
    assert padded == {"fused_conv", f"conv{nd}d_backward_data", f"conv{nd}d_backward_weight"}   # conv + relu fused


def test_grouped_strided_convolution_and_its_gradients():
    g = gc.Graph("grouped")
    x = g.input("x", ("N", 4, 9, 8))
    h = g.relu(g.conv2d(x, 6, 3, stride=2, padding=1, groups=2, name="conv"))
    g.output(g.linear(g.flatten(h), 3, name="fc"))
    assert_kernels_match(build(g, "train"))


def test_float64_kernels():
    g = conv_net(2, (8, 8), pool=("max", {"kernel_size": 2}), dtype="float64")
    assert_kernels_match(build(conv_classifier(g), "fused-train"))


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_transposes_and_a_batch_sized_depth(ta, tb):
    g = gc.Graph("mm")
    a = g.input("a", ("N", 7) if not ta else ("N", 7))
    b = g.param("b", (7, 5) if not tb else (5, 7), init=("uniform", 1.0))
    if ta:    # depth = the batch: a^T [7, N] @ c [N, 5] (split over blocks, then reduced)
        c = g.input("c", ("N", 5))
        g.output(g.apply("matmul", a, c, transpose_a=True))
    else:
        g.output(g.apply("matmul", a, b, transpose_b=tb))
    for batch in (1, 5, 300):
        assert_kernels_match(g, batch=batch, compile_nvrtc=batch == 1)


def test_a_split_reduction_with_outputs_enough_to_fill_the_gpu_takes_one_thread_per_output():
    """a^T @ c with 1024 x 300 outputs (more than an H100/H200 holds threads): the reduce pass is one
    thread per output without a barrier; 7 x 5 outputs keep 8 threads per output. Both against NumPy
    at a batch whose depth is split (1100: 3 partials) and one that is not (5)."""
    from codegen.lowering.gemm import RESIDENT_THREADS
    for m, n, parts in ((1024, 300, 1), (7, 5, 8)):
        assert (m * n >= RESIDENT_THREADS) == (parts == 1)
        g = gc.Graph("mm")
        a, c = g.input("a", ("N", m)), g.input("c", ("N", n))
        g.output(g.apply("matmul", a, c, transpose_a=True))
        reduce = next(s for s in Program(g).kernels if s.name.endswith("_reduce"))
        assert (reduce.params["PARTS"], reduce.barrier, reduce.block) == (parts, parts > 1, (256, 1, 1))
        assert reduce.launch_shape(1100)[0][0] == -(-m * n // (256 // parts))
        assert "__syncthreads" in reduce.source.split("{", 1)[1] if parts > 1 else "__syncthreads" not in reduce.source
        for batch in (1100, 5):
            assert_kernels_match(g, batch=batch, compile_nvrtc=batch == 5)


def test_one_program_serves_any_batch():
    g = build(conv_net(2, (8, 8), pool=("max", {"kernel_size": 2})), "fused")
    compiled = __import__("codegen.runner", fromlist=["x"]).CompiledProgram(g, "host", poison=True)
    params = gc.init_params(g, seed=1)
    for batch in (1, 2, 7):
        inputs = random_inputs(g, batch, batch)
        want = gc.compile(g).run(inputs, params)
        got = compiled.run(inputs, params)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)


def test_launch_shapes_stay_within_cuda_grid_limits_and_refuse_beyond():
    from graphconv.errors import InputError
    g = gc.Graph("dw")
    x = g.input("x", ("N", 64, 56, 56))
    h = g.relu(g.conv2d(x, 64, 3, padding=1, groups=64, name="dw"))
    g.output(g.linear(g.flatten(g.avg_pool2d(h, 56)), 3, name="fc"))
    program = Program(build(g, "train"))
    for spec in program.kernels:                 # depthwise weight gradients split over many chunks
        grid, _ = spec.launch_shape(1000)
        assert grid[1] <= 65535 and grid[2] <= 65535, (spec.name, grid)
    r = gc.Graph("r")
    x = r.input("x", ("N", 64, 8, 8))
    r.output(r.apply("reduce_sum", x, axes=(2, 3)))
    assert all(s.launch_shape(1100)[0][1] <= 65535 for s in Program(r).kernels)
    linear = next(s for s in program.kernels if s.name.startswith("linear"))
    with pytest.raises(InputError, match="past CUDA's limits"):
        linear.launch_shape(5_000_000)           # rows on grid y: ceil(N / 64) > 65535


def test_a_derivative_that_does_not_read_its_input_gathers_only_dy():
    from graphconv.ops.pointwise import X, define_activation
    define_activation("twice", 2 * X)
    g = gc.Graph("lin")
    x = g.input("x", ("N", 3, 8, 8))
    h = g.max_pool2d(g.activation(g.conv2d(x, 4, 3, padding=1, name="conv"), "twice"), 2)
    h = g.max_pool2d(g.activation(g.conv2d(h, 4, 3, padding=1, name="conv2"), "twice"), 2)
    g.output(g.linear(g.flatten(h), 3, name="fc"))
    assert_kernels_match(build(g, "fused-train"))


def test_float64_training_and_inference_kernels_compile_without_spills():
    from graphconv.models import MODELS
    if not nvrtc.available():
        pytest.skip("NVRTC not installed")
    for model, stage in (("lenet5", "fused-train"), ("resnet8", "fused")):
        for spec in Program(build(MODELS[model]("float64"), stage)).kernels:
            nvrtc.compile_kernel(spec.source, spec.name)


def test_a_kernel_too_large_for_shared_memory_goes_through_the_gemm():
    g = gc.Graph("big")
    x = g.input("x", ("N", 3, 24, 24))
    g.output(g.relu(g.conv2d(x, 64, 19, padding=9, name="conv")))
    kernels = Program(build(g, "fused")).kernels
    assert kernels[0].template == "gemm.cu.j2"
    assert_kernels_match(build(g, "fused"), batch=2)


def test_a_pool_window_too_large_for_registers_is_left_unfused():
    from graphconv.fusion import report
    g = gc.Graph("gap")
    x = g.input("x", ("N", 3, 16, 16))
    # 8 x 8 windows: 64 registers of results took all 255 registers and NVRTC 13.0 spilled (H200)
    g.output(g.avg_pool2d(g.relu(g.conv2d(x, 8, 3, padding=1, name="c")), 8))
    fused = build(g, "fused")
    assert [n.op for n in fused.topo() if n.role == "op"] == ["fused_conv", "avg_pool2d"]
    assert "64 elements, more than the 32" in str(report(g.verify(), fused))
    assert_kernels_match(fused)


def test_batch_statistics_over_one_value_are_refused_as_on_numpy():
    from graphconv.errors import InputError
    g = gc.Graph("bn1")
    x = g.input("x", ("N", 4))
    g.output(g.batch_norm1d(x, name="bn"))
    run = gc.compile(g, backend="host")
    with pytest.raises(InputError, match="more than one value per channel"):
        run.run({"x": np.ones((1, 4), np.float32)}, gc.init_params(g, seed=0))


def run_c_lines(lines, env):
    """Execute the integer statements the digit helpers write (declarations, +=, -=, ?:) in Python."""
    for line in lines:
        text = line.rstrip(";").replace("const int ", "").replace("int ", "")
        text = re.sub(r"(\w+) >= (\w+)$", r"int(\1 >= \2)", text)
        text = re.sub(r"(\w+) \? (\w+) : 0", r"(\2 if \1 else 0)", text)
        text = text.replace("(int)", "int").replace("/", "//")
        exec(text, {}, env)


@pytest.mark.parametrize("radices,step", [((None, 14, 14), 16), ((None, 5, 5), 16), ((None, 25), 8),
                                          ((None, 3, 1, 7), 16), ((None, 2), 16), ((None,), 4), ((None, 64), 16)])
def test_k_digits_advanced_with_carries_equal_the_digits_divided_out(radices, step):
    """The GEMM keeps each k index as mixed-radix digits (image, position, ...) advanced by the k-step
    with carries: from any start, every step gives the digits of k + step exactly."""
    from codegen.lowering.gemm import advance_lines, digit_lines
    rng = np.random.default_rng(len(radices) * step)
    inner = [int(np.prod([r for r in radices[j + 1:]], dtype=np.int64)) for j in range(len(radices))]
    for start in [0, 1, step - 1, *rng.integers(0, 10_000, 6)]:
        env = {"k": int(start)}
        run_c_lines(digit_lines("k", radices, lambda j: f"int d{j}"), env)
        for k in range(int(start), int(start) + 60 * step, step):
            want = [k // inner[0]] + [(k // inner[j]) % radices[j] for j in range(1, len(radices))]
            assert [env[f"d{j}"] for j in range(len(radices))] == want, (start, k)
            run_c_lines(advance_lines("d", radices, step), env)


@pytest.mark.skipif(sass.tool("nvdisasm") is None, reason="nvdisasm not installed (the test extra has it)")
def test_the_gemm_main_loop_reads_shared_memory_in_vectors_and_divides_nothing():
    """In the machine code of a backward-weight GEMM (vgg conv2_2, the biggest kernel family of the
    training step), the main loop reads its operand values as 16-byte shared loads: a k-step of the 4 x 8
    per-thread tile is 32 multiply-adds per 3 loads (scalar loads gave 16 per 8), and index arithmetic
    is a third of the loop at most. The rules of the earlier kernels fail both."""
    from codegen.lowering import direct_wgrad, gemm

    def loop_of():
        saved = direct_wgrad.ENABLED
        direct_wgrad.ENABLED = False       # the GEMM (stride-1 3 x 3 weight gradients are direct since session 5)
        try:
            kernels = Program(build(gc.models.MODELS["vgg_small"](), "fused-train")).kernels
        finally:
            direct_wgrad.ENABLED = saved
        spec = next(s for s in kernels
                    if s.name.startswith("conv2d_backward_weight_f32_c64_k64") and s.name.endswith("_partial"))
        return sass.mix(nvrtc.compile_kernel(spec.source, spec.name).cubin)
    now = loop_of()
    assert now["fma"] >= 10 * now["shared_loads"] and now["fma_share"] >= 0.6, now
    assert now["integer/other"] <= now["instructions"] / 3, now
    for flag in ("VECTOR", "WIDE"):
        saved = getattr(gemm, flag)
        setattr(gemm, flag, False)
        try:
            before = loop_of()
        finally:
            setattr(gemm, flag, saved)
        assert before["fma"] < 10 * before["shared_loads"] or before["fma_share"] < 0.6, (flag, before)


@pytest.mark.parametrize("loads", [0, 3, 16])
def test_direct_staging_in_batches_fills_shared_memory_exactly_as_one_loop(monkeypatch, loads):
    """The direct kernels stage their tiles STAGE_LOADS elements per thread at a time (loads in flight
    together, coordinates as digits); any batch size, the rolled loop (0) included, gives the same
    bits, forward (fused with a pool) and backward-data with its gathered gradient, on odd shapes."""
    from codegen.lowering import direct
    g = gc.Graph("stage", "float32")
    x = g.input("x", ("N", 5, 21, 19))
    h = g.max_pool2d(g.relu(g.conv2d(x, 24, 3, padding=1, name="conv1")), 2)
    h = g.relu(g.conv2d(h, 7, 5, padding=2, name="conv2"))
    g.output(g.linear(g.flatten(h), 3, name="fc"))
    graph = build(g, "fused-train")
    params = gc.init_params(graph, seed=1)
    inputs = random_inputs(graph, 3, 1)
    want = CompiledProgram(graph, "host").run(inputs, params, keep=True)
    monkeypatch.setattr(direct, "STAGE_LOADS", loads)
    program = CompiledProgram(graph, "host")
    assert sum(s.template == "direct_conv.cu.j2" for s in program.program.kernels) >= 3
    got = program.run(inputs, params, keep=True)
    for name, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(value), err_msg=name)
    assert_kernels_match(graph, batch=3, seed=1, compile_nvrtc=False)


@pytest.mark.parametrize("budget", [None, 6 * 1024])
def test_direct_double_buffered_stages_give_the_bits_of_one_buffer(monkeypatch, budget):
    """PIPELINE: the direct kernels fill two shared buffers, the filter slice (and the input tile where
    it is a plain copy; a gathered one goes through registers) by cp.async (on the host: copies at
    once), and compute from one while the other fills; forward and backward-data, channels that do not divide into stages (a partial last stage), zero-filled padding,
    give the bits of the single-buffer kernels and match NumPy with poisoned outputs. A smaller shared
    budget forces more, smaller stages."""
    from codegen.lowering import direct
    if budget:
        monkeypatch.setattr(direct, "SHARED_BUDGET", budget)
        monkeypatch.setattr(direct, "DOUBLE_BUDGET", budget)
    g = gc.Graph("pipe", "float32")
    x = g.conv2d(g.input("x", ("N", 5, 21, 19)), 5, 1, name="pre")     # conv1's backward-data: gathered
    h = g.max_pool2d(g.relu(g.conv2d(x, 24, 3, padding=1, name="conv1")), 2)
    h = g.conv2d(h, 7, 5, padding=2, name="conv2")
    h = g.relu(g.conv2d(h, 9, 3, padding=1, name="conv3"))
    g.output(g.linear(g.flatten(h), 3, name="fc"))
    graph = build(g, "fused-train")
    params, inputs = gc.init_params(graph, seed=2), random_inputs(graph, 3, 2)
    monkeypatch.setattr(direct, "PIPELINE", False)
    want = CompiledProgram(graph, "host").run(inputs, params, keep=True)
    monkeypatch.setattr(direct, "PIPELINE", True)
    program = CompiledProgram(graph, "host")
    piped = [s for s in program.program.kernels if s.template == "direct_conv.cu.j2" and s.params["buffers"] == 2]
    assert {"conv2d_direct", "conv2d_backward_data_direct"} <= {s.name.split("_f32")[0] for s in piped}
    assert any(s.params["sources"]["in"] is None for s in piped)              # a gathered input tile
    assert any(s.params["C"] % s.params["CC"] for s in piped)                 # a partial last stage,
    assert all(f"min({s.params['CC']}, {s.params['C']} - c0)" in s.source       # computed over its channels only
               for s in piped if s.params["C"] % s.params["CC"])
    assert all("cp.async.wait_group 1" in s.source and "__syncthreads" in s.source for s in piped)
    if nvrtc.available():      # below sm_80 (no cp.async) the same source compiles to plain copies
        for s in piped:
            nvrtc.compile_kernel(s.source, s.name, arch="sm_75")
    got = program.run(inputs, params, keep=True)
    for name, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(value), err_msg=name)
    assert_kernels_match(graph, batch=3, seed=2, compile_nvrtc=True)


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_a_training_step_fuses_linear_relu_and_its_gradient_into_the_gemms(act):
    """fused-train: fc1 -> act is a fused_linear (split K), fc2's input gradient -> act's gradient a
    fused_matmul whose epilogue reads the activation's output; every kernel against NumPy."""
    g = gc.Graph("mlp")
    h = getattr(g, act)(g.linear(g.flatten(g.input("x", ("N", 4, 16, 16))), 24, name="fc1"), name="a1")
    g.output(g.linear(h, 5, name="fc2"))
    built = build(g, "fused-train")
    results = assert_kernels_match(built, batch=5)
    ops = {r.node: r.op for r in results}
    assert ops["a1"] == "fused_linear" and ops["dfc1"] == "fused_matmul"
    assert built.operands("dfc1")[2] == "a1"


@pytest.mark.parametrize("features", [40, 1100])        # one GEMM; split K (>= 1024 deep), its reduce applies the chain
def test_a_fused_linear_applies_its_chain_where_the_sum_is_stored(features):
    """A fused_linear's epilogue (a residual add, a per-feature scale, a sigmoid: a device function
    the split reduce must carry too) on the host backend against NumPy, outputs poisoned."""
    g = gc.Graph("mlp")
    x = g.input("x", ("N", features))
    h = g.add(g.linear(x, 24, name="fc1"), g.input("skip", ("N", 24)), name="res")
    h = g.sigmoid(g.mul(h, g.input("scale", (24,)), name="scaled"), name="sig")
    g.output(g.leaky_relu(g.linear(h, 7, bias=False, name="fc2"), 0.1, name="out"))
    built = build(g, "fused")
    results = assert_kernels_match(built, batch=5)
    assert {r.op for r in results} == {"fused_linear"}
    names = [k.name for k in Program(built).kernels]
    assert names[-1].startswith("linear_leaky_relu_f32_in24_out7_nobias")
    assert any(n.startswith("linear_add_mul_sigmoid_f32") and n.endswith("_reduce" if features > 1000 else "")
               for n in names), names
