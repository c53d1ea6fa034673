"""The `host` runtime: generated CUDA C kernels compiled by g++ (with runtime/gc_host.h) and run on the CPU.

Each kernel becomes a unit: its source in a namespace of its own and a launcher
`gc_host_launch_<key>(gx, gy, gz, bx, by, bz, void** args)`, where `args[i]` points at the i-th
argument's value exactly as in cuLaunchKernel's kernelParams. A shared library holds one unit or, built
by `build_all`, several (the header's runtime, most of a small kernel's build, is then compiled once for
them all); the cache enters it under each unit's key (hard links). Flags: `-O2 -ffp-contract=off -fno-math-errno`, no
`-march=native`: the same IEEE single-precision operations on every CPU (no fused multiply-add where
the source has none), portable libraries, and sqrtf inlined. `-fvisibility=hidden -fno-gnu-unique`:
each library keeps its own threadIdx, fibre pool and helper functions (g++ would otherwise unify the
header's inline variables across every loaded library); only the launchers are exported. Blocks run on
all cores (OpenMP; set OMP_NUM_THREADS to use fewer). The header is precompiled once per flag set
(`header_dir`): a kernel's build then reads gc_host.h.gch instead of parsing the header and the
standard headers it includes.

Schedules (races): GC_HOST_SCHEDULE, read at each launch, is one of SCHEDULES: the order in which a
block's threads (and the grid's blocks) run, forward or reverse, and whether a cp.async copy lands at
the wait that covers it (the default, "late": the latest the hardware may) or when it is issued ("early").
A race between two threads of a block shows as a different result under one of the four
(`schedule(name)` sets it for a `with` block; `graphconv check --backend host --races` runs all four).

Bounds: with GC_HOST_ASAN=1 kernels are built with AddressSanitizer (heap and globals; not the kernel's
own stack frames, which the fibres switch between), so a read or write past either end of an array a
kernel is handed, or of one of its __shared__ arrays (plain statics then, every block on one OS
thread), stops the process with a report naming the kernel. The process must have the ASan
runtime loaded first: `asan_env()` gives the environment for a child process (`graphconv check
--bounds` re-runs itself that way and turns the report into one line).
"""
import contextlib
import concurrent.futures
import ctypes
import functools
import operator
import os
import pathlib
import re
import shutil
import subprocess

import numpy as np

from graphconv.errors import BackendError, CompileError

from .cache import cache_dir, code_of, cores, digest, temp_path, write_atomic

HEADER = pathlib.Path(__file__).resolve().parent / "runtime" / "gc_host.h"
FLAGS = ("-O2", "-std=c++17", "-fopenmp", "-fPIC", "-shared", "-w", "-ffp-contract=off", "-fno-math-errno",
         "-fvisibility=hidden", "-fno-gnu-unique")
_INTEGERS = {  # C type (qualifiers dropped) -> numpy dtype, for scalar arguments and pointees
    "int": np.int32, "unsigned int": np.uint32, "unsigned": np.uint32, "long long": np.int64,
    "long long int": np.int64, "long": np.int64, "unsigned long long": np.uint64, "unsigned long": np.uint64,
    "size_t": np.uint64, "short": np.int16, "unsigned short": np.uint16, "char": np.int8,
    "signed char": np.int8, "unsigned char": np.uint8, "bool": np.bool_, "int8_t": np.int8, "uint8_t": np.uint8,
    "int16_t": np.int16, "uint16_t": np.uint16, "int32_t": np.int32, "uint32_t": np.uint32,
    "int64_t": np.int64, "uint64_t": np.uint64,
}
_DTYPES = {**_INTEGERS, "float": np.float32, "double": np.float64, "void": None}
_QUALIFIERS = {"const", "volatile", "__restrict__", "__restrict", "restrict"}
_ERROR = re.compile(r"^(.*?):(\d+):(\d+): (?:fatal )?error: (.*)$", re.M)
SCHEDULES = ("forward", "reverse", "early", "reverse,early")
_SCHEDULE_WORDS = {"forward", "reverse", "early", "late"}


def current_schedule() -> str:
    """GC_HOST_SCHEDULE as one of SCHEDULES ("forward" when unset); BackendError for anything else."""
    text = os.environ.get("GC_HOST_SCHEDULE", "")
    return _schedule_of(text, f"GC_HOST_SCHEDULE={text.strip()!r}")


