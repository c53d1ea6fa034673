"""Compile generated CUDA C to sm_XX cubins with NVRTC, through ctypes, without a GPU or driver.

Why cubins and not PTX: NVRTC 13.5 (pip `nvidia-cuda-nvrtc`) writes PTX 9.5, which the GPU machines'
CUDA 13.0 driver cannot JIT; a cubin for the real architecture loads on any driver that knows it.
Why ctypes: `cuda-bindings` is not installed everywhere, and NVRTC's C API is eight small functions.
The project's policy: NVRTC warnings (front end or ptxas) and register spills are errors.
"""
import concurrent.futures
import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import json
import os
import re
import threading
from dataclasses import asdict, dataclass

from graphconv.errors import BackendError, CompileError

from .cache import cache_dir, code_of, cores, digest

_MISSING = "NVRTC is not installed: pip install nvidia-cuda-nvrtc (the 'cuda' extra)"
# --ptxas-options=-v (and -Xptxas=-v, both accepted by NVRTC 13.5) puts the resource report in the log.
# Register limits are each kernel's own business: its __launch_bounds__ (a global --maxrregcount
# made ptxas spill register-blocked GEMM tiles at 64 registers).
_BASE_OPTIONS = ("--ptxas-options=-v", "--std=c++17", "--fmad=true")


@dataclass(frozen=True)
class Compiled:
    name: str  # kernel name (extern "C", so unmangled)
    cubin: bytes
    log: str  # NVRTC's log, with the ptxas -v report
    registers: int  # per thread
    shared_bytes: int  # static shared memory per block
    local_bytes: int  # local memory per thread (cumulative stack size, callees included)
    spill_stores: int
    spill_loads: int

    def resources(self) -> dict:
        return {k: getattr(self, k) for k in ("registers", "shared_bytes", "local_bytes", "spill_stores", "spill_loads")}


def nvidia_roots() -> list:
    """The folders of the `nvidia` namespace the pip CUDA wheels install into (their files are under
    nvidia/cu13/{lib,bin} for CUDA 13, nvidia/cuda_nvrtc/lib for cu12)."""
    spec = importlib.util.find_spec("nvidia")
    return list(spec.submodule_search_locations or []) if spec else []


