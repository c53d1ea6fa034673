"""Running a Program: the launch list over a buffer plan, on a runtime that provides only
allocation, copies, module loading and launches. `host` runs the generated CUDA text on the CPU;
`cuda` (next) will be the same loop over CuPy."""
from __future__ import annotations

import numpy as np

from graphconv.errors import InputError
from graphconv.params import check_params
from graphconv.reference import bind_inputs

from .program import Program


class HostRuntime:
    """Buffers are NumPy byte arrays; kernels are g++-built shared libraries (codegen/host.py)."""
    name = "host"

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
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return buf[:n].view(dtype).reshape(shape)

    @staticmethod
    def upload(arr):
        return np.ascontiguousarray(arr)

    @staticmethod
    def download(arr):
        return np.array(arr, copy=True)

    @staticmethod
    def launch(kernel, grid, block, args):
        kernel.launch(grid, block, args)


RUNTIMES = {"host": HostRuntime}


class CompiledProgram:
    """A graph compiled to kernels for a runtime; called like the numpy backend's program:
    `program(x, params=params)` or `program.run(inputs, params)`."""

    def __init__(self, graph, backend="host", poison=False):
        self.backend = backend
        self.program = Program(graph)
        self.graph = self.program.graph
        self.runtime = RUNTIMES[backend]()
        self.kernels = self.runtime.load(self.program.kernels)
        self.poison = poison
        self.input_names = [n.name for n in self.graph.inputs]
        self._plans: dict = {}

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

    def run(self, inputs: dict, params=None, keep=False) -> dict:
        """Run every launch; return the outputs (every graph value when keep=True, the buffers
        then not being reused)."""
        bindings = bind_inputs(self.graph, inputs)
        batch = self.batch_of(bindings)
        key = (batch, keep)
        if key not in self._plans:
            plan = self.program.plan(batch, reuse=not keep)
            self._plans[key] = (plan, [self.runtime.alloc(size, self.poison) for size in plan.sizes])
        plan, buffers = self._plans[key]
        if self.poison:
            for buf in buffers:
                buf.fill(0xFF)
        arrays = {}
        for name, arr in {**inputs, **check_params(self.graph, params)}.items():
            arrays[name] = self.runtime.upload(arr)

        def array(key):
            real = self.program.resolve(key)
            if real in arrays:
                base = arrays[real]
                return base.reshape(self.program.shape_of(key, batch)) if key != real else base
            value = self.program.values[real]
            return self.runtime.view(buffers[plan.slot[real]], value.dtype, self.program.shape_of(key, batch))

        for launch in self.program.launches:
            spec = launch.spec
            args = [np.int32(batch) if a.value is None else array(a.value) for a in spec.args]
            grid, block = spec.launch_shape(batch)
            self.runtime.launch(self.kernels[spec.name], grid, block, args)
        names = [n.name for n in self.graph.topo() if n.name not in self.program.inlined] if keep else self.graph.outputs
        return {name: self._value(name, array) for name in names}

    def _value(self, name, array):
        node = self.graph.node(name)
        if node.is_tuple:
            return tuple(self.runtime.download(array(f"{name}:{i}")) for i in range(len(node.type.parts)))
        return self.runtime.download(array(name))
