"""Every kernel of a program against the NumPy reference of the node it computes: the operands are
the reference's own values (so argmax codes, statistics and targets are real ones), the outputs
and scratch are poisoned with NaN bytes first, so an element a kernel forgets to write fails."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphconv.reference import NumpyProgram

from . import host
from .runner import CompiledProgram


@dataclass
class KernelCheck:
    node: str
    op: str
    kernels: tuple
    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""
    layers: tuple = ()      # the user's layers its kernels are for


# TF32 kernels (opt-in): inputs rounded to 10 mantissa bits (2^-11 relative), FP32 accumulation
TF32_TOLERANCE = 5e-3
TF32_CODE_TIES = 100       # argmax codes may differ at 1 window in this many (near-ties within TF32 rounding)


def tolerance(dtype, tf32=False) -> float:
    if tf32 and dtype == "float32":
        return TF32_TOLERANCE
    return 1e-4 if dtype == "float32" else 1e-10


def compare(got, want, dtype, codes_of_checked_values=False, tf32=False):
    """(max abs error, max error relative to the tensor's largest magnitude, ok, note). Argmax codes
    beside pooled values that are checked too may differ at a few windows whose two largest values
    tie within rounding (the pooled value is the same either way)."""
    if got.shape != want.shape:
        return np.inf, np.inf, False, f"shape {got.shape} != {want.shape}"
    if got.dtype == np.uint8:          # argmax codes: exact, except at ties of the pooled value
        bad = got != want
        count = int(bad.sum())
        if count == 0:
            return 0.0, 0.0, True, ""
        tie = codes_of_checked_values and count <= max(1, want.size // (TF32_CODE_TIES if tf32 else 1000))
        return float(count), 0.0, tie, f"{count} codes differ{' (ties of equal maxima)' if tie else ''}"
    unwritten = np.isnan(got) & ~np.isnan(want)
    if unwritten.any():
        return np.inf, np.inf, False, f"{int(unwritten.sum())} elements never written (still NaN poison)"
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    diff = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
    rel = diff / max(scale, 1e-30)
    return diff, rel, diff <= tolerance(dtype, tf32) * max(scale, 1.0), ""


def check_kernels(graph, inputs, params, backend="host", tf32=False, outputs=None, winograd=False,
                  only=None) -> list:
    """One KernelCheck per node that has kernels (a node computed on TF32 tensor cores is held to
    TF32_TOLERANCE). `outputs`: a dict that receives every checked output as computed. `only`: kernel
    names; the nodes none of whose kernels is among them are not run (their inputs come from NumPy
    either way)."""
    compiled = CompiledProgram(graph, backend, poison=True, tf32=tf32, winograd=winograd)
    return _check(graph, compiled, NumpyProgram(graph).run(inputs, params, keep=True), inputs, outputs, only)


def _check(graph, compiled, ref, inputs, outputs, only) -> list:
    """check_kernels with the program compiled (poisoned outputs) and the reference run given."""
    program, runtime = compiled.program, compiled.runtime
    batch = compiled.batch_of({graph.batch_symbol(): inputs[graph.inputs[0].name].shape[0]}
                              if graph.batch_symbol() is not None else {})
    by_node: dict = {}
    for launch in program.launches:
        by_node.setdefault(launch.computes, []).append(launch.spec)
    results = []
    for members, specs in by_node.items():
        if only is not None and not any(spec.name in only for spec in specs):
            continue
        owned = {}

        def array(key):
            if key in ref and key.split(":")[0] not in members:
                return runtime.upload(np.ascontiguousarray(ref[key]))
            if key not in owned:
                value = program.values[key]
                owned[key] = runtime.view(runtime.alloc(value.nbytes(batch), not value.zeroed), value.dtype,
                                          program.shape_of(key, batch))
            return owned[key]

        on_tf32 = any(spec.params.get("tf32") for spec in specs)
        for spec in specs:
            args = [np.int32(batch) if a.value is None else array(a.value) for a in spec.args]
            grid, block = spec.launch_shape(batch)
            runtime.launch(compiled.kernels[spec.name], grid, block, args)
        runtime.synchronize()
        program.check_counters({k: v for k, v in owned.items() if program.values[k].zeroed}, runtime.download)
        worst_abs = worst_rel = 0.0
        ok, notes = True, []
        for node_name in members:
            node = graph.node(node_name)
            wants = ref[node_name] if node.is_tuple else (ref[node_name],)
            keys = [f"{node_name}:{i}" for i in range(len(wants))] if node.is_tuple else [node_name]
            for i, (key, want) in enumerate(zip(keys, wants)):
                got = runtime.download(array(key))
                if outputs is not None:
                    outputs[key] = got
                a, r, good, note = compare(got, np.asarray(want), node.dtype if not node.is_tuple else
                                           node.type.parts[0].dtype, codes_of_checked_values=i > 0, tf32=on_tf32)
                if got.dtype != np.uint8:
                    worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
                ok &= good
                if note:
                    notes.append(f"{node_name}: {note}" if len(members) > 1 else note)
        last = graph.node(members[-1])
        op = last.op if len(members) == 1 else "pointwise group" if all(s.template == "pointwise.cu.j2" for s in specs) \
            else " + ".join(dict.fromkeys(graph.node(m).op for m in members))
        results.append(KernelCheck(", ".join(members), op,
                                   tuple(s.name for s in specs), worst_abs, worst_rel, ok, "; ".join(notes),
                                   tuple(dict.fromkeys(layer for s in specs for layer in s.layers))))
    return results


def check_races(graph, inputs, params, tf32=False, winograd=False, only=None) -> list:
    """check_kernels on the host backend under each of its schedules (host.SCHEDULES: a block's threads
    in both orders, cp.async copies landing late and early), one KernelCheck per node: the worst of the
    four, and not ok where a schedule fails or computes other bits than the forward one (every kernel
    computes each output the same way whatever the order of its threads, so a difference is a race)."""
    runs, bits = {}, {}
    compiled = CompiledProgram(graph, "host", poison=True, tf32=tf32, winograd=winograd)
    ref = NumpyProgram(graph).run(inputs, params, keep=True)
    for name in host.SCHEDULES:
        bits[name] = {}
        with host.schedule(name):
            runs[name] = _check(graph, compiled, ref, inputs, bits[name], only)
    merged = []
    for per_schedule in zip(*runs.values()):
        first = per_schedule[0]
        keys = [k for k in bits["forward"] if k.split(":")[0] in first.node.split(", ")]
        failed = [name for name, r in zip(runs, per_schedule) if not r.ok]
        differs = [name for name in host.SCHEDULES[1:] if "forward" not in failed and name not in failed and any(
            bits[name][k].tobytes() != bits["forward"][k].tobytes() for k in keys)]
        notes = [f"wrong under {', '.join(failed)}"] if failed and len(failed) < len(runs) else \
            ["wrong under every schedule"] if failed else []
        notes += [f"other bits under {', '.join(differs)} than forward"] if differs else []
        if notes and notes[0] != "wrong under every schedule":
            notes[-1] += ": a race between threads"
        worst = next((r for r in per_schedule if not r.ok), first)
        merged.append(KernelCheck(first.node, first.op, first.kernels, max(r.max_abs for r in per_schedule),
                                  max(r.max_rel for r in per_schedule), not failed and not differs,
                                  "; ".join(notes + ([worst.note] if worst.note else [])), first.layers))
    return merged


def node_text(nodes: str) -> str:
    """The nodes of a check row: all of them, or for a multi-tensor kernel (an optimizer's update of
    every parameter) the first and the last with the count; a mismatch's note names its own node."""
    names = nodes.split(", ")
    return nodes if len(names) <= 3 else f"{names[0]}, ... {names[-1]} ({len(names)} nodes)"


def format_checks(results) -> str:
    width = max([len(r.kernels[0]) for r in results] + [6])
    lines = [f"  {'kernel'.ljust(width)}  {'node':<24} {'max abs err':>11} {'max rel err':>11}  status"]
    for r in results:
        for j, k in enumerate(r.kernels):
            tail = (f"{r.max_abs:11.2e} {r.max_rel:11.2e}  {'ok' if r.ok else 'MISMATCH'}"
                    f"{'  ' + r.note if r.note else ''}") if j == len(r.kernels) - 1 else ""
            lines.append(f"  {k.ljust(width)}  {(node_text(r.node) if j == 0 else ''):<24} {tail}")
    return "\n".join(lines)
