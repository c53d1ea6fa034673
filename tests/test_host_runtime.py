"""The host runtime: hand-written CUDA kernels compiled by g++ with gc_host.h, checked against NumPy."""
import os
import pathlib
import shutil

import numpy as np
import pytest

from graphconv.errors import BackendError, CompileError

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the host backend needs g++")

AXPB = r'''
extern "C" __global__ void __launch_bounds__(128) axpb(const float* __restrict__ x, float* __restrict__ y,
                                                        float a, float b, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = fmaxf(a * x[i] + b, 0.0f) + __expf(-fabsf(x[i]));
}'''

REDUCE = r'''
extern "C" __global__ void block_sum(const float* __restrict__ x, float* __restrict__ partial, int n) {
    __shared__ float s[256];
    const int t = threadIdx.x;
    const int i = blockIdx.x * 256 + t;
    s[t] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (int k = 128; k > 0; k >>= 1) {  // tree reduction: a barrier per level
        if (t < k) s[t] += s[t + k];
        __syncthreads();
    }
    if (t == 0) partial[blockIdx.x] = s[0];
}'''

EARLY_RETURN = r'''
extern "C" __global__ void early_return(const float* x, float* out) {
    __shared__ float s[64];
    __shared__ float total;
    const int t = threadIdx.x;
    if (t >= 64) return;               // half the block leaves before any barrier
    s[t] = x[blockIdx.x * 64 + t];
    if (t == 0) total = 0.0f;
    __syncthreads();
    out[blockIdx.x * 128 + t] = s[63 - t];  // another thread's value: needs the barrier
    if (t >= 32) return;               // a quarter more leaves between barriers
    __syncthreads();
    for (int r = 0; r < 3; ++r) {      // barriers in a loop with finished fibres around
        if (t == r) total += s[t] + s[t + 32];
        __syncthreads();
    }
    out[blockIdx.x * 128 + 64 + t] = total;
}'''

INDICES = r'''
extern "C" __global__ void indices(int* out) {
    const int bx = blockDim.x, by = blockDim.y, bz = blockDim.z;
    const int block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const int thread = (threadIdx.z * by + threadIdx.y) * bx + threadIdx.x;
    int* o = out + (block * bx * by * bz + thread) * 6;
    o[0] = threadIdx.x; o[1] = threadIdx.y; o[2] = threadIdx.z;
    o[3] = blockIdx.x; o[4] = blockIdx.y; o[5] = blockIdx.z;
}'''

TILE_2D = r'''
extern "C" __global__ void transpose_tile(const float* __restrict__ x, float* __restrict__ y, int n) {
    __shared__ float tile[16][17];  // 2-D block with a barrier: fibres indexed in x, y
    const int r = blockIdx.y * 16 + threadIdx.y, c = blockIdx.x * 16 + threadIdx.x;
    tile[threadIdx.y][threadIdx.x] = x[r * n + c];
    __syncthreads();
    y[(blockIdx.x * 16 + threadIdx.y) * n + blockIdx.y * 16 + threadIdx.x] = tile[threadIdx.x][threadIdx.y];
}'''

ATOMICS = r'''
extern "C" __global__ void count(int* counter, float* fsum, int* biggest, unsigned* u) {
    atomicAdd(counter, 1);
    atomicAdd(fsum, 0.5f);
    atomicMax(biggest, (int)(blockIdx.x * blockDim.x + threadIdx.x));
    atomicAdd(u, 2);
}'''

DOUBLES = r'''
extern "C" __global__ void doubles(const double* __restrict__ x, double* __restrict__ y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = sqrt(x[i]) * exp(-x[i]) + log1p(x[i]) + max(x[i], 0.5);
}'''

INTEGERS = r'''
extern "C" __global__ void integers(const unsigned char* __restrict__ code, long long* __restrict__ wide,
                                    unsigned char* __restrict__ code_out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    wide[i] = (long long)code[i] * 4000000000LL + i;
    code_out[i] = (unsigned char)(code[i] + 7);  // wraps at 256
}'''

