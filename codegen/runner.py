"""Running a Program: the launch list over a buffer plan, on a runtime that provides only
allocation, copies, module loading and launches. `host` runs the generated CUDA text on the CPU;
`cuda` (next) will be the same loop over CuPy."""
from __future__ import annotations

import numpy as np

from graphconv.checkpoint import all_finite
from graphconv.errors import GraphError, InputError, ResourceError
from graphconv.memory import check_fits, fmt_bytes, smaller
from graphconv.params import check_params
from graphconv.reference import NumpyProgram, bind_inputs, check_input_values, input_value_checks

from .buffers import byte_view
from .program import Program, check_precision


def cached(array):
    """`array` answering each key with the same array object every time (a resident state is
    recognised by identity)."""
    views = {}

    def lookup(key):
        if key not in views:
            views[key] = array(key)
        return views[key]
    return lookup


class HostRuntime:
    """Buffers are NumPy byte arrays; kernels are g++-built shared libraries (codegen/host.py)."""
    name = "host"
    array_types = (np.ndarray,)

    def load(self, specs):
        from .host import build_all
        built = build_all([(s.source, s.name, [(a.ctype, a.name) for a in s.args], s.barrier) for s in specs])
        return {s.name: k for s, k in zip(specs, built)}

    def alloc(self, nbytes, poison):
        buf = np.empty(max(nbytes, 1), np.uint8)
        buf.fill(0xFF if poison else 0)     # 0xFF bytes: NaN in every float, 255 in a uint8 code
        return buf

    @staticmethod
    def view(buf, dtype, shape):
        return byte_view(buf, dtype, shape)

    @staticmethod
    def upload(arr):
        return np.ascontiguousarray(arr)

    @staticmethod
    def download(arr):
        return np.array(arr, copy=True)

    @staticmethod
    def copy_into(dst, src):
        np.copyto(dst, src)

    @staticmethod
    def launch(kernel, grid, block, args):
        kernel.launch(grid, block, args)

    @staticmethod
    def all_finite(arrays) -> bool:
        return all(all_finite(a) for a in arrays)

    def capture(self, launches):
        """No graphs on the CPU: a replay is the launches in order (the bookkeeping is the same)."""
        def replay():
            for kernel, grid, block, args in launches:
                self.launch(kernel, grid, block, args)
        return replay

    def synchronize(self):
        pass


def cuda_runtime():
    from .cuda import CudaRuntime
    return CudaRuntime()


RUNTIMES = {"host": HostRuntime, "cuda": cuda_runtime}