def cuda_homes() -> list:
    """A CUDA toolkit's folders: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda."""
    return list(filter(None, (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")))


def _candidates():
    """Where libnvrtc may be: the pip wheels, the loader's search path, then a CUDA toolkit."""
    for root in nvidia_roots():
        yield from sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*")), reverse=True)
        yield from sorted(glob.glob(os.path.join(root, "*", "bin", "nvrtc64*.dll")), reverse=True)
    if found := ctypes.util.find_library("nvrtc"):
        yield found
    for home in cuda_homes():
        yield from sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")), reverse=True)


@functools.lru_cache(maxsize=None)
def _lib():
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)  # CDLL (not PyDLL): calls release the GIL, so threads compile in parallel
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            return lib
        except OSError:
            continue
    return None


def available() -> bool:
    return _lib() is not None


def _need_lib():
    if (lib := _lib()) is None:
        raise BackendError(_MISSING)
    return lib


@functools.lru_cache(maxsize=None)
def version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _need_lib().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def _nvrtc_compile(source: str, name: str, options: list[str]) -> tuple[int, bytes, str]:
    """One NVRTC run: (status, cubin or b"", log). The only function that calls the compiler."""
    lib = _need_lib()
    prog = ctypes.c_void_p()
    status = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None)
    if status:
        raise BackendError(f"nvrtcCreateProgram: {lib.nvrtcGetErrorString(status).decode()}")
    try:
        argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        status = lib.nvrtcCompileProgram(prog, len(options), argv)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        cubin = b""
        if status == 0:
            lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetCUBIN(prog, buf)
            cubin = buf.raw
        return status, cubin, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


_DIAG = re.compile(r"^(?:.*?\((\d+)\): )?(?:nvrtc: |ptxas )?(?:catastrophic )?(error|warning)\b.*$", re.M)
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _refuse(what: str, log: str, source: str, prefix: str):
    """CompileError quoting the first diagnostic of kind `what` and the source line it points at."""
    diags = [m for m in _DIAG.finditer(log) if m.group(2) == what] or list(_DIAG.finditer(log))
    if not diags:
        raise CompileError(f"{prefix}: NVRTC failed:\n{log.strip() or '(empty log)'}")
    first = diags[0]
    msg = f"{prefix}: NVRTC {'failed' if what == 'error' else 'warning (warnings are errors here)'}:\n{first.group(0).strip()}"
    lines = source.splitlines()
    if first.group(1) and 0 < int(first.group(1)) <= len(lines):
        msg += f"\n  line {first.group(1)}: {lines[int(first.group(1)) - 1].strip()}"
    raise CompileError(msg)


def _resources(log: str, name: str) -> tuple[dict, dict]:
    """The ptxas -v report: (resources of kernel `name`, {function: (spill stores, loads)} for all)."""
    res = dict(registers=0, shared_bytes=0, local_bytes=0, spill_stores=0, spill_loads=0)
    spills, entry, props = {}, None, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            entry = m.group(1)
        elif m := re.search(r"Function properties for (\S+)", line):
            props = m.group(1)
        elif m := _STACK.search(line):
            spills[props] = (int(m.group(2)), int(m.group(3)))
            if props == name:
                res.update(local_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif entry == name and (m := re.search(r"Used (\d+) registers", line)):
            res["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                res["shared_bytes"] = int(s.group(1))
            if s := re.search(r"(\d+) bytes cumulative stack size", line):
                res["local_bytes"] = int(s.group(1))  # includes non-inlined callees' frames
    return res, spills


# ptxas does not always allocate registers alike for one source (seen: 110 and 128 registers; a kernel
# at its launch bound's cap spilling 20 bytes in 2 of 32 compiles, each a process's first under load):
# a compile that spills is tried again, and refused only when every attempt spills.
SPILL_ATTEMPTS = 3


def compile_kernel(source: str, name: str, arch: str = "sm_90", options: tuple = (), where: str = "") -> Compiled:
    """Compile `source` and return the cubin and resources of its kernel `name`, from the disk cache when
    this exact source, name, arch, options and NVRTC version were compiled before."""
    _need_lib()  # even a cache hit needs NVRTC's version for the key
    prefix = f"{where}{name}"
    argv = [f"--gpu-architecture={arch}", *_BASE_OPTIONS, *options]
    key = digest(code_of(source), name, "\0".join(argv), "%d.%d" % version())
    path = cache_dir("nvrtc") / key
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        return Compiled(cubin=path.with_suffix(".cubin").read_bytes(), **meta)
    except (OSError, ValueError, TypeError):
        pass  # not cached (or a torn/old entry): compile
    entry = f"Compiling entry function '{name}'"
    for _ in range(SPILL_ATTEMPTS):
        status, cubin, log = _nvrtc_compile(source, name, argv)
        if status:
            _refuse("error", log, source, prefix)
        if _DIAG.search(log):
            _refuse("warning", log, source, prefix)
        res, spills = _resources(log, name)
        if not any(stores or loads for stores, loads in spills.values()):
            break       # ptxas is not deterministic: a kernel at its register cap spilled once in ~16 compiles
    # NVRTC 13.0 (the GPU machines' own) can return an empty log: seen there for a program compiled a
    # second time in one process. Then the cubin itself must hold the kernel; its resources are unknown.
    if entry not in log and name.encode() not in cubin:
        raise CompileError(f"{prefix}: NVRTC compiled no kernel named {name!r} (is it extern \"C\" __global__?)")
    for fn, (stores, loads) in spills.items():
        if stores or loads:  # spills mean local-memory traffic in the inner loop: refuse, don't ship slow code
            who = "" if fn == name else f" (through device function {fn})"
            raise CompileError(f"{prefix}: uses local memory{who}: {stores} bytes spill stores, {loads} bytes "
                               f"spill loads ({res['registers']} registers); lower the tile or unroll sizes")
    compiled = Compiled(name=name, cubin=cubin, log=log, **res)
    # cubin first, then the json that makes the entry visible; temp file + os.replace, so readers in
    # other processes never see half a file.
    meta = {k: v for k, v in asdict(compiled).items() if k != "cubin"}
    for suffix, data in ((".cubin", cubin), (".json", json.dumps(meta).encode())):
        tmp = path.with_suffix(f"{suffix}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path.with_suffix(suffix))
    return compiled


def compile_many(items: list[tuple[str, str]], arch="sm_90", jobs=None, where_of=None) -> list[Compiled]:
    """compile_kernel over (source, name) pairs in threads (NVRTC runs outside the GIL); results keep
    the order of `items`; the first failure in that order is raised. `where_of(name)` gives the prefix."""
    jobs = jobs or min(len(items), cores()) or 1

    def one(item):
        source, name = item
        return compile_kernel(source, name, arch, where=(where_of(name) or "") if where_of else "")

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, items))