SCALARS = r'''
extern "C" __global__ void scalars(double* out, int i, unsigned int u, long long ll, float f, double d,
                                   unsigned char c) {
    out[0] = i; out[1] = u; out[2] = (double)ll; out[3] = f; out[4] = d; out[5] = c;
    out[6] = min(i, -3); out[7] = max(u, 5u);
}'''

P_AXPB = [("const float* __restrict__", "x"), ("float* __restrict__", "y"), ("float", "a"), ("float", "b"),
          ("long long", "n")]
P_REDUCE = [("const float*", "x"), ("float*", "partial"), ("int", "n")]
P_EARLY = [("const float*", "x"), ("float*", "out")]
P_TILE = [("const float*", "x"), ("float*", "y"), ("int", "n")]
P_ATOMICS = [("int*", "counter"), ("float*", "fsum"), ("int*", "biggest"), ("unsigned int*", "u")]
P_DOUBLES = [("const double*", "x"), ("double*", "y"), ("int", "n")]
P_INTEGERS = [("const unsigned char*", "code"), ("long long*", "wide"), ("unsigned char*", "code_out"), ("int", "n")]
P_SCALARS = [("double*", "out"), ("int", "i"), ("unsigned int", "u"), ("long long", "ll"), ("float", "f"),
             ("double", "d"), ("unsigned char", "c")]

