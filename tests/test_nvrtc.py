"""codegen.nvrtc: sm_90 cubins from NVRTC without a GPU; warnings and spills refused; disk cache."""
import struct
import subprocess

import pytest

from codegen import sass
from graphconv.errors import BackendError, CompileError

nvrtc = pytest.importorskip("codegen.nvrtc")
if not nvrtc.available():
    pytest.skip("libnvrtc not found: pip install nvidia-cuda-nvrtc", allow_module_level=True)

SMALL = """extern "C" __global__ void scale(const float* a, float* b, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) b[i] = a[i] * 2.0f;
}
"""

SHARED = """extern "C" __global__ void rev(const float* a, float* b) {
  __shared__ float s[256];
  s[threadIdx.x] = a[blockIdx.x * 256 + threadIdx.x];
  __syncthreads();
  b[blockIdx.x * 256 + threadIdx.x] = s[255 - threadIdx.x];
}
"""

# 128 live floats per thread under a 32-register cap (1024 threads x 2 blocks per SM): ptxas must spill.
SPILLS = """extern "C" __global__ void __launch_bounds__(1024, 2) heavy(const float* a, float* b, int n) {
  float acc[128];
  #pragma unroll
  for (int j = 0; j < 128; ++j) acc[j] = a[threadIdx.x + j * n];
  float s = 0;
  #pragma unroll
  for (int j = 0; j < 128; ++j) s += acc[j] * acc[(j * 7) % 128];
  #pragma unroll
  for (int j = 0; j < 128; ++j) b[threadIdx.x + j * n] = acc[j] * s;
}
"""


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHCONV_CACHE", str(tmp_path / "cache"))


def _no_nvrtc(monkeypatch):
    def refuse(*args):
        raise AssertionError("NVRTC was called")

    monkeypatch.setattr(nvrtc, "_nvrtc_compile", refuse)


def test_version():
    assert nvrtc.version() >= (12, 0)


def test_small_kernel_compiles_to_sm90_cubin():
    c = nvrtc.compile_kernel(SMALL, "scale")
    assert c.name == "scale"
    assert c.cubin[:4] == b"\x7fELF"
    assert struct.unpack_from("<H", c.cubin, 18)[0] == 190  # e_machine EM_CUDA
    assert (struct.unpack_from("<I", c.cubin, 48)[0] >> 8) & 0xFF == 90  # e_flags: SM version (ABI v8)
    assert c.registers > 0
    assert c.spill_stores == c.spill_loads == 0 and c.local_bytes == 0 and c.shared_bytes == 0
    assert set(c.resources()) == {"registers", "shared_bytes", "local_bytes", "spill_stores", "spill_loads"}
    assert "Used" in c.log


def test_static_shared_memory_reported():
    assert nvrtc.compile_kernel(SHARED, "rev").shared_bytes == 1024


def test_resources_of_the_named_kernel_only():
    both = SMALL + SHARED
    assert nvrtc.compile_kernel(both, "rev").shared_bytes == 1024
    assert nvrtc.compile_kernel(both, "scale").shared_bytes == 0


def test_syntax_error_names_line_and_quotes_it():
    bad = SMALL.replace("int i = blockIdx.x * blockDim.x + threadIdx.x;", "int i = blockIdx.x * blockDim.x + threadIdx.x")
    with pytest.raises(CompileError) as e:
        nvrtc.compile_kernel(bad, "scale", where="conv1 [fused_conv] template t.cu.j2: ")
    msg = str(e.value)
    assert msg.startswith("conv1 [fused_conv] template t.cu.j2: scale: NVRTC failed:\n")
    assert "error" in msg.splitlines()[1]
    assert "line 3: if (i < n) b[i] = a[i] * 2.0f;" in msg  # the missing ';' is reported on the next line


def test_warning_is_an_error():
    warned = SMALL.replace("{\n", "{\n  int unused;\n", 1)  # NVRTC warns #177-D by default
    with pytest.raises(CompileError, match=r"warning[\s\S]*unused[\s\S]*line 2: int unused;"):
        nvrtc.compile_kernel(warned, "scale")


def test_spills_are_refused():
    with pytest.raises(CompileError, match=r"heavy: uses local memory: \d+ bytes spill stores, \d+ bytes spill loads"):
        nvrtc.compile_kernel(SPILLS, "heavy")


