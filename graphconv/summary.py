"""The layer table: one row per user layer (output size, weight size, parameters, multiply-adds,
receptive field, activation bytes), totals at the bottom, as in the lecture's LeNet-5 table.

Without a batch size, counts are per example (N = 1) and sizes are shown without the batch dim.
"""
from __future__ import annotations

import dataclasses
import json

import sympy as sp

from .autodiff import saved_bytes
from .ops import OPS
from .ops.base import ITEMSIZE, nbytes
from .shapes import fmt_dim, numel


def _value(expr, bindings):
    v = sp.simplify(sp.sympify(expr).subs(bindings))
    return int(v) if v.is_Integer else fmt_dim(v)


def receptive_fields(graph) -> dict:
    """name -> (rf per axis, jump per axis, input extent) in input pixels, or None where there is no
    spatial input; rf and jump are None where undefined.

    rf_out = rf_in + (D(K-1)+1 - 1) * jump_in, jump_out = jump_in * S. A layer that mixes every
    position (flatten, linear) sees the whole input; past one that resamples the grid (upsample, a
    transposed conv) an output no longer maps to one window of input pixels: undefined, until a layer
    that mixes every position (or a global pool) sees the whole input again; so too past an adaptive
    pool of uneven windows (a global one sees the whole input)."""
    out = {}
    for node in graph.topo():
        if node.role in ("param", "buffer"):
            continue
        if node.op == "input":
            spatial = node.shape[2:]
            out[node.name] = ((1,) * len(spatial), (1,) * len(spatial), tuple(spatial)) if len(node.shape) >= 3 \
                else None
            continue
        states = [out.get(o) for o in graph.operands(node.name)]
        states = [s for s in states if s is not None]
        if not states or OPS[node.op].kind == "reduction":
            out[node.name] = None
            continue
        extent = tuple(_most(v) for v in zip(*[s[2] for s in states]))
        op = OPS[node.op]
        whole = (tuple(_most(pair) for pair in zip(tuple(_most(v) for v in zip(*[s[0] for s in states])), extent))
                 if all(s[0] is not None for s in states) else extent)       # all of the input, or more
        global_ = node.op.startswith("adaptive_") and all(o == 1 for o in node.attrs["output_size"])
        if op.mixes_all or global_:
            out[node.name] = (whole, states[0][1] if states[0][1] is not None else extent, extent)
            continue
        if op.resamples or any(s[0] is None for s in states) or node.op.startswith("adaptive_"):
            out[node.name] = (None, None, extent)    # no one window of input pixels per output
            continue
        rf, jump = (tuple(_most(v) for v in zip(*[s[i] for s in states])) for i in range(2))
        windows = op.windows([graph.node(o).type for o in graph.operands(node.name)], node.attrs)
        for kernel, stride, dilation in windows:       # a fused node: its conv's window, then its pool's
            rf = tuple(r + d * (k - 1) * j for r, k, d, j in zip(rf, kernel, dilation, jump))
            jump = tuple(j * s for j, s in zip(jump, stride))
        out[node.name] = (rf, jump, extent)
    return out


def _most(values):
    """The largest of sizes, symbolic ones too (a symbolic input's extent H: Max(16, H))."""
    return max(values) if all(isinstance(v, int) or v.is_Integer for v in values) else sp.Max(*values)


def weight_computations(graph) -> set:
    """Nodes computed from parameters alone (a folded batch norm's weights): not layers of the table."""
    out = set()
    for node in graph.topo():
        if node.role == "op" and all(graph.node(o).role in ("param", "buffer") or o in out
                                     for o in graph.operands(node.name)):
            out.add(node.name)
    return out


def trainable_sources(graph, name, weights_only) -> set:
    """The trainable parameters a weight computation (fold_batch_norm, compose_conv_weights, their
    parts) is made of."""
    out, stack, seen = set(), [name], {name}
    while stack:
        for o in graph.operands(stack.pop()):
            node = graph.node(o)
            if node.op == "param" and node.attrs.get("trainable"):
                out.add(o)
            elif o in weights_only and o not in seen:
                seen.add(o)
                stack.append(o)
    return out


def fixed_batch(graph):
    """The first dim of a graph without a batch symbol whose input has rows ([4, 1, 8, 8]: a fixed
    batch of 4, which the counts are for); None for a plain vector input."""
    first = graph.inputs[0].shape[0] if graph.inputs and len(graph.inputs[0].shape) >= 2 else None
    return int(first) if first is not None and getattr(first, "is_Integer", isinstance(first, int)) else None