class CompiledProgram:
    """A graph compiled to kernels for a runtime; called like the numpy backend's program:
    `program(x, params=params)` or `program.run(inputs, params)`. Results come back as NumPy arrays
    for NumPy inputs and as the runtime's own arrays (CuPy on cuda) where an input was one;
    `to_numpy=True | False` decides explicitly."""

    def __init__(self, graph, backend="host", poison=False, tf32=False, winograd=False):
        tf32, winograd = check_precision(graph, tf32, winograd)
        self.backend = backend
        self.runtime = RUNTIMES[backend]()            # first: a backend that cannot run here says so at once
        arch = getattr(self.runtime, "arch", None)     # the device's sm_XY (cuda)
        if tf32 and arch and int(arch.split("_")[1]) < 80:
            raise GraphError(f"tf32=True needs TF32 tensor cores (compute capability 8.0 or newer); this GPU is {arch}")
        self.program = Program(graph, tf32=tf32, winograd=winograd)
        self.graph = self.program.graph
        self.kernels = self.runtime.load(self.program.kernels)
        self.poison = poison
        self.input_names = [n.name for n in self.graph.inputs]
        self._plans: dict = {}
        self._reference = NumpyProgram(self.graph)      # its shape checks
        self.value_checks = input_value_checks(self.graph)   # and its checks of input values

    def __call__(self, *args, params=None, **inputs):
        if len(args) > len(self.input_names):
            raise InputError(f"{self.graph.name} takes {len(self.input_names)} inputs "
                             f"({', '.join(self.input_names)}), got {len(args)} positional arrays")
        for name, arr in zip(self.input_names, args):
            if name in inputs:
                raise InputError(f"{name}: given both positionally and by name")
            inputs[name] = arr
        values = self.run(inputs, params)
        outs = [values[o] for o in self.graph.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def batch_of(self, bindings) -> int:
        symbol = self.graph.batch_symbol()
        return int(bindings.get(symbol, 1)) if symbol is not None else 1

    def _buffers(self, batch, keep):
        key = (batch, keep)
        if key not in self._plans:
            plan = self.program.plan(batch, reuse=not keep)
            buffers = self.alloc_all(plan.sizes, batch)
            self.program.zero_counters(plan, buffers)
            self._plans[key] = (plan, buffers)
        return self._plans[key]

    def alloc_all(self, sizes, batch):
        """The buffers of a plan, or ResourceError naming the batch where the memory is not there."""
        if self.backend == "host":
            check_fits(sum(sizes), f"{self.graph.name} at batch {batch} (the host backend's buffers)",
                       smaller(sum(sizes), batch))
        try:
            return [self.runtime.alloc(size, self.poison) for size in sizes]
        except MemoryError:
            raise ResourceError(f"{self.graph.name} at batch {batch}: out of memory allocating "
                                f"{fmt_bytes(sum(sizes))} of buffers on the {self.backend} backend; use a smaller batch") from None
        except Exception as exc:      # CuPy's OutOfMemoryError
            if "OutOfMemory" not in type(exc).__name__:
                raise
            raise ResourceError(f"{self.graph.name} at batch {batch}: out of GPU memory allocating "
                                f"{fmt_bytes(sum(sizes))} of buffers; use a smaller batch") from None

    def _array_of(self, arrays, buffers, plan, batch, swap=None):
        """key -> its array: a given array (input, parameter) or a view of the plan's buffer; `swap`
        exchanges pairs of keys (a bound step's phase 1: each state in its next value's buffer)."""
        def array(key, swapped=True):
            real = self.program.resolve(key)
            if swapped and swap and real in swap:
                return array(swap[real], False).reshape(self.program.shape_of(key, batch))
            if real in arrays:
                base = arrays[real]
                return base.reshape(self.program.shape_of(key, batch)) if key != real else base
            value = self.program.values[real]
            return self.runtime.view(buffers[plan.slot[real]], value.dtype, self.program.shape_of(key, batch))
        return array

    def _launches(self, array, batch):
        out = []
        for launch in self.program.launches:
            spec = launch.spec
            args = [np.int32(batch) if a.value is None else array(a.value) for a in spec.args]
            grid, block = spec.launch_shape(batch)
            out.append((self.kernels[spec.name], grid, block, args))
        return out

    def run(self, inputs: dict, params=None, keep=False, to_numpy=None) -> dict:
        """Run every launch; return the outputs (every graph value when keep=True, the buffers
        then not being reused): NumPy arrays, or the runtime's own (CuPy on cuda) where an input
        was one (`to_numpy` decides explicitly)."""
        to_numpy = self.wants_numpy(inputs, to_numpy)
        types = self.runtime.array_types
        bindings = bind_inputs(self.graph, inputs, types)
        self._reference.bound_shapes(bindings)      # a zero or inconsistent size: refused as on numpy
        check_input_values(self.graph, inputs, self.value_checks)      # e.g. a class index past the scores
        batch = self.batch_of(bindings)
        self.check_batch(batch)
        plan, buffers = self._buffers(batch, keep)
        if self.poison:
            for buf in buffers:
                buf.fill(0xFF)
            self.program.zero_counters(plan, buffers)
        arrays = {name: self.runtime.upload(arr)
                  for name, arr in {**inputs, **check_params(self.graph, params, types)}.items()}
        array = self._array_of(arrays, buffers, plan, batch)
        for kernel, grid, block, args in self._launches(array, batch):
            self.runtime.launch(kernel, grid, block, args)
        self.runtime.synchronize()
        if self.poison:          # checking: a reduction that left its arrival counter set fails here
            self.program.check_counters({k: buffers[plan.slot[k]] for k in self.program.zeroed if k in plan.slot},
                                        self.runtime.download)
        names = [n.name for n in self.graph.topo() if n.name not in self.program.inlined] if keep else self.graph.outputs
        return {name: self._value(name, array, to_numpy) for name in names}

    def wants_numpy(self, inputs: dict, to_numpy=None) -> bool:
        """`to_numpy` if given; else NumPy unless some input is a device array of the runtime."""
        if to_numpy is not None:
            return bool(to_numpy)
        device = tuple(t for t in self.runtime.array_types if t is not np.ndarray)
        return not any(isinstance(a, device) for a in inputs.values()) if device else True

    def _value(self, name, array, to_numpy=True):
        get = self.runtime.download if to_numpy else (lambda a: a.copy())
        node = self.graph.node(name)
        if node.is_tuple:
            return tuple(get(array(f"{name}:{i}")) for i in range(len(node.type.parts)))
        return get(array(name))

    def check_batch(self, batch):
        """What the NumPy references refuse for a size and a kernel would silently compute: batch
        statistics over one value per channel."""
        for node in self.graph.topo():
            if node.op == "batch_norm" and node.attrs["training"]:
                shape = self.program.shape_of(node.name, batch)
                if int(np.prod(shape, dtype=np.int64)) == shape[1]:
                    raise InputError(f"{node.name} [batch_norm]: batch statistics need more than one value per "
                                     f"channel, got {list(shape)} (as in PyTorch; use eval mode or a larger batch)")

    def bind(self, batch: int, updates=None) -> "BoundStep":
        """Every launch for one batch size with every argument bound, over static buffers: what a
        CUDA graph captures (a training step is then one graph launch per step). `updates` (state
        name -> the output that is its next value, a training step's meta["updates"]) makes the
        step alternate buffers: see BoundStep."""
        if isinstance(batch, (bool, np.bool_)) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise InputError(f"{self.graph.name}: bind(batch) takes a positive integer, got {batch!r}")
        symbol = self.graph.batch_symbol()
        if symbol is not None:
            self._reference.bound_shapes({symbol: int(batch)})
        return BoundStep(self, int(batch), updates)


class BoundStep:
    """A program bound to one batch size: the inputs and parameters live in static buffers that
    `__call__` refills, every kernel argument is fixed, and the launches are captured once (a CUDA
    graph on the cuda runtime; a plain replay on the host) and replayed on every call. The buffers
    never move, as a captured graph requires. Outputs are views of static buffers, valid until the
    next call; `run` copies them out.

    With `updates` (state -> next value) the step has two phases with two captures: phase 0 reads
    each state from its static buffer and writes its next value into a buffer of its own (the plan
    gives it to no other value); phase 1 reads the state from that buffer and writes the next value
    into the static one. `commit` flips the phase: no copy at all, and a step that is not committed
    (its update was refused) left the state's buffers as they were."""

    def __init__(self, compiled, batch, updates=None):
        compiled.check_batch(batch)
        self.compiled, self.batch = compiled, batch
        program, runtime = compiled.program, compiled.runtime
        self.static_names = static_names = [node.name for node in compiled.graph.topo() if node.role != "op"]
        self.swap = {}                  # state <-> next value, for the pairs that alternate
        for state, node in (updates or {}).items():
            if (state in static_names and program.resolve(node) == node and node in program.values
                    and node not in self.swap and state not in self.swap):
                self.swap.update({state: node, node: state})
        plan = program.plan(batch, exclusive=[k for k in self.swap if k not in static_names])
        buffers = compiled.alloc_all(plan.sizes, batch)
        program.zero_counters(plan, buffers)
        static = {}
        for name in static_names:
            shape, dtype = program.shape_of(name, batch), compiled.graph.node(name).dtype
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            static[name] = runtime.view(runtime.alloc(nbytes, False), dtype, shape)
        first = compiled._array_of(static, buffers, plan, batch)
        self.arrays = [cached(first), cached(compiled._array_of(static, buffers, plan, batch, self.swap))]
        self.phase_launches = [compiled._launches(self.arrays[0], batch), None]     # phase 1's when first run
        self.replays = [None, None]
        self.phase = 0
        self.buffers = buffers           # kept alive as long as the captured launches refer to them

    @property
    def static(self) -> dict:
        """The buffers this phase reads the inputs, parameters and states from."""
        return {name: self.arrays[self.phase](name) for name in self.static_names}

    def array(self, key):
        return self.arrays[self.phase](key)

    @property
    def launches(self):
        return self.phase_launches[self.phase]

    @property
    def replay(self):
        return self.replays[self.phase]

    def __call__(self, inputs: dict, params=None) -> dict:
        compiled, phase = self.compiled, self.phase
        types = compiled.runtime.array_types
        bindings = bind_inputs(compiled.graph, inputs, types)
        if compiled.batch_of(bindings) != self.batch:
            raise InputError(f"{compiled.graph.name}: this step is bound to batch {self.batch}, got "
                             f"{compiled.batch_of(bindings)} (bind another with .bind(batch))")
        check_input_values(compiled.graph, inputs, compiled.value_checks)
        array = self.arrays[phase]
        for name, arr in {**inputs, **check_params(compiled.graph, params, types)}.items():
            if arr is not array(name):       # a resident state (see commit) is there already
                compiled.runtime.copy_into(array(name), arr)
        if self.phase_launches[phase] is None:
            self.phase_launches[phase] = compiled._launches(array, self.batch)
        if self.replays[phase] is None:
            self.replays[phase] = compiled.runtime.capture(self.phase_launches[phase])
        self.replays[phase]()
        return {name: array(name) for name in compiled.graph.outputs}

    def commit(self, updates: dict) -> dict:
        """After a call: make each state's new value (`updates`: state name -> output name) the state;
        returns the state's buffers. A caller that keeps them as its state passes them back next call,
        and nothing is copied in for them: training state stays resident (on the GPU on cuda) instead
        of crossing to the host twice a step. The pairs bound with the step alternate (the phase
        flips: nothing is copied); any other is copied, device to device, into the state's buffer."""
        runtime, array = self.compiled.runtime, self.arrays[self.phase]
        for state, node in updates.items():
            if self.swap.get(state) != node:
                runtime.copy_into(array(state), array(node))
        if self.swap:
            self.phase = 1 - self.phase
        return {state: self.arrays[self.phase](state) for state in updates}

    def run(self, inputs: dict, params=None, to_numpy=None) -> dict:
        views = self(inputs, params)
        get = self.compiled.runtime.download if self.compiled.wants_numpy(inputs, to_numpy) else (lambda a: a.copy())
        return {name: get(v) for name, v in views.items()}
