"""What a lowering produces: a KernelSpec per kernel (template, C-ready parameters, launch shape,
typed argument list) and, per graph node, the kernels computing it plus the scratch buffers they share.

Sizes are sympy expressions in the batch symbol `batch`: everything else is baked into the kernel as
a constant, so one compiled program serves any batch size.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sympy as sp

BATCH = sp.Symbol("batch", integer=True, positive=True)   # the kernels' one runtime size


@dataclass(frozen=True)
class Arg:
    """One kernel argument: its C type and name, and what the program binds to it: a value key
    (a graph tensor, `node:i` for part i of a node with several outputs, or `node.scratch`), or
    the batch size."""
    ctype: str
    name: str
    value: str | None = None      # None: the batch size

    @property
    def is_pointer(self) -> bool:
        return self.ctype.endswith("*")

    @property
    def writes(self) -> bool:
        return self.is_pointer and not self.ctype.startswith("const")

    def decl(self, restrict=True) -> str:
        return f"{self.ctype} __restrict__ {self.name}" if self.is_pointer and restrict else f"{self.ctype} {self.name}"


@dataclass
class KernelSpec:
    name: str                      # procedural: what it computes and its static shapes
    template: str                  # codegen/templates/<template>
    params: dict                   # C-ready values the template prints
    args: list                     # [Arg], the typed argument list every runtime passes
    grid: tuple                    # 3 sympy expressions in BATCH
    block: tuple                   # 3 ints
    nodes: tuple = ()              # graph nodes it computes
    replaces: tuple = ()           # for a fused node: the nodes of the user's graph it stands for
    layers: tuple = ()             # the user layers they belong to
    shapes: str = ""               # operand and result types, for the header
    barrier: bool = False          # uses __syncthreads (the host runtime needs fibers then)
    restrict: bool = True          # pointers __restrict__; not where the buffer plan may write in place
    source: str = ""               # filled by render()

    def launch_shape(self, batch: int) -> tuple:
        """(grid, block) for a batch size; a grid past CUDA's limits (x < 2^31, y and z <= 65535) is
        refused here, on every backend, rather than by the GPU."""
        grid = tuple(max(1, int(sp.sympify(g).subs(BATCH, batch))) for g in self.grid)
        if grid[0] >= 2**31 or grid[1] > 65535 or grid[2] > 65535:
            from graphconv.errors import InputError
            raise InputError(f"{', '.join(self.nodes)}: batch {batch} needs a grid of {grid} blocks for kernel "
                             f"{self.name}, past CUDA's limits (x < 2^31, y and z <= 65535); use a smaller batch")
        return grid, tuple(self.block)

    def grid_text(self) -> str:
        return "(" + ", ".join(str(g).replace("batch", "N") for g in self.grid) + ")"


@dataclass
class Value:
    """A buffer-backed tensor of the program: shape (sympy, in BATCH) and dtype. `zeroed`: counters
    that must be 0 before a kernel's first launch and that the kernel leaves 0 again (a reduction's
    arrival counters): a buffer of its own, never shared, zeroed when allocated (after any poison)."""
    shape: tuple
    dtype: str
    zeroed: bool = False

    def nbytes(self, batch: int) -> int:
        n = sp.Integer(1)
        for d in self.shape:
            n *= d
        return int(sp.sympify(n).subs(BATCH, batch)) * np.dtype(self.dtype).itemsize


@dataclass
class Lowered:
    """A node after lowering: the kernels computing it in order, the scratch values they share, or
    (for a view: flatten, reshape, part) the value it aliases."""
    kernels: list = field(default_factory=list)
    scratch: dict = field(default_factory=dict)      # value key -> Value
    alias: str | None = None
    absorbs: tuple = ()     # later nodes whose values these kernels also write (the Program skips them)