def summarize(graph, batch=None) -> dict:
    n = graph.batch_symbol()
    batch = fixed_batch(graph) if n is None else batch
    bindings = {n: batch if batch is not None else 1} if n is not None else {}
    rfs = receptive_fields(graph)
    rows, totals = [], {"params": sp.Integer(0), "macs": sp.Integer(0), "activation_bytes": sp.Integer(0)}
    weights_only = weight_computations(graph)
    for node in graph.topo():
        if node.role in ("param", "buffer") or node.name in weights_only:
            continue
        operands = graph.operands(node.name)
        op = OPS[node.op]
        cost = op.cost(graph.in_types(node.name), node.type, node.attrs)
        if op.kind == "elementwise":   # a parameter an elementwise op reads (a learned scale): its row's
            free = {o for o in operands if graph.node(o).op == "param" and graph.node(o).attrs.get("trainable")}
            cost = dataclasses.replace(cost, params=cost.params + sum(numel(graph.node(o).shape) for o in free))
        computed = [(i, o) for i, o in enumerate(operands) if o in weights_only]
        if computed:                   # a folded / composed weight: the row counts the parameters it is made of
            counted = sum((numel(graph.node(o).shape) for i, o in computed
                           if not op.variadic and i < len(op.operands) and op.operands[i] in op.param_operands
                           or op.variadic and op.operand_name(i) in ("weight", "bias")), sp.Integer(0))
            sources = set().union(*(trainable_sources(graph, o, weights_only) for _, o in computed))
            cost = dataclasses.replace(cost, params=cost.params - counted +
                                       sum((numel(graph.node(p).shape) for p in sources), sp.Integer(0)))
        weights = [o for i, o in enumerate(operands) if op.operand_name(i) == "weight"]
        weight_shape = [int(d) for d in graph.node(weights[0]).shape] if weights else None
        rf = rfs.get(node.name)
        shape = node.shape
        activation_bytes = numel(shape) * ITEMSIZE[node.dtype]
        for key, value in (("params", cost.params), ("macs", cost.macs), ("activation_bytes", activation_bytes)):
            totals[key] += value
        rows.append({
            "name": node.name,
            "op": node.op,
            "output_shape": [_value(d, {}) for d in (shape if batch is None else [d.subs(bindings) for d in shape])],
            "weight_shape": weight_shape,
            "params": _value(cost.params, bindings),
            "macs": _value(cost.macs, bindings),
            "receptive_field": [_value(r, {}) for r in rf[0]] if rf and rf[0] is not None else None,
            "activation_bytes": _value(activation_bytes, bindings),
        })
    # totals of the symbolic expressions: a row like 216*H*W keeps the total symbolic
    total = {key: _value(value, bindings) for key, value in totals.items()}
    return {"model": graph.name, "dtype": graph.dtype, "batch": batch, "batch_dim": str(n) if n is not None else None,
            "layers": rows, "total_params": total["params"], "total_macs": total["macs"],
            "total_activation_bytes": total["activation_bytes"]}


def _num(v):
    return f"{v:,}" if isinstance(v, int) else str(v)


def _size(shape, batch_dim, batch):
    dims = list(shape)
    if batch is None and dims and str(dims[0]) == batch_dim:
        dims = dims[1:]  # per example, as the lecture writes sizes
    return " x ".join(str(d) for d in dims) if dims else "scalar"


def _bytes(v):
    if not isinstance(v, int):
        return f"{v} B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:,} {unit}" if unit == "B" else f"{v:,.1f} {unit}"
        v /= 1024


def format_table(s: dict) -> str:
    head = ["Layer", "Op", "Output Size", "Weight Size", "Params", "MACs", "Receptive Field", "Activations"]
    body = []
    for r in s["layers"]:
        body.append([r["name"], r["op"], _size(r["output_shape"], s["batch_dim"], s["batch"]),
                     " x ".join(map(str, r["weight_shape"])) if r["weight_shape"] else "",
                     _num(r["params"]) if r["params"] else "", _num(r["macs"]) if r["macs"] else "",
                     " x ".join(map(str, r["receptive_field"])) if r["receptive_field"] else "",
                     _bytes(r["activation_bytes"])])
    total = ["Total", "", "", "", _num(s["total_params"]), _num(s["total_macs"]), "", _bytes(s["total_activation_bytes"])]
    widths = [max(len(row[i]) for row in [head, total] + body) for i in range(len(head))]
    right = {4, 5, 7}

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    per = f"for batch {s['batch']}" if s["batch"] is not None else "per example (N = 1)"
    title = f"{s['model']} ({s['dtype']}, counts {per})"
    return "\n".join([title, line(head), rule, *map(line, body), rule, line(total)])


def format_json(s: dict) -> str:
    return json.dumps(s, indent=2)


def summarize_training(step_graph, batch=None) -> dict:
    """What one training step costs: multiply-adds of the forward, backward and update nodes, and the
    bytes it keeps: activations saved for the backward pass, parameters, gradients, optimizer state."""
    n = step_graph.batch_symbol()
    batch = fixed_batch(step_graph) if n is None else batch
    bindings = {n: batch if batch is not None else 1} if n is not None else {}
    macs = {"forward": sp.Integer(0), "backward": sp.Integer(0), "update": sp.Integer(0)}
    for node in step_graph.topo():
        if node.role != "op":
            continue
        macs[node.stage] += OPS[node.op].cost(step_graph.in_types(node.name), node.type, node.attrs).macs

    def size(nodes):
        return sum(numel(x.shape) * ITEMSIZE[x.dtype] for x in nodes)

    params = [x for x in step_graph.params if x.attrs["trainable"]]
    grads = [step_graph.node(g) for g in step_graph.meta["grads"].values()]
    state = [step_graph.node(x) for x in step_graph.meta["optimizer_state"]]
    held = {"saved activations": saved_bytes(step_graph), "parameters": size(params), "gradients": size(grads),
            "optimizer state": size(state)}
    return {"model": step_graph.name, "batch": batch,
            "macs": {k: _value(v, bindings) for k, v in macs.items()},
            "bytes": {k: _value(v, bindings) for k, v in held.items()},
            "total_macs": _value(sum(macs.values()), bindings),
            "total_bytes": _value(sum(held.values()), bindings)}


def format_training(t: dict) -> str:
    per = f"batch {t['batch']}" if t["batch"] is not None else "per example (N = 1)"
    rows = [(f"{k} MACs", _num(v)) for k, v in t["macs"].items()]
    rows.append(("total MACs", _num(t["total_macs"])))
    rows += [(k, _bytes(v)) for k, v in t["bytes"].items()]
    rows.append(("total bytes held", _bytes(t["total_bytes"])))
    width = max(len(k) for k, _ in rows)
    value_width = max(len(v) for _, v in rows)
    lines = [f"{t['model']} ({per})"] + [f"  {k.ljust(width)}  {v.rjust(value_width)}" for k, v in rows]
    return "\n".join(lines)