def _schedule_of(text, where) -> str:
    """The schedule that words like "reverse,late" name: one of SCHEDULES, or BackendError."""
    words = {w.strip() for w in text.split(",") if w.strip()}
    if not words <= _SCHEDULE_WORDS or {"forward", "reverse"} <= words or {"early", "late"} <= words:
        raise BackendError(f"{where}: use forward or reverse (the order of a block's threads), optionally with "
                           f",early (cp.async copies land when issued) or ,late (at the wait that covers them: the "
                           f"default), e.g. 'reverse,early'; the host schedules are {', '.join(SCHEDULES)}")
    return ",".join(w for w in ("reverse", "early") if w in words) or "forward"


@contextlib.contextmanager
def schedule(name: str):
    """Run the host kernels launched inside the `with` block under schedule `name` (one of SCHEDULES,
    or the same words GC_HOST_SCHEDULE takes: "reverse,late" is "reverse")."""
    if not isinstance(name, str) or not name.strip():
        raise BackendError(f"schedule({name!r}): the host schedules are {', '.join(SCHEDULES)}")
    name = _schedule_of(name, f"schedule({name!r})")
    old = os.environ.get("GC_HOST_SCHEDULE")
    os.environ["GC_HOST_SCHEDULE"] = name
    try:
        current_schedule()
        yield
    finally:
        if old is None:
            os.environ.pop("GC_HOST_SCHEDULE", None)
        else:
            os.environ["GC_HOST_SCHEDULE"] = old


ASAN_FLAGS = ("-fsanitize=address", "--param=asan-stack=0", "-fno-omit-frame-pointer", "-DGC_HOST_ASAN=1")
# the frame's function, past its unit's namespace (gc_<key>::) where it is a helper of the kernel
_ASAN_ERROR = re.compile(r"ERROR: AddressSanitizer: ([\w-]+).*?\n(READ|WRITE) of size (\d+).*?\n\s*#0 \S+ in "
                         r"(?:gc_[0-9a-f]+::)?(\w+)", re.S)
_INCLUDE = re.compile(r"^\s*#\s*include\b")
_ASAN_GLOBAL = re.compile(r"is located .*? global variable '(\w+)'")


def asan_build() -> bool:
    """Whether GC_HOST_ASAN asks for AddressSanitizer builds: "1" yes; unset, "" or "0" no; anything
    else (yes, true) a BackendError rather than a silent no."""
    text = os.environ.get("GC_HOST_ASAN", "").strip()
    if text not in ("", "0", "1"):
        raise BackendError(f"GC_HOST_ASAN={text!r}: set it to 1 (AddressSanitizer builds) or 0; `graphconv check "
                           f"--backend host --bounds` sets it for you")
    return text == "1"


def flags() -> tuple:
    """The g++ flags of a kernel library: FLAGS, plus ASAN_FLAGS under GC_HOST_ASAN=1."""
    return FLAGS + (ASAN_FLAGS if asan_build() else ())