def test_a_spill_is_compiled_again_before_it_is_refused(monkeypatch, tmp_path):
    """ptxas now and then spills a kernel at its register cap where it usually does not: a spilling
    compile is tried again (SPILL_ATTEMPTS in all) and the first clean one kept; all spilling: refused."""
    monkeypatch.setenv("GRAPHCONV_CACHE", str(tmp_path / "cache"))
    real, calls = nvrtc._nvrtc_compile, []

    def flaky(source, name, argv, spill_first=1):
        status, cubin, log = real(source, name, argv)
        calls.append(name)
        if len(calls) <= spill_first:     # as a run of ptxas that spilled would report it
            log = log.replace("0 bytes spill stores, 0 bytes spill loads", "20 bytes spill stores, 20 bytes spill loads")
        return status, cubin, log
    monkeypatch.setattr(nvrtc, "_nvrtc_compile", flaky)
    c = nvrtc.compile_kernel(SMALL, "scale")
    assert len(calls) == 2 and c.spill_stores == 0
    calls.clear()
    monkeypatch.setattr(nvrtc, "_nvrtc_compile", lambda *a: flaky(*a, spill_first=99))
    with pytest.raises(CompileError, match="scale2: uses local memory: 20 bytes spill stores"):
        nvrtc.compile_kernel(SMALL.replace("scale(", "scale2("), "scale2")
    assert len(calls) == nvrtc.SPILL_ATTEMPTS


def test_unknown_kernel_name():
    with pytest.raises(CompileError, match="no kernel named 'nope'"):
        nvrtc.compile_kernel(SMALL, "nope")


def test_bad_option_is_a_compile_error():
    with pytest.raises(CompileError, match="unrecognized option"):
        nvrtc.compile_kernel(SMALL, "scale", options=("--no-such-option",))


def test_cache_hit_does_not_call_nvrtc(monkeypatch, tmp_path):
    first = nvrtc.compile_kernel(SHARED, "rev")
    files = sorted(p.suffix for p in (tmp_path / "cache" / "nvrtc").iterdir())
    assert files == [".cubin", ".json"]
    _no_nvrtc(monkeypatch)
    assert nvrtc.compile_kernel(SHARED, "rev") == first
    for changed in [dict(source=SHARED + "\n"), dict(options=("-lineinfo",)), dict(arch="sm_80")]:
        args = {"source": SHARED, "name": "rev", **changed}
        with pytest.raises(AssertionError, match="NVRTC was called"):
            nvrtc.compile_kernel(**args)


def test_compile_many_keeps_order_and_prefixes_errors():
    items = [(SHARED, "rev"), (SMALL, "scale")] * 4
    out = nvrtc.compile_many(items, jobs=4)
    assert [c.name for c in out] == [name for _, name in items]
    assert [c.shared_bytes for c in out] == [1024, 0] * 4
    bad = [(SMALL, "scale"), (SMALL.replace(";", "", 1), "broken")]
    with pytest.raises(CompileError, match=r"^layer broken: broken: NVRTC failed"):
        nvrtc.compile_many(bad, where_of=lambda name: f"layer {name}: ")


def test_missing_library_is_a_backend_error(monkeypatch):
    monkeypatch.setattr(nvrtc, "_lib", lambda: None)
    assert not nvrtc.available()
    with pytest.raises(BackendError, match="pip install nvidia-cuda-nvrtc"):
        nvrtc.compile_kernel(SMALL, "scale")


CUOBJDUMP = sass.tool("cuobjdump")


@pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump not installed")
def test_cuobjdump_sees_sm90(tmp_path):
    path = tmp_path / "k.cubin"
    path.write_bytes(nvrtc.compile_kernel(SMALL, "scale").cubin)
    out = subprocess.run([CUOBJDUMP, "-sass", str(path)], capture_output=True, text=True).stdout
    assert "code for sm_90" in out and "Function : scale" in out and "LDG.E" in out and "STG.E" in out


def test_activations_with_irrational_constants_compile_for_sm90_as_literals():
    """GELU's sqrt(2/pi) and erf(x/sqrt(2)): sympy's C printer writes M_SQRT2 / M_PI, which NVRTC
    does not define (g++ does: the host backend passed); the kernels print them as literals of their
    float type. examples/custom_net.py's GELU-tanh in a fused linear chain and its gradient."""
    import sympy as sp
    import graphconv as gc
    from codegen import nvrtc
    from codegen.cprinter import CudaPrinter
    from codegen.program import Program
    from graphconv.pipeline import build
    if not nvrtc.available():
        pytest.skip("NVRTC not installed")
    x = sp.Symbol("x", real=True)
    text = CudaPrinter("float32").doprint(sp.erf(x / sp.sqrt(2)) * sp.pi + sp.log(2))
    assert "M_" not in text and "1.41421356F" in text and "3.14159265F" in text and "0.693147181F" in text
    gc.define_activation("gelu_erf_t", x / 2 * (1 + sp.erf(x / sp.sqrt(2))))
    gc.define_activation("gelu_tanh_t", x / 2 * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (x + sp.Rational(44715, 10**6) * x**3))))
    g = gc.Graph("gelu")
    h = g.activation(g.linear(g.input("x", ("N", 12)), 8, name="fc1"), "gelu_erf_t")
    g.output(g.linear(g.activation(g.linear(h, 8, name="fc2"), "gelu_tanh_t"), 3, name="fc3"))
    for stage in ("fused", "fused-train"):
        kernels = Program(build(g, stage)).kernels
        assert not any("M_PI" in k.source or "M_SQRT" in k.source for k in kernels)
        nvrtc.compile_many([(k.source, k.name) for k in kernels])