SPECS = {
    "axpb": (AXPB, P_AXPB, False), "block_sum": (REDUCE, P_REDUCE, True),
    "early_return": (EARLY_RETURN, P_EARLY, True), "indices": (INDICES, [("int*", "out")], False),
    "transpose_tile": (TILE_2D, P_TILE, True), "count": (ATOMICS, P_ATOMICS, False),
    "doubles": (DOUBLES, P_DOUBLES, False), "integers": (INTEGERS, P_INTEGERS, False),
    "scalars": (SCALARS, P_SCALARS, False),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("GRAPHCONV_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def k(cache):
    from codegen.host import build_all
    built = build_all([(src, name, params, barrier) for name, (src, params, barrier) in SPECS.items()])
    return dict(zip(SPECS, built))


def test_grid_stride_elementwise(k):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10_000).astype(np.float32)
    y = np.zeros_like(x)
    k["axpb"].launch((7, 1, 1), (128, 1, 1), [x, y, np.float32(1.5), -0.25, x.size])  # fewer threads than n
    want = np.maximum(np.float32(1.5) * x + np.float32(-0.25), 0) + np.exp(-np.abs(x))
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


def test_shared_memory_tree_reduction(k):
    x = np.random.default_rng(1).random(300 * 256 - 17).astype(np.float32)
    partial = np.zeros(300, np.float32)
    k["block_sum"].launch((300, 1, 1), (256, 1, 1), [x, partial, x.size])
    want = np.pad(x, (0, 17)).reshape(300, 256).astype(np.float64).sum(axis=1)
    np.testing.assert_allclose(partial, want, rtol=1e-5)


def test_threads_returning_before_a_barrier(k):
    blocks = 40
    x = np.random.default_rng(2).random(blocks * 64).astype(np.float32)
    out = np.full(blocks * 128, -1.0, np.float32)
    k["early_return"].launch((blocks, 1, 1), (128, 1, 1), [x, out])
    out = out.reshape(blocks, 128)
    xs = x.reshape(blocks, 64)
    np.testing.assert_array_equal(out[:, :64], xs[:, ::-1])
    total = sum(xs[:, r] + xs[:, r + 32] for r in range(3))
    np.testing.assert_allclose(out[:, 64:96], np.repeat(total[:, None], 32, axis=1), rtol=1e-6)
    assert (out[:, 96:] == -1).all()


def test_2d_and_3d_indices(k):
    grid, block = (3, 2, 2), (4, 3, 2)
    out = np.full(np.prod(grid) * np.prod(block) * 6, -1, np.int32)
    k["indices"].launch(grid, block, [out])
    bz, by, bx, tz, ty, tx = np.meshgrid(*(np.arange(d) for d in grid[::-1] + block[::-1]), indexing="ij")
    want = np.stack([tx, ty, tz, bx, by, bz], axis=-1).reshape(-1)
    np.testing.assert_array_equal(out, want)


def test_2d_block_with_barrier(k):
    n = 64
    x = np.random.default_rng(3).random((n, n)).astype(np.float32)
    y = np.zeros_like(x)
    k["transpose_tile"].launch((n // 16, n // 16, 1), (16, 16, 1), [x, y, n])
    np.testing.assert_array_equal(y, x.T)


def test_atomics_across_blocks(k):
    counter, fsum, biggest, u = np.zeros(1, np.int32), np.zeros(1, np.float32), np.full(1, -5, np.int32), np.zeros(1, np.uint32)
    k["count"].launch((500, 1, 1), (96, 1, 1), [counter, fsum, biggest, u])
    assert counter[0] == 500 * 96 and u[0] == 2 * 500 * 96
    assert fsum[0] == 0.5 * 500 * 96  # exact: every partial sum is representable
    assert biggest[0] == 500 * 96 - 1


def test_double_kernel(k):
    x = np.random.default_rng(4).random(1000) * 10
    y = np.zeros_like(x)
    k["doubles"].launch((8, 1, 1), (128, 1, 1), [x, y, x.size])
    np.testing.assert_allclose(y, np.sqrt(x) * np.exp(-x) + np.log1p(x) + np.maximum(x, 0.5), rtol=1e-14)


def test_uint8_and_int64_pointers(k):
    code = np.arange(300).astype(np.uint8)
    wide, code_out = np.zeros(300, np.int64), np.zeros(300, np.uint8)
    k["integers"].launch((3, 1, 1), (128, 1, 1), [code, wide, code_out, 300])
    np.testing.assert_array_equal(wide, code.astype(np.int64) * 4_000_000_000 + np.arange(300))
    np.testing.assert_array_equal(code_out, (code.astype(np.int64) + 7) % 256)


def test_scalar_arguments_of_each_type(k):
    out = np.zeros(8)
    k["scalars"].launch((1, 1, 1), (1, 1, 1), [out, -7, np.uint32(4_000_000_000), -(2**40) - 3, 0.1, 1 / 3, 200])
    assert out.tolist() == [-7, 4e9, -(2**40) - 3, float(np.float32(0.1)), 1 / 3, 200, -7, 4e9]


def test_wrong_arguments_are_refused(k):
    x, y = np.zeros(10, np.float32), np.zeros(10, np.float32)
    with pytest.raises(CompileError, match=r"axpb.*'x'.*float32.*float64"):
        k["axpb"].launch((1, 1, 1), (32, 1, 1), [x.astype(np.float64), y, 1.0, 0.0, 10])
    with pytest.raises(CompileError, match="C-contiguous"):
        k["axpb"].launch((1, 1, 1), (32, 1, 1), [np.zeros(20, np.float32)[::2], y, 1.0, 0.0, 10])
    with pytest.raises(CompileError, match="takes 5 arguments"):
        k["axpb"].launch((1, 1, 1), (32, 1, 1), [x, y, 1.0])
    with pytest.raises(CompileError, match="needs an integer"):
        k["axpb"].launch((1, 1, 1), (32, 1, 1), [x, y, 1.0, 0.0, 10.0])
    with pytest.raises(CompileError, match="does not fit"):
        k["scalars"].launch((1, 1, 1), (1, 1, 1), [np.zeros(8), 2**31, 0, 0, 0.0, 0.0, 0])
    with pytest.raises(CompileError, match="read-only"):
        ro = np.zeros(10, np.float32)
        ro.flags.writeable = False
        k["axpb"].launch((1, 1, 1), (32, 1, 1), [x, ro, 1.0, 0.0, 10])
    with pytest.raises(CompileError, match="1024"):
        k["axpb"].launch((1, 1, 1), (2048, 1, 1), [x, y, 1.0, 0.0, 10])


def test_compile_error_names_kernel_and_line(cache):
    from codegen.host import HostKernel
    src = 'extern "C" __global__ void broken(float* y) {\n    int i = threadIdx.x;\n    y[i] = undefined_thing * 2.0f;\n}\n'
    with pytest.raises(CompileError) as e:
        HostKernel(src, "broken", [("float*", "y")], False)
    msg = str(e.value)
    assert "broken" in msg and "broken.cu:3:" in msg and "undefined_thing" in msg
    assert "y[i] = undefined_thing * 2.0f;" in msg


def test_barrier_flag_must_match_the_source(cache):
    from codegen.host import HostKernel
    with pytest.raises(CompileError, match="__syncthreads"):
        HostKernel(REDUCE, "block_sum", P_REDUCE, False)


def test_second_build_comes_from_the_cache(k):
    from codegen.host import HostKernel
    first = k["block_sum"]
    mtime = os.stat(first.path).st_mtime_ns
    again = HostKernel(REDUCE, "block_sum", P_REDUCE, True)
    assert first.compiled and not again.compiled
    assert again.path == first.path and os.stat(again.path).st_mtime_ns == mtime


def test_missing_compiler_is_a_backend_error(cache, monkeypatch):
    from codegen import host
    host._compiler.cache_clear()
    monkeypatch.setenv("PATH", "")
    try:
        with pytest.raises(BackendError, match=r"needs g\+\+.*backend='numpy'"):
            host.HostKernel(AXPB, "axpb", P_AXPB, False)
    finally:
        host._compiler.cache_clear()


# ---- schedules: races between the threads of a block show as a result that depends on the schedule ----
CP_ASYNC = (pathlib.Path(__file__).parent.parent / "codegen" / "templates" / "_cp_async.j2").read_text() \
    .replace("{% raw %}", "").replace("{% endraw %}", "")

# each thread stages one element; `{barrier}` between staging and reading a neighbour's element
NEIGHBOURS = r'''
extern "C" __global__ void neighbours(const float* __restrict__ x, float* __restrict__ y) {
    __shared__ float s[64];
    const int t = threadIdx.x;
    s[t] = x[blockIdx.x * 64 + t];
    {barrier}
    y[blockIdx.x * 64 + t] = s[(t + 1) % 64] - s[(t + 63) % 64];
    __syncthreads();
}'''

# the element staged by cp.async, read back by another thread after `{wait}` and a barrier
COPIED = CP_ASYNC + r'''
extern "C" __global__ void copied(const float* __restrict__ x, float* __restrict__ y) {
    __shared__ float s[64];
    const int t = threadIdx.x;
    gc_cp_async(&s[t], &x[blockIdx.x * 64 + t], t < 60);     // the last 4 zero-filled
    gc_cp_async_commit();
    {wait}
    __syncthreads();
    y[blockIdx.x * 64 + t] = s[63 - t];
    __syncthreads();
}'''

# a double buffer: the next step's copy is issued into the buffer read one step before; `{barrier}` is
# the barrier that keeps it from overwriting what slower threads still read
DOUBLE_BUFFER = CP_ASYNC + r'''
extern "C" __global__ void double_buffer(const float* __restrict__ x, float* __restrict__ y, int steps) {
    __shared__ float s[2][32];
    const int t = threadIdx.x;
    float acc = 0.0f;
    gc_cp_async(&s[0][t], &x[t], true);
    gc_cp_async_commit();
    for (int k = 0, buf = 0; k < steps; ++k, buf ^= 1) {
        if (k + 1 < steps) gc_cp_async(&s[buf ^ 1][t], &x[(k + 1) * 32 + t], true);
        gc_cp_async_commit();
        gc_cp_async_wait_prior();
        __syncthreads();
        for (int j = 0; j < 32; ++j) acc += s[buf][j] * (float)(j + 1);
        {barrier}
    }
    y[t] = acc + (float)t;
}'''


def schedules_of(kernel, run):
    """run(kernel) under each schedule of the host: {schedule: result}."""
    from codegen import host
    out = {}
    for name in host.SCHEDULES:
        with host.schedule(name):
            out[name] = run(kernel)
    return out


@pytest.fixture(scope="module")
def racy(cache):
    from codegen.host import build_all
    params2 = [("const float*", "x"), ("float*", "y")]
    cases = {"neighbours": (NEIGHBOURS, params2, {"barrier": ("__syncthreads();", "")}),
             "copied": (COPIED, params2, {"wait": ("gc_cp_async_wait_all();", "")}),
             "double_buffer": (DOUBLE_BUFFER, params2 + [("int", "steps")], {"barrier": ("__syncthreads();", "")})}
    built = {}
    for name, (source, params, holes) in cases.items():
        (hole, (good, bad)), = holes.items()
        for label, text in (("good", good), ("bad", bad)):
            built[name, label] = build_all([(source.replace("{%s}" % hole, text), name, params, True)])[0]
    return built


def test_every_schedule_runs_a_correct_kernel_to_the_same_bits(k, racy):
    x = np.random.default_rng(5).standard_normal(300 * 256).astype(np.float32)

    def block_sum(kernel):
        partial = np.zeros(300, np.float32)
        kernel.launch((300, 1, 1), (256, 1, 1), [x, partial, x.size])
        return partial

    def neighbours(kernel):
        y = np.zeros(64 * 20, np.float32)
        kernel.launch((20, 1, 1), (64, 1, 1), [x[:y.size], y])
        return y

    runs = schedules_of(k["block_sum"], block_sum)
    assert all(np.array_equal(r, runs["forward"]) for r in runs.values())
    runs = schedules_of(racy["neighbours", "good"], neighbours)
    xs = x[:64 * 20].reshape(20, 64)
    want = (np.roll(xs, -1, axis=1) - np.roll(xs, 1, axis=1)).reshape(-1)
    assert all(np.array_equal(r, want) for r in runs.values())


def test_a_missing_barrier_gives_wrong_results_under_one_order_or_the_other(racy):
    x = np.random.default_rng(6).standard_normal(64 * 20).astype(np.float32)

    def run(kernel):
        y = np.zeros_like(x)
        kernel.launch((20, 1, 1), (64, 1, 1), [x, y])
        return y.reshape(20, 64)

    xs = x.reshape(20, 64)
    want = np.roll(xs, -1, axis=1) - np.roll(xs, 1, axis=1)
    runs = schedules_of(racy["neighbours", "bad"], run)
    for name in ("forward", "reverse"):   # each order reads some neighbour before it was staged
        assert not np.array_equal(runs[name], want), name
    # forward: thread t has staged only elements <= t, so reading t + 1 is wrong where t < 63
    assert not np.array_equal(runs["forward"][:, :63], want[:, :63])


def test_a_copy_lands_only_at_the_wait_that_covers_it(racy):
    x = np.random.default_rng(7).standard_normal(64 * 8).astype(np.float32)

    def run(kernel):
        y = np.full_like(x, np.nan)
        kernel.launch((8, 1, 1), (64, 1, 1), [x, y])
        return y.reshape(8, 64)

    xs = x.reshape(8, 64).copy()
    xs[:, 60:] = 0.0                      # zero-filled copies
    want = xs[:, ::-1]
    good = schedules_of(racy["copied", "good"], run)
    assert all(np.array_equal(r, want) for r in good.values())
    bad = schedules_of(racy["copied", "bad"], run)
    assert not np.array_equal(bad["forward"], want) and not np.array_equal(bad["reverse"], want)
    assert np.array_equal(bad["early"], want)   # landing at issue hides the missing wait: the default does not


def test_a_copy_into_a_buffer_still_being_read_shows_when_copies_land_early(racy):
    steps = 6
    x = np.random.default_rng(8).standard_normal(32 * steps).astype(np.float32)

    def run(kernel):
        y = np.zeros(32, np.float32)
        kernel.launch((1, 1, 1), (32, 1, 1), [x, y, steps])
        return y

    want = (x.reshape(steps, 32).astype(np.float64) @ np.arange(1, 33)).sum() + np.arange(32)
    good = schedules_of(racy["double_buffer", "good"], run)
    assert all(np.array_equal(r, good["forward"]) for r in good.values())
    np.testing.assert_allclose(good["forward"], want, atol=1e-3)            # float32 sums of ~200 products
    bad = schedules_of(racy["double_buffer", "bad"], run)
    assert np.array_equal(bad["forward"], good["forward"])   # late copies hide the overwrite ...
    assert not np.array_equal(bad["early"], good["forward"]) and not np.array_equal(bad["reverse,early"], good["forward"])


def test_a_misspelt_schedule_is_refused(k, monkeypatch):
    from codegen import host
    monkeypatch.setenv("GC_HOST_SCHEDULE", "backwards")
    with pytest.raises(BackendError, match="GC_HOST_SCHEDULE='backwards'.*reverse,early"):
        k["axpb"].launch((1, 1, 1), (32, 1, 1), [np.zeros(10, np.float32), np.zeros(10, np.float32), 1.0, 0.0, 10])
    monkeypatch.setenv("GC_HOST_SCHEDULE", "early, reverse")
    assert host.current_schedule() == "reverse,early"
    monkeypatch.setenv("GC_HOST_SCHEDULE", "reverse,late")              # late: the default landing, said aloud
    assert host.current_schedule() == "reverse"
    with host.schedule("reverse,late"):                                  # the same words in Python
        assert host.current_schedule() == "reverse"
    with pytest.raises(BackendError, match=r"schedule\('sideways'\): use forward or reverse"):
        with host.schedule("sideways"):
            pass
    monkeypatch.setenv("GC_HOST_SCHEDULE", "early,late")
    with pytest.raises(BackendError, match=r",late \(at the wait that covers them: the default\)"):
        host.current_schedule()


def test_gc_host_asan_takes_1_or_0(monkeypatch):
    from codegen import host
    for text, on in (("1", True), ("0", False), ("", False), (" 1 ", True)):
        monkeypatch.setenv("GC_HOST_ASAN", text)
        assert host.asan_build() is on and (host.ASAN_FLAGS[0] in host.flags()) is on
    monkeypatch.setenv("GC_HOST_ASAN", "yes")                          # not silently a plain build
    with pytest.raises(BackendError, match="GC_HOST_ASAN='yes': set it to 1 .* or 0"):
        host.flags()


# ---- bounds: AddressSanitizer builds (GC_HOST_ASAN=1) in a child process ----------------------------
BOUNDS_CHILD = r'''
import sys
import numpy as np
from codegen.host import HostKernel
SRC = """
extern "C" __global__ void shifted(const float* __restrict__ x, float* __restrict__ y, int shift, int sshift) {
    __shared__ float s[64];
    __shared__ float after[64];
    const int t = threadIdx.x;
    s[t] = x[t + shift];
    after[t] = 0.0f;
    __syncthreads();
    y[t] = s[63 - t + sshift];
}"""
k = HostKernel(SRC, "shifted", [("const float*", "x"), ("float*", "y"), ("int", "shift"), ("int", "sshift")], True)
x = np.arange(64, dtype=np.float32)
y = np.zeros(64, np.float32)
k.launch((1, 1, 1), (64, 1, 1), [x, y, int(sys.argv[1]), int(sys.argv[2])])
print("done", y[0])
'''


def asan_available():
    import subprocess
    gxx = shutil.which("g++")
    path = subprocess.run([gxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip() if gxx else ""
    return os.path.isabs(path) and os.path.exists(path)


@pytest.mark.skipif(not asan_available(), reason="g++ has no AddressSanitizer runtime")
def test_a_read_past_an_array_stops_an_asan_build_and_names_the_kernel(cache, tmp_path):
    import subprocess
    import sys
    from codegen.host import asan_env, asan_report
    script = tmp_path / "child.py"
    script.write_text(BOUNDS_CHILD)
    env = {**asan_env(), "GRAPHCONV_CACHE": str(cache), "PYTHONPATH": os.getcwd()}
    def run(*args):
        return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600)
    inside = run("0", "0")
    assert inside.returncode == 0 and "done 63.0" in inside.stdout, inside.stderr[-2000:]
    past = run("1", "0")
    assert past.returncode == 86 and asan_report(past.stderr) == ("heap-buffer-overflow", "read", 4, "shifted", None)
    assert asan_report(run("-1", "0").stderr) == ("heap-buffer-overflow", "read", 4, "shifted", None)
    # one past the shared array s (another shared array follows it: plain indexing would read that one)
    assert asan_report(run("0", "1").stderr) == ("global-buffer-overflow", "read", 4, "shifted", "s")


def test_an_asan_build_without_its_runtime_says_how_to_run_it(cache, monkeypatch):
    from codegen.host import HostKernel
    monkeypatch.setenv("GC_HOST_ASAN", "1")
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("this process has the ASan runtime")
    with pytest.raises(BackendError, match="AddressSanitizer.*check --bounds"):
        HostKernel(AXPB, "axpb", P_AXPB, False)


def test_the_same_kernel_of_two_graphs_compiles_once(tmp_path, monkeypatch):
    """A kernel's header comment names its graph's nodes and layers; the compiled code does not
    depend on it, so the cache (host and NVRTC) keys on the code with comment lines blanked: the
    same kernel in a second graph, other names and all, is not compiled again."""
    import graphconv as gc
    from codegen import nvrtc
    monkeypatch.setenv("GRAPHCONV_CACHE", str(tmp_path))

    def net(name):
        g = gc.Graph(name)
        g.output(g.relu(g.input("x", ("N", 8)), name=f"{name}_act"))
        return g
    first, second = gc.compile(net("one"), backend="host"), gc.compile(net("two"), backend="host")
    (k1, spec1), = [(k, s) for k, s in zip(first.kernels.values(), first.program.kernels)]
    (k2, spec2), = [(k, s) for k, s in zip(second.kernels.values(), second.program.kernels)]
    assert spec1.source != spec2.source and spec1.name == spec2.name          # the header differs, the code not
    assert k1.compiled and not k2.compiled
    x = np.array([[-1, 2, -3, 4, 0, 5, -6, 7]], np.float32)
    np.testing.assert_array_equal(second.run({"x": x})["two_act"], np.maximum(x, 0))
    if nvrtc.available():
        assert nvrtc.compile_kernel(spec2.source, spec2.name).registers == \
            nvrtc.compile_kernel(spec1.source, spec1.name).registers
        assert len(list((tmp_path / "nvrtc").glob("*.cubin"))) == 1


HELPER = r'''
__device__ __forceinline__ float helper(float v) { return v * %s; }
extern "C" __global__ void %s(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = helper(x[i]);
}'''


def test_kernels_built_together_keep_their_own_helpers_and_errors(tmp_path, monkeypatch):
    """build_all builds the kernels the cache lacks as a few libraries of several kernels (one g++
    for the header's runtime of many kernels): each kernel's source lives in a namespace of its own,
    so two kernels' helper functions of one name stay apart; each kernel's cache entry is its
    library; and a refused kernel is named with its line, the first in the list's order."""
    from codegen.host import build_all
    monkeypatch.setenv("GRAPHCONV_CACHE", str(tmp_path))
    params = [("const float*", "x"), ("float*", "y"), ("int", "n")]
    kernels = [(HELPER % (f"{m}.0f", f"times{m}"), f"times{m}", params, False) for m in (2, 3, 5)]
    built = build_all(kernels, jobs=1)
    assert all(k.compiled for k in built)
    assert len({os.stat(k.path).st_ino for k in built}) == 1          # one library, three entries
    x = np.arange(7, dtype=np.float32)
    for m, kernel in zip((2, 3, 5), built):
        y = np.full_like(x, np.nan)
        kernel.launch((1, 1, 1), (8, 1, 1), [x, y, 7])
        np.testing.assert_array_equal(y, x * m)
    again = build_all(kernels + [(HELPER % ("7.0f", "times7"), "times7", params, False)], jobs=1)
    assert [k.compiled for k in again] == [False, False, False, True]
    broken = [(HELPER % ("7.0f", "ok"), "ok", params, False),
              (HELPER % ("bad_one", "first_bad"), "first_bad", params, False),
              (HELPER % ("bad_two", "second_bad"), "second_bad", params, False)]
    for order in (broken, broken[::-1]):
        with pytest.raises(CompileError) as e:
            build_all(order, jobs=1)
        first = "first_bad" if order is broken else "second_bad"
        assert f"kernel {first}: {first}.cu:2:" in str(e.value) and "bad_" in str(e.value)
    # a kernel refused before any build (a parameter type) after one g++ refuses: g++'s error first
    unpassable = (HELPER % ("2.0f", "c2"), "c2", [("float**", "x")] + params[1:], False)
    with pytest.raises(CompileError, match="first_bad.cu:2:"):
        build_all([broken[1], unpassable], jobs=1)
    with pytest.raises(CompileError, match="c2: parameter 'x' has type 'float\\*\\*'"):
        build_all([unpassable, broken[1]], jobs=1)


def test_a_kernel_source_is_compiled_as_written():
    """The unit around a kernel's source changes nothing in it: an '@' in a string stays one (the
    unit's key is not spliced into the source), an #include stays outside the kernel's namespace."""
    from codegen.host import HostKernel
    params = [("const float*", "x"), ("float*", "y"), ("int", "n")]
    at = HostKernel('extern "C" __global__ void at1(const float* x, float* y, int n) {\n'
                    '    const char* t = "user@host"; const int i = threadIdx.x;\n'
                    '    if (i < n) y[i] = t[4] == 64 ? 2 * x[i] : -1.0f;\n}', "at1", params, False)
    clamp = HostKernel('#include <algorithm>\nextern "C" __global__ void clampk(const float* x, float* y, int n) {\n'
                       '    const int i = threadIdx.x;\n    if (i < n) y[i] = std::clamp(x[i], 0.0f, 1.0f);\n}',
                       "clampk", params, False)
    x = np.linspace(-1, 2, 7, dtype=np.float32)
    for kernel, want in ((at, 2 * x), (clamp, np.clip(x, 0, 1))):
        y = np.full_like(x, np.nan)
        kernel.launch((1, 1, 1), (8, 1, 1), [x, y, 7])
        np.testing.assert_array_equal(y, want)
    with pytest.raises(CompileError, match=r"broken_inc.cu:3:.*undefined_thing"):
        HostKernel('#include <cmath>\nextern "C" __global__ void broken_inc(float* y) {\n    y[0] = undefined_thing;\n}',
                   "broken_inc", [("float*", "y")], False)


def test_an_asan_report_names_the_kernel_or_its_helper_not_its_namespace():
    from codegen.host import asan_report
    head = ("==1==ERROR: AddressSanitizer: heap-buffer-overflow on address 0x6 at pc 0x7 bp 0x8 sp 0x9\n"
            "READ of size 4 at 0x6 thread T0\n")
    helper = head + "    #0 0x7f01 in gc_d2e211994988678d453583ab::get(float const*, int) /c/k.cu:3\n"
    kernel = head + "    #0 0x7f01 in shifted /c/k.cu:7\n"
    assert asan_report(helper) == ("heap-buffer-overflow", "read", 4, "get", None)
    assert asan_report(kernel) == ("heap-buffer-overflow", "read", 4, "shifted", None)
