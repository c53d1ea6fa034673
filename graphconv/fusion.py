"""Fusion passes: each finds chains by explicit patterns with guards, replaces every chain by one
fused node (Graph.replace records what it stood for), and writes a ledger entry for every
candidate, fired or refused, with the bytes moved through memory before and after.

Bytes count each kernel as reading its inputs once and writing its output once (op.cost), so a
fused chain saves the writes and re-reads of the tensors between its nodes.

Patterns so far:
  conv_chain   conv (+bias) -> elementwise ops (activations, sympy-defined ones, residual add,
               per-channel affine) -> optionally one max/avg pool, 1-D/2-D/3-D -> fused_conv.
               Guards: each intermediate has exactly one user and is not a graph output; the next
               node is of the same stage; an elementwise op reads the running value once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from .ops import OPS
from .ops.base import nbytes
from .ops.fused import epilogue_step, pool_spec

POOLS = {f"{mode}_pool{nd}d" for mode in ("max", "avg") for nd in (1, 2, 3)}


@dataclass
class Decision:
    """One ledger entry: a candidate group, the rule that fired or why it was refused."""
    rule: str
    anchor: str                    # the node the pattern started from (conv1)
    nodes: list                    # the nodes fused (or that would have been)
    fired: bool
    reason: str = ""
    bytes_before: sp.Expr = field(default_factory=lambda: sp.Integer(0))
    bytes_after: sp.Expr = field(default_factory=lambda: sp.Integer(0))
    into: str = ""                 # the fused node's name


def node_bytes(graph, name) -> sp.Expr:
    node = graph.node(name)
    cost = OPS[node.op].cost(graph.in_types(name), node.type, node.attrs)
    return cost.bytes_read + cost.bytes_written


def graph_bytes(graph) -> sp.Expr:
    """Bytes every compute node of the graph moves, each read once and written once."""
    return sum((node_bytes(graph, n.name) for n in graph.topo() if n.role == "op"), sp.Integer(0))


def conv_chain(graph, conv):
    """The longest fusable chain from a conv node: (nodes, extra operands, epilogue, pool, reason
    the chain stopped)."""
    nodes, extras, epilogue, pool = [conv], [], [], ()
    current = conv
    while True:
        users = graph.users(current.name)
        if current.name in graph.outputs:
            return nodes, extras, epilogue, pool, f"{current.name} is a graph output"
        if len({u for u, _ in users}) != 1 or len(users) != 1:
            names = ", ".join(dict.fromkeys(u for u, _ in users)) or "none"
            return nodes, extras, epilogue, pool, (f"{current.name} has {len(users)} users ({names}): not fused into "
                                                   f"{conv.name}")
        user = graph.node(users[0][0])
        op = OPS[user.op]
        if user.stage != conv.stage:
            return nodes, extras, epilogue, pool, f"{user.name} is a {user.stage} node"
        if op.kind == "elementwise" and user.dtype == conv.dtype:
            refs = []
            for operand in graph.operands(user.name):
                if operand == current.name:
                    refs.append(-1)
                    continue
                if operand not in extras:
                    extras.append(operand)
                refs.append(extras.index(operand))
            if refs.count(-1) != 1:
                return nodes, extras, epilogue, pool, f"{user.name} reads {current.name} twice"
            epilogue.append(epilogue_step(user.op, user.attrs, refs))
            nodes.append(user)
            current = user
            continue
        if user.op in POOLS and op.nd == OPS[conv.op].nd:
            nodes.append(user)
            return nodes, extras, epilogue, pool_spec(user.op, user.attrs), ""
        return nodes, extras, epilogue, pool, f"{user.name} [{user.op}] is neither elementwise nor a pool"


def fuse_conv_chains(graph):
    """Pass: every conv (+bias) -> elementwise* -> pool? chain becomes one fused_conv node."""
    g = graph.copy()
    ledger = list(g.meta.get("fusion", []))
    for conv in [n for n in graph.topo() if n.op in ("conv1d", "conv2d", "conv3d")]:
        conv = g.node(conv.name)
        nodes, extras, epilogue, pool, reason = conv_chain(g, conv)
        names = [n.name for n in nodes]
        before = sum((node_bytes(g, n) for n in names), sp.Integer(0))
        if len(nodes) == 1:
            ledger.append(Decision("conv_chain", conv.name, names, False, reason or "nothing follows it",
                                   before, before, conv.name))
            continue
        operands = g.operands(conv.name)
        attrs = {**conv.attrs, "bias": len(operands) > 2, "epilogue": tuple(epilogue), "pool": pool,
                 "nd": OPS[conv.op].nd}
        fused = g.replace(names, "fused_conv", [*operands, *extras], attrs)
        ledger.append(Decision("conv_chain", conv.name, names, True, reason, before, node_bytes(g, fused.name),
                               fused.name))
    g.meta["fusion"] = ledger
    return g.verify()


def report(unfused, fused, batch=None) -> dict:
    """The ledger of a fused graph with its byte counts (per example, or for `batch`)."""
    n = unfused.batch_symbol()
    bind = {n: batch if batch is not None else 1} if n is not None else {}

    def value(expr):
        v = sp.simplify(sp.sympify(expr).subs(bind))
        return int(v) if v.is_Integer else str(v)

    groups = [{"rule": d.rule, "anchor": d.anchor, "nodes": d.nodes, "fired": d.fired, "reason": d.reason,
               "into": d.into, "bytes_before": value(d.bytes_before), "bytes_after": value(d.bytes_after)}
              for d in fused.meta.get("fusion", [])]
    return {"model": unfused.name, "batch": batch, "groups": groups,
            "total_bytes_before": value(graph_bytes(unfused)), "total_bytes_after": value(graph_bytes(fused)),
            "kernels_before": sum(1 for x in unfused.topo() if x.role == "op"),
            "kernels_after": sum(1 for x in fused.topo() if x.role == "op" and x.op != "part")}


def format_report(r: dict) -> str:
    from .memory import fmt_bytes
    per = f"batch {r['batch']}" if r["batch"] is not None else "per example (N = 1)"

    def b(v):
        return fmt_bytes(v) if isinstance(v, int) else f"{v} B"

    lines = [f"fusion of {r['model']} ({per}; bytes each kernel reads and writes)"]
    for d in r["groups"]:
        chain = " -> ".join(d["nodes"])
        if d["fired"]:
            lines.append(f"  fused    {chain}  =>  {d['into']} [fused_conv]   {b(d['bytes_before'])} -> "
                         f"{b(d['bytes_after'])}" + (f"   (stopped: {d['reason']})" if d["reason"] else ""))
        else:
            lines.append(f"  refused  {d['anchor']}: {d['reason']}")
    lines.append(f"  total    {r['kernels_before']} kernels, {b(r['total_bytes_before'])}  ->  "
                 f"{r['kernels_after']} kernels, {b(r['total_bytes_after'])}")
    return "\n".join(lines)
