"""A program: a graph lowered to its ordered kernel launches, plus a buffer plan by liveness. The
runtimes (`host` now, `cuda` next) execute a Program and provide only allocation, copies, module
loading and launches; everything here is shared."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import sympy as sp

from graphconv.errors import CompileError, GraphError
from graphconv.ops.base import TupleType, as_flag
from graphconv.passes import unbound_dims

from .cprinter import NoCForm
from .lowering import Context, lower_node, no_c_form
from .lowering.pointwise import (MAX_TENSORS, PARAM_BYTES, lower_pointwise_group, multi_tensor, multi_tensor_key,
                                 param_bytes, pointwise_groups)
from .render import render
from .spec import BATCH, Value

_HEADER_FIELDS = re.compile(r"^//   (computes|shapes): .*$", re.M)     # what names the nodes a kernel is for


@dataclass
class Launch:
    node: str
    spec: object          # KernelSpec
    members: tuple = ()   # the nodes whose values it writes, when more than `node` (a pointwise group)

    @property
    def computes(self) -> tuple:
        return self.members or (self.node,)


@dataclass
class Plan:
    """Where each value lives for one batch size: buffer index per value key, buffer sizes, and
    the most bytes live at once."""
    slot: dict
    sizes: list
    peak_bytes: int
    inplace: list = None      # (operand, result) pairs where an elementwise kernel writes in place


def check_precision(graph, tf32, winograd) -> tuple[bool, bool]:
    """(tf32, winograd) as booleans, or GraphError: each must be True or False (a string "False" is
    not read as True), both need a float32 graph, and they exclude each other."""
    tf32, winograd = as_flag(tf32, "tf32"), as_flag(winograd, "winograd")
    for name, on in (("tf32", tf32), ("winograd", winograd)):
        if on and graph.dtype != "float32":
            raise GraphError(f"{name}=True needs a float32 graph; {graph.name} is {graph.dtype} (--dtype float32)")
    if winograd and tf32:
        raise GraphError("winograd=True and tf32=True: choose one (under tf32 the 3 x 3 convolutions run on the "
                         "TF32 tensor cores)")
    return tf32, winograd


VARIANT_MARKS = {"tf32": "_tf32", "winograd": "_wino"}     # what the lowerings add to a variant kernel's name


def variant_layers(kernels) -> dict:
    """For (kernel name, layers) pairs: the layers, in order, of the kernels of each variant."""
    found = {variant: [] for variant in VARIANT_MARKS}
    for name, layers in kernels:
        for variant, mark in VARIANT_MARKS.items():
            if mark in name:
                found[variant] += [layer for layer in layers if layer not in found[variant]]
    return {variant: tuple(layers) for variant, layers in found.items()}


class Program:
    def __init__(self, graph, tf32=False, winograd=False):
        self.graph = graph.verify()
        self.tf32, self.winograd = check_precision(graph, tf32, winograd)
        self.name = graph.name
        batch = graph.batch_symbol()
        self._check_static()
        self.values: dict = {}             # key -> Value (buffers the program owns)
        self.external: dict = {}           # inputs and params: arrays the caller gives
        self.alias: dict = {}              # view key -> the key it shares a buffer with
        self.launches: list = []
        self.inlined: set = set()          # nodes computed inside their readers' kernels, never stored
        groups = pointwise_groups(graph)   # {last member: members}: elementwise nodes one kernel computes
        grouped = {m: last for last, members in groups.items() for m in members}
        contexts = {}
        absorbed: set = set()              # nodes whose values an earlier node's kernels write
        for node in graph.topo():
            if node.name in absorbed:
                continue
            ctx = Context(graph, node, batch, tf32, winograd)
            if node.role != "op":
                self.external[node.name] = ctx.outs[0]
                continue
            if node.name in grouped:
                contexts[node.name] = ctx
                self.values[ctx.out_key()] = ctx.outs[0]
                if node.name != grouped[node.name]:
                    continue                 # its kernel is the group's, launched with the last member
                try:
                    lowered = lower_pointwise_group([contexts[m] for m in groups[node.name]])
                except NoCForm as e:
                    raise no_c_form([contexts[m] for m in groups[node.name]], e) from None
                for spec in lowered.kernels:
                    render(spec)
                    self.launches.append(Launch(node.name, spec, groups[node.name]))
                continue
            lowered = lower_node(ctx)
            if lowered.alias is not None:
                self.alias[node.name] = lowered.alias
                continue
            if not lowered.kernels:          # gathered by its readers' kernels (lowering/prologue.py)
                self.inlined.add(node.name)
                continue
            for i, v in enumerate(ctx.outs):
                self.values[ctx.out_key(i)] = v
            self.values.update(lowered.scratch)
            absorbed.update(lowered.absorbs)
            for spec in lowered.kernels:
                render(spec)
                self.launches.append(Launch(node.name, spec, (node.name,) + lowered.absorbs if lowered.absorbs else ()))
        self.outputs = list(graph.outputs)
        self._merge_multi_tensor()
        self._dedupe_names()

    def _merge_multi_tensor(self):
        """Launches of one elementwise rule over different fixed-size tensors (an optimizer's update of
        each parameter) become one multi-tensor launch, at the place of the last: one joins where none
        of the members reads or writes what another writes (they run at once) and no launch between
        them reads what the earlier members write (they move down to the last one's place), within
        MAX_TENSORS tensors and PARAM_BYTES of kernel parameters. vgg_small's step: 22 Adam launches
        become one."""
        slots, runs = [], {}          # slots: a Launch, or a run (a dict) to merge in its place

        def touches(launch):
            args = [a for a in launch.spec.args if a.value is not None]
            return ({self.resolve(a.value) for a in args if not a.writes},
                    {self.resolve(a.value) for a in args if a.writes})

        for launch in self.launches:
            key = multi_tensor_key(launch.spec)
            reads, writes = touches(launch)
            run = runs.get(key) if key is not None else None
            if run is not None and not (len(run["members"]) >= MAX_TENSORS
                                        or run["bytes"] + param_bytes(launch.spec, shared=False) > PARAM_BYTES
                                        or reads & run["writes"] or writes & (run["reads"] | run["writes"])
                                        or run["writes"] & run["read_since"]):
                run["members"].append(launch)
                run["bytes"] += param_bytes(launch.spec, shared=False)
                slots[:] = [slot for slot in slots if slot is not run] + [run]    # it moves down to here
            else:
                run = None
                if key is not None:
                    runs[key] = run = {"members": [launch], "reads": set(), "writes": set(), "read_since": set(),
                                       "bytes": param_bytes(launch.spec)}
                slots.append(run if run is not None else launch)
            if run is not None:
                run["reads"] |= reads
                run["writes"] |= writes
            for other in runs.values():         # a run whose members' results this reads stays before it
                if other is not run:
                    other["read_since"] |= reads
        self.launches = []
        for slot in slots:
            if isinstance(slot, Launch):
                self.launches.append(slot)
            elif len(slot["members"]) == 1:
                self.launches.append(slot["members"][0])
            else:
                members = slot["members"]
                spec = multi_tensor([launch.spec for launch in members])
                spec.params["segment_of"] = {self.resolve(k): t for k, t in spec.params["segment_of"].items()}
                render(spec)
                self.launches.append(Launch(members[0].node, spec, tuple(m for launch in members for m in launch.computes)))

    def _check_static(self):
        missing = unbound_dims(self.graph)
        if missing:
            names = ", ".join(map(str, missing))
            raise CompileError(f"{self.graph.name}: its input dims {names} are symbolic; code generation bakes every "
                               f"size but the batch into the kernels: give them sizes (--dim {missing[0]}=SIZE, or "
                               f"passes.bind_dims)")

    def _dedupe_names(self):
        """One kernel per distinct code: launches whose kernels differ only in the nodes they are for
        (resnet's repeated blocks) share one kernel, whose header lists every node; two different
        kernels that got one procedural name are told apart by a suffix."""
        groups: dict = {}
        for launch in self.launches:
            spec = launch.spec
            body = _HEADER_FIELDS.sub("", spec.source)
            variants = groups.setdefault(spec.name, [])
            for variant_body, members in variants:
                if variant_body == body:
                    members.append(spec)
                    break
            else:
                variants.append((body, [spec]))
        for base, variants in groups.items():
            for k, (_, members) in enumerate(variants):
                first = members[0]
                if k:
                    first.name = f"{base}_{k + 1}"
                first.nodes = tuple(dict.fromkeys(n for m in members for n in m.nodes))
                first.layers = tuple(dict.fromkeys(n for m in members for n in m.layers))
                if len(members) > 1 or k:
                    render(first)
                for m in members[1:]:
                    m.name, m.nodes, m.layers, m.source = first.name, first.nodes, first.layers, first.source

    # ---- values -------------------------------------------------------------------------------
    def resolve(self, key: str) -> str:
        while key in self.alias:
            key = self.alias[key]
        return key

    def value(self, key) -> Value:
        key = self.resolve(key)
        return self.values.get(key) or self.external[key]

    def shape_of(self, key, batch) -> tuple:
        """The concrete shape of a graph tensor (a view has its own shape over its source's buffer)."""
        node_key = key.split(":")[0]
        if node_key in self.graph:
            node = self.graph.node(node_key)
            t = node.type.parts[int(key.split(":")[1])] if isinstance(node.type, TupleType) else node.type
            b = self.graph.batch_symbol()
            return tuple(int(sp.sympify(d).subs({b: batch}) if b is not None else d) for d in t.shape)
        return tuple(int(sp.sympify(d).subs(BATCH, batch)) for d in self.values[key].shape)

    @property
    def kernels(self) -> list:
        """The distinct kernels, in first-launch order."""
        seen, out = set(), []
        for launch in self.launches:
            if launch.spec.name not in seen:
                seen.add(launch.spec.name)
                out.append(launch.spec)
        return out

    @property
    def variant_layers(self) -> dict:
        """{"tf32": layers, "winograd": layers}: the layers whose kernels tf32=True / winograd=True
        changed (empty when the option is off, or when no layer of the graph qualifies)."""
        return variant_layers((k.name, k.layers) for k in self.kernels)

    # ---- the buffer plan -----------------------------------------------------------------------
    @property
    def zeroed(self) -> list:
        """The keys of the values that must be 0 before the first launch (Value.zeroed)."""
        return [k for k, v in self.values.items() if v.zeroed]

    def zero_counters(self, plan, buffers):
        """Zero the buffers of the zeroed values (after allocation, or a poison fill)."""
        for key in self.zeroed:
            if key in plan.slot:
                buffers[plan.slot[key]].fill(0)

    def check_counters(self, counters: dict, download):
        """After the launches (`counters`: key -> its buffer): every counter back at 0, or BackendError.
        A kernel that left one set would finish its next launch early, on stale partial sums, and on
        every launch after (it zeroes the counter while later blocks still add to it): loud, not wrong."""
        from graphconv.errors import BackendError
        left = {key: int(download(buf).view(np.uint32).max()) for key, buf in counters.items()}
        left = {key: n for key, n in left.items() if n}
        if left:
            raise BackendError(f"{self.name}: arrival counters left non-zero after the launches "
                               f"({', '.join(f'{k} = {n}' for k, n in left.items())}): their reductions finish on stale "
                               f"partial sums from here on (a graphconv bug; please report it)")

    def plan(self, batch: int, reuse: bool = True, exclusive=()) -> Plan:
        """Assign every owned value a buffer, reusing the buffer of a value that is dead (its last
        reader has run) when it is large enough: best fit, in launch order. Outputs are never reused.
        The `exclusive` values (a bound step's state updates, which alternate with the states' own
        buffers) get buffers no other value ever uses."""
        exclusive = set(exclusive)
        first, last = {}, {}
        for step, launch in enumerate(self.launches):
            for arg in launch.spec.args:
                if arg.value is None:
                    continue
                key = self.resolve(arg.value)
                if key in self.values:
                    first.setdefault(key, step)
                    last[key] = step
        keep = {self.resolve(o) for o in self.outputs} | set(self.zeroed) | exclusive
        order = {k: i for i, k in enumerate(self.values)}
        free, sizes, slot, inplace = [], [], {}, []
        live = peak = 0
        for step, launch in enumerate(self.launches):
            # an elementwise kernel may write a result into the buffer of an operand of the same
            # type that it reads for the last time: each thread loads element i before storing it
            dying = [k for k, s in last.items() if s == step and k not in keep and k in slot and first[k] < step]
            in_place = [k for k in dying if k not in exclusive] if reuse and launch.spec.template == "pointwise.cu.j2" else []
            # a multi-tensor launch: only within one tensor's segment (another segment's blocks run at once)
            segment = launch.spec.params.get("segment_of")      # value -> its tensor; None: read by several
            for key in sorted((k for k, s in first.items() if s == step), key=order.get):
                need = self.values[key].nbytes(batch)
                own = key in self.zeroed or key in exclusive
                same = [k for k in in_place if self.values[k] == self.values[key] and not own
                        and (segment is None or segment.get(k) is not None and segment.get(k) == segment.get(key))]
                fits = [b for b in free if sizes[b] >= need] if reuse and not own else []
                if same:
                    b = slot[same[0]]
                    in_place.remove(same[0])
                    dying.remove(same[0])
                    inplace.append((same[0], key))
                    live -= sizes[b]
                elif fits:
                    b = min(fits, key=lambda b: (sizes[b], b))
                    free.remove(b)
                else:
                    b = len(sizes)
                    sizes.append(need)
                slot[key] = b
                live += sizes[b]
            peak = max(peak, live)
            for key in dying + [k for k, s in last.items() if s == step and k not in keep and k in slot
                                and first[k] == step]:
                if slot[key] not in free and all(slot[key] != slot[k] for k in slot if last.get(k, -1) > step
                                                 or k in keep):
                    free.append(slot[key])
                    live -= sizes[slot[key]]
        return Plan(slot, sizes, peak, inplace)