def asan_env() -> dict:
    """The environment of a child process whose host kernels run under AddressSanitizer."""
    gxx, _ = _compiler()
    runtime = subprocess.run([gxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(runtime) or not os.path.exists(runtime):
        raise BackendError("--bounds needs g++'s AddressSanitizer runtime (libasan), which this g++ does not have")
    return {**os.environ, "GC_HOST_ASAN": "1", "LD_PRELOAD": runtime,
            "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86"}


def _asan_loaded() -> bool:
    """Whether this process has the AddressSanitizer runtime (preloaded: it must come first)."""
    try:
        with open("/proc/self/maps") as f:
            return "libasan" in f.read()
    except OSError:
        return False


def asan_report(stderr: str):
    """(what, access, bytes, kernel, shared array or None) of the first AddressSanitizer report in a
    child's stderr, or None. Under GC_HOST_ASAN a kernel's __shared__ arrays are plain statics, which
    ASan guards as globals: an access past one names it."""
    m = _ASAN_ERROR.search(stderr)
    if not m:
        return None
    shared = _ASAN_GLOBAL.search(stderr[m.end():])
    return m.group(1), m.group(2).lower(), int(m.group(3)), m.group(4), shared.group(1) if shared else None


def _parse_type(c_type):
    """'const float* __restrict__' -> ('const float*', np.float32, True): the type to cast to (restrict
    dropped), the value's or pointee's dtype, and whether it is a pointer (None: unknown type)."""
    tokens = c_type.replace("*", " * ").split()
    stars = tokens.count("*")
    base = " ".join(t for t in tokens if t != "*" and t not in _QUALIFIERS)
    cast = " ".join(t for t in tokens if t not in ("__restrict__", "__restrict", "restrict")).replace(" *", "*")
    if stars > 1 or base not in _DTYPES or (base == "void" and not stars):
        return None
    return cast, (None if _DTYPES[base] is None else np.dtype(_DTYPES[base])), bool(stars)


def header_dir() -> pathlib.Path:
    """A cache folder holding gc_host.h and, where g++ can build it, gc_host.h.gch: the header
    precompiled with this process's flags (plain or AddressSanitizer), which g++ reads instead of
    parsing the header and its standard headers again for each kernel (about a quarter of a small
    kernel's build). Kernels include "gc_host.h" with this folder on the include path; without the
    .gch (a g++ that cannot build it) g++ parses the header as before, with the same result."""
    return _header_dir(flags())


@functools.lru_cache(maxsize=None)
def _header_dir(flag_set: tuple) -> pathlib.Path:
    gxx, version = _compiler()
    text = HEADER.read_text()
    folder = cache_dir("host") / f"header-{digest(text, ' '.join(flag_set), gxx, version)}"
    header, pch = folder / "gc_host.h", folder / "gc_host.h.gch"
    if pch.exists():
        return folder
    folder.mkdir(exist_ok=True)
    if not header.exists():
        write_atomic(header, text)
    tmp = temp_path(pch)
    try:
        proc = subprocess.run([gxx, *(f for f in flag_set if f != "-shared"), "-x", "c++-header", str(header),
                               "-o", str(tmp)], capture_output=True, env={**os.environ, "LC_ALL": "C"})
        if proc.returncode == 0:
            os.replace(tmp, pch)
    finally:
        tmp.unlink(missing_ok=True)
    return folder


@functools.lru_cache(maxsize=None)
def _compiler():
    """(path of g++, its version), or BackendError when there is none."""
    gxx = shutil.which("g++")
    if gxx is None:
        raise BackendError("the host backend needs g++ (apt-get install g++), or use backend='numpy'")
    version = subprocess.run([gxx, "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
    return gxx, version


class HostKernel:
    """One generated kernel compiled for the CPU: `HostKernel(source, name, params, barrier)`; `launch(grid, block, args)`.

    params: [(c_type, arg_name)] in the kernel's order. barrier: the kernel calls __syncthreads()
    (its threads then run as fibres; without it, as a plain loop). Attributes: `path` (the .so) and
    `compiled` (False when it came from the cache)."""

    def __init__(self, source: str, name: str, params: list[tuple[str, str]], barrier: bool):
        self._prepare(source, name, params, barrier)
        if self.compiled:
            for _, error in _build([self]):
                raise error
        self._load()

    def _prepare(self, source, name, params, barrier):
        """Check the parameters and write this kernel's unit (its source in a namespace of its own and
        its launcher) and cache key; `compiled`: whether the cache lacks it. Nothing is built here."""
        self.name, self.params, self.barrier, self.source = name, list(params), bool(barrier), source
        self._types = []
        for c_type, arg in self.params:
            parsed = _parse_type(c_type)
            if parsed is None:
                raise CompileError(f"kernel {name}: parameter {arg!r} has type {c_type!r}, which the host runtime cannot pass")
            self._types.append(parsed)
        if not self.barrier and "__syncthreads" in source:
            raise CompileError(f"kernel {name}: the source calls __syncthreads() but was declared barrier=False")
        gxx, version = _compiler()
        loads = "".join(f"    {cast} a{i} = *({cast}*)args[{i}];\n" for i, (cast, _, _) in enumerate(self._types))
        call_args = ", ".join(f"a{i}" for i in range(len(self._types)))
        # The unit: the kernel's source inside namespace gc_<key> (its helper functions then never meet
        # another kernel's in a library built from several units; an #include line stays outside it,
        # blanked in place so that line numbers hold), and the launcher, exported as
        # gc_host_launch_<key>. The key is the digest of the unit with an empty key.
        lines = source.split("\n")
        includes = [line for line in lines if _INCLUDE.match(line)]
        body = "\n".join("" if _INCLUDE.match(line) else line for line in lines)

        def unit(key):
            return ("".join(f"{line}\n" for line in includes) + f"namespace gc_{key} {{\n"
                    f'#line 1 "{name}.cu"\n{body}\n}}\n'
                    f'#line 1 "{name}.launcher.cpp"\n'
                    'extern "C" __attribute__((visibility("default")))\n'
                    f'void gc_host_launch_{key}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,\n'
                    '                      unsigned bz, void** args) {\n'
                    f"{loads}    auto call = [&]() {{ gc_{key}::{name}({call_args}); }};\n"
                    f"    gc_host::launch(dim3(gx, gy, gz), dim3(bx, by, bz), {str(self.barrier).lower()}, call);\n"
                    "}\n")
        self.key = digest(code_of(unit("")), HEADER.read_text(), " ".join(flags()), gxx, version)
        self.unit = unit(self.key)
        self.path = cache_dir("host") / f"{self.key}.so"
        self.compiled = not self.path.exists()

    def _load(self):
        if asan_build() and not _asan_loaded():   # loading it would end the process
            raise BackendError(f"kernel {self.name} was built with AddressSanitizer (GC_HOST_ASAN=1), whose runtime "
                               f"must be loaded first: run through `graphconv check --bounds`, or in a process "
                               f"started with codegen.host.asan_env()")
        self._lib = ctypes.CDLL(str(self.path))  # never unloaded: its OpenMP threads may outlive a launch
        self._launch = getattr(self._lib, f"gc_host_launch_{self.key}")
        self._launch.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_void_p]
        self._launch.restype = None

    def _describe(self, stderr):
        """g++'s first error line (of this kernel built alone) and the source line it points at (kernel
        source numbering)."""
        head = f"host backend: g++ could not compile kernel {self.name}"
        m = _ERROR.search(stderr)
        if not m:
            return f"{head}: " + " | ".join(stderr.strip().splitlines()[:3])
        file, line = os.path.basename(m.group(1)), int(m.group(2))
        lines = {f"{self.name}.cu": self.source.splitlines(),
                 f"{self.name}.launcher.cpp": self.unit.split(f'#line 1 "{self.name}.launcher.cpp"\n', 1)[-1].splitlines()}
        quoted = lines.get(file, [])
        where = f"\n    {line} | {quoted[line - 1].strip()}" if 0 < line <= len(quoted) else ""
        return f"{head}: {file}:{line}:{m.group(3)}: error: {m.group(4)}{where}"

    def launch(self, grid: tuple[int, int, int], block: tuple[int, int, int], args: list) -> None:
        """Run the kernel over `grid` blocks of `block` threads; returns when every block is done."""
        current_schedule()  # a misspelt GC_HOST_SCHEDULE is an error, not silently the default
        grid, block = self._dims(grid, "grid"), self._dims(block, "block")
        if block[0] * block[1] * block[2] > 1024 or block[2] > 64:
            raise CompileError(f"kernel {self.name}: block {block} has more than 1024 threads (or z > 64)")
        if len(args) != len(self._types):
            raise CompileError(f"kernel {self.name}: takes {len(self._types)} arguments, got {len(args)}")
        slots = np.zeros(len(args) + 1, dtype=np.uint64)  # one 8-byte slot per argument's value
        for i, (value, (cast, dtype, pointer), (c_type, arg)) in enumerate(zip(args, self._types, self.params)):
            if pointer:
                slots[i] = self._pointer(value, dtype, c_type, arg, cast.startswith("const"))
            else:
                slots[i:i + 1].view(dtype)[0] = self._scalar(value, dtype, c_type, arg)
        pointers = slots.ctypes.data + 8 * np.arange(len(args), dtype=np.uint64)
        self._launch(*grid, *block, pointers.ctypes.data)

    def _dims(self, dims, what):
        dims = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
        if len(dims) != 3 or min(dims) < 1 or max(dims) > 2**31 - 1:
            raise CompileError(f"kernel {self.name}: bad {what} dimensions {dims}")
        return dims

    def _pointer(self, value, dtype, c_type, arg, const):
        if value is None:
            return 0
        where = f"kernel {self.name}: argument {arg!r} ({c_type})"
        if not isinstance(value, np.ndarray):
            raise CompileError(f"{where} needs a numpy array, got {type(value).__name__}")
        if dtype is not None and value.dtype != dtype:
            raise CompileError(f"{where} needs a {dtype} array, got {value.dtype}")
        if not value.flags.c_contiguous:
            raise CompileError(f"{where} needs a C-contiguous array")
        if not const and not value.flags.writeable:
            raise CompileError(f"{where} is written by the kernel but the array is read-only")
        return value.ctypes.data

    def _scalar(self, value, dtype, c_type, arg):
        where = f"kernel {self.name}: argument {arg!r} ({c_type})"
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value[()]
        if dtype.kind == "f":
            if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
                raise CompileError(f"{where} needs a real number, got {type(value).__name__}")
            return float(value)
        try:
            value = operator.index(value)  # refuses floats: no silent truncation
        except TypeError:
            raise CompileError(f"{where} needs an integer, got {type(value).__name__}") from None
        info = np.iinfo(dtype) if dtype.kind != "b" else None
        if (info and not info.min <= value <= info.max) or (info is None and value not in (0, 1)):
            raise CompileError(f"{where}: {value} does not fit in {c_type}")
        return value


def build_all(kernels: list[tuple[str, str, list, bool]], jobs: int | None = None) -> list[HostKernel]:
    """Compile many kernels, each cached: (source, name, params, barrier) tuples; results keep their
    order, and the first failure in that order is raised. The kernels the cache lacks are built as
    `jobs` libraries (default: a core each, g++ processes in parallel), each holding several
    kernels' units: most of a small kernel's build is the header's runtime, compiled once a library
    then. Each kernel's cache entry is a hard link to its library."""
    if not kernels:
        return []
    _compiler()  # one clear BackendError rather than one per thread
    header_dir()  # the precompiled header once, before the threads need it
    built, refused = [], {}               # refused: index -> CompileError (the first one in order is raised)
    for i, (source, name, params, barrier) in enumerate(kernels):
        kernel = HostKernel.__new__(HostKernel)
        try:
            kernel._prepare(source, name, params, barrier)
        except CompileError as e:        # raised below unless an earlier kernel fails to build
            refused[i] = e
        built.append(kernel)
    first = {}                            # key -> the first index of a kernel built once for several places
    for i, kernel in enumerate(built):
        if i not in refused:
            first.setdefault(kernel.key, i)
    missing = [built[i] for i in first.values() if built[i].compiled]
    jobs = max(1, min(len(missing), jobs or cores()))
    groups = [[] for _ in range(jobs)]
    for kernel in sorted(missing, key=lambda k: -len(k.unit)):  # the longest first, each to the lightest group
        min(groups, key=lambda g: sum(len(k.unit) for k in g)).append(kernel)
    if missing:
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            for group_failed in pool.map(_build, groups):
                refused.update((first[kernel.key], error) for kernel, error in group_failed)
    if refused:
        raise refused[min(refused)]
    for kernel in built:
        kernel._load()
    return built


def _build(group: list[HostKernel]) -> list[tuple[HostKernel, CompileError]]:
    """Build one library of `group`'s units and enter it in the cache under each kernel's key (hard
    links; copies where the file system has none). Returns the kernels g++ refused, each with its
    error: when it refuses a library of several units, each is built alone, so an error names its
    kernel and line."""
    gxx, _ = _compiler()
    text = '#include "gc_host.h"\n' + "".join(k.unit for k in group)
    first = group[0].path
    tmp_cpp, tmp_so = temp_path(first).with_suffix(".batch.cpp"), temp_path(first).with_suffix(".batch.so")
    try:
        tmp_cpp.write_text(text)
        proc = subprocess.run([gxx, *flags(), "-I", str(header_dir()), str(tmp_cpp), "-o", str(tmp_so)],
                              capture_output=True, text=True,
                              env={**os.environ, "LC_ALL": "C"})  # plain ASCII quotes in messages
        if proc.returncode:
            if len(group) > 1:
                return [f for kernel in group for f in _build([kernel])]
            return [(group[0], CompileError(group[0]._describe(proc.stderr)))]
        for kernel in group:  # the unit beside its entry for reading; the .so last makes the entry visible
            write_atomic(kernel.path.with_suffix(".cpp"), '#include "gc_host.h"\n' + kernel.unit)
            link = temp_path(kernel.path)
            try:
                try:
                    os.link(tmp_so, link)
                except OSError:
                    shutil.copyfile(tmp_so, link)
                os.replace(link, kernel.path)
            finally:
                link.unlink(missing_ok=True)
        return []
    finally:
        tmp_cpp.unlink(missing_ok=True)
        tmp_so.unlink(missing_ok=True)
