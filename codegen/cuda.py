"""The `cuda` runtime: the same Program on an NVIDIA GPU through CuPy. It provides only what a
runtime provides (allocation, copies, module loading, launches) plus CUDA-graph capture of a bound
step; everything above it is shared with the host runtime and tested there.

Cubins come from NVRTC for the device's own architecture (never PTX: see DESIGN.md) and are loaded
once per kernel; scalar arguments are NumPy scalars of their declared C types (CuPy would pass a
Python int as 64 bits). Without CuPy, a driver or a GPU, every entry point raises one BackendError
line that says what to use instead."""
from __future__ import annotations

import numpy as np

from graphconv.errors import BackendError

from .buffers import byte_view

INSTEAD = "use backend='host' (the same kernels on the CPU) or backend='numpy'"
SCALARS = {"int": np.int32, "long long": np.int64, "float": np.float32, "double": np.float64}


def cupy_or_fail():
    """CuPy, once a device answers; else BackendError naming what is missing."""
    try:
        import cupy
    except ImportError:
        raise BackendError(f"backend 'cuda' needs CuPy and an NVIDIA GPU: pip install '.[cuda]' on a GPU machine; "
                           f"here {INSTEAD}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - CUDARuntimeError: no driver, or one too old
        reason = str(e).split(":")[0] if str(e) else type(e).__name__
        raise BackendError(f"backend 'cuda' found no usable NVIDIA GPU ({reason}); {INSTEAD}") from None
    if count == 0:
        raise BackendError(f"backend 'cuda' found no NVIDIA GPU; {INSTEAD}")
    return cupy


def available() -> bool:
    try:
        cupy_or_fail()
    except BackendError:
        return False
    return True


class CudaKernel:
    """A loaded kernel; `registers`: ptxas's count for the cubin loaded (None where NVRTC's log had no
    report). One source can compile to a few registers more or fewer from run to run (see codegen.emit)."""
    def __init__(self, name, module, function, scalar_types, registers=None):
        self.name, self.module, self.function, self.scalar_types = name, module, function, scalar_types
        self.registers = registers


class CudaRuntime:
    """Buffers are CuPy byte arrays; kernels are cubins loaded with cupy.cuda.function.Module."""
    name = "cuda"

    def __init__(self):
        self.cp = cupy_or_fail()
        self.array_types = (np.ndarray, self.cp.ndarray)
        self.arch = "sm_" + self.cp.cuda.Device().compute_capability      # e.g. sm_90 on an H100

    def load(self, specs):
        from . import nvrtc
        compiled = nvrtc.compile_many([(s.source, s.name) for s in specs], arch=self.arch)
        kernels = {}
        for spec, c in zip(specs, compiled):
            module = self.cp.cuda.function.Module()
            module.load(c.cubin)
            scalars = [None if a.is_pointer else SCALARS[a.ctype] for a in spec.args]
            kernels[spec.name] = CudaKernel(spec.name, module, module.get_function(spec.name), scalars,
                                            c.registers or None)
        return kernels

    def alloc(self, nbytes, poison):
        buf = self.cp.empty(max(nbytes, 1), self.cp.uint8)
        buf.fill(0xFF if poison else 0)
        return buf

    @staticmethod
    def view(buf, dtype, shape):
        return byte_view(buf, dtype, shape)

    def upload(self, arr):
        return self.cp.ascontiguousarray(self.cp.asarray(arr))

    def download(self, arr):
        return self.cp.asnumpy(arr)

    def copy_into(self, dst, src):
        if isinstance(src, np.ndarray):
            dst.set(np.ascontiguousarray(src).reshape(dst.shape))  # ascontiguousarray makes 0-d 1-d
        else:
            self.cp.copyto(dst, src)

    def all_finite(self, arrays) -> bool:
        """One device-to-host sync for all of them, and a few launches, not one reduction an array
        (a training step's updates are 25 arrays for LeNet-5, 106 for resnet8): the arrays of one
        dtype concatenated (one kernel) and summed in float64 (NaN or inf anywhere makes the sum
        non-finite; float32 values cannot overflow it); only if a sum is not finite, the exact check."""
        cp = self.cp
        floats = [a for a in arrays if a.dtype.kind == "f"]
        by_dtype = {}
        for a in floats:
            by_dtype.setdefault(a.dtype, []).append(a.ravel())
        try:
            sums = [cp.concatenate(group).sum(dtype=cp.float64) for group in by_dtype.values()]
        except Exception as exc:  # noqa: BLE001 - CuPy's OutOfMemoryError: no room for the concatenation
            if "OutOfMemory" not in type(exc).__name__:
                raise
            sums = [a.sum(dtype=cp.float64) for a in floats]
        if not sums or bool(cp.isfinite(cp.stack(sums)).all()):
            return True
        return all(bool(cp.isfinite(a).all()) for a in floats)

    @staticmethod
    def launch(kernel, grid, block, args, stream=None):
        typed = tuple(a if t is None else t(a) for a, t in zip(args, kernel.scalar_types))
        kernel.function(tuple(grid), tuple(block), typed, stream=stream)

    def capture(self, launches):
        """The launches as one CUDA graph (captured on a non-blocking stream; every buffer they touch
        was allocated before, so replays see the same addresses). Returns a function replaying it,
        asynchronously but ordered with the default stream both ways: the graph waits for the uploads
        issued before it, and whatever is issued after it (downloads, the next uploads) waits for the graph."""
        cp = self.cp
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            for kernel, grid, block, args in launches:
                self.launch(kernel, grid, block, args, stream=stream)
            graph = stream.end_capture()

        def replay():
            stream.wait_event(cp.cuda.Stream.null.record())
            graph.launch(stream)
            cp.cuda.Stream.null.wait_event(stream.record())
        replay.graph, replay.stream = graph, stream
        return replay

    def synchronize(self):
        self.cp.cuda.Stream.null.synchronize()
