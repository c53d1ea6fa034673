"""The backward pass: from a forward graph and a scalar loss, a graph in the same IR that computes
the loss, the forward outputs and the gradient of every trainable parameter (and of any input asked
for). Each op's gradient rule builds ordinary graph nodes, so the result compiles, dumps and (later)
generates code exactly like a forward graph.

Naming: the gradient of tensor `t` is `dt`; when t has several users, each user's contribution is
`dt@user` and `dt` is their sum. Every gradient node records the forward node it came from.
"""
from __future__ import annotations

import networkx as nx
import sympy as sp

from .errors import GraphError
from .ir import Tensor
from .ops import OPS
from .ops.base import ITEMSIZE
from .passes import eliminate_dead_code
from .shapes import numel


class GradEmitter:
    """What a gradient rule sees: the forward node's operands, output and attributes, and `emit`,
    which adds a gradient node named and tagged for this node."""

    def __init__(self, graph, node, names):
        self.graph, self.node, self.names = graph, node, names
        self.inputs = [Tensor(graph, o) for o in graph.operands(node.name)]
        self.output = Tensor(graph, node.name)
        self.attrs = dict(node.attrs)
        self.count = 0

    def emit(self, op, operands, attrs=None, wrt=None) -> Tensor:
        if wrt is None:
            self.count += 1
            name = self.graph.unique_name(f"{self.node.name}.bwd{self.count}")
        else:
            name = self.names[wrt]
        provenance = {"grad_of": self.node.name, "rule": f"{self.node.op}.grad"}
        if wrt is not None:
            provenance["wrt"] = OPS[self.node.op].operand_name(wrt)
        return self.graph.add_node(op, operands, attrs or {}, name=name, layer=self.node.layer, provenance=provenance,
                                   stage="backward")


def differentiable_targets(graph, wrt=()):
    targets = [n.name for n in graph.params if n.attrs["trainable"]]
    for name in wrt:
        if name not in graph:
            raise GraphError(f"backward: {graph.name} has no tensor {name!r} to differentiate with respect to")
        if graph.node(name).dtype == "int64":
            raise GraphError(f"backward: {name} holds integers; it has no gradient")
        if name not in targets:
            targets.append(name)
    return targets


def derive_backward(graph, loss=None, wrt=(), name=None):
    """The training graph's backward half. Outputs: the loss, the forward outputs, then one gradient
    per target (trainable params in order, then `wrt`). `graph.meta["grads"]` maps target -> gradient."""
    graph.verify()
    if loss is None and not graph.outputs:
        raise GraphError(f"backward: {graph.name} has no outputs; mark the scalar loss with g.output(loss) "
                         f"(or add one with graphconv.training.attach_loss) before deriving the backward graph")
    loss = loss or graph.outputs[0]
    if loss not in graph:
        raise GraphError(f"backward: {graph.name} has no node {loss!r} to use as the loss")
    loss_node = graph.node(loss)
    if loss_node.shape != () or loss_node.dtype == "int64":
        raise GraphError(f"backward: the loss {loss} must be a float scalar, got {loss_node.type}")
    g = graph.copy(name or f"{graph.name}.backward")
    targets = differentiable_targets(g, wrt)
    depends = set(targets).union(*(nx.descendants(g.nx, t) for t in targets))
    active = depends & (nx.ancestors(g.nx, loss) | {loss})

    users = {}
    for node in g.topo():
        if node.name in active and node.role == "op":
            for o in g.operands(node.name):
                if o in active:
                    users[o] = users.get(o, 0) + 1

    forward_nodes = [n for n in g.topo() if n.name in active]
    pending: dict = {loss: [g.add_node("constant", (), {"shape": (), "dtype": loss_node.dtype, "value": 1.0},
                                       name=g.unique_name(f"d{loss}"), layer=loss_node.layer,
                                       provenance={"grad_of": loss, "rule": "seed"}, stage="backward")]}
    grads = {}
    for node in reversed(forward_nodes):
        parts = pending.pop(node.name, [])
        if not parts:
            continue
        dy = accumulate(g, node.name, parts)
        if node.role != "op":
            grads[node.name] = dy
            continue
        operands = g.operands(node.name)
        needs = [o in active for o in operands]
        names, seen = {}, {}
        for i, o in enumerate(operands):
            if needs[i]:
                seen[o] = seen.get(o, 0) + 1
                base = f"d{o}" if users[o] == 1 else f"d{o}@{node.name}" + (f".{seen[o]}" if seen[o] > 1 else "")
                names[i] = g.unique_name(base)
        with g.layer_errors(node.name, node.op, operands):   # e.g. an op without a gradient rule
            results = OPS[node.op].grad(GradEmitter(g, node, names), dy, needs)
        if len(results) != len(operands):
            raise AssertionError(f"internal: {node.op}.grad returned {len(results)} entries for "
                                 f"{len(operands)} operands")
        for o, need, r in zip(operands, needs, results):
            if need and r is not None:
                pending.setdefault(o, []).append(r)
    for t in targets:
        if t not in grads:  # the loss does not depend on it: its gradient is zero
            node = g.node(t)
            grads[t] = g.add_node("constant", (), {"shape": node.shape, "dtype": node.dtype, "value": 0.0},
                                  name=g.unique_name(f"d{t}"), layer=node.layer, provenance={"grad_of": t, "rule": "zero"},
                                  stage="backward")
    g.outputs = [loss] + [o for o in graph.outputs if o != loss] + [grads[t].name for t in targets]
    g.meta["loss"] = loss
    g.meta["grads"] = {t: grads[t].name for t in targets}
    return eliminate_dead_code(g)


def accumulate(g, name, parts):
    """Sum the contributions to one tensor's gradient (fan-out accumulates)."""
    if len(parts) == 1:
        return parts[0]
    total = parts[0]
    for k, part in enumerate(parts[1:], 1):
        last = k == len(parts) - 1
        total = g.add_node("add", [total, part], {}, name=g.unique_name(f"d{name}" if last else f"d{name}.sum{k}"),
                           layer=g.node(name).layer, provenance={"grad_of": name, "rule": "accumulate"},
                           stage="backward")
    return total


def saved_tensors(graph) -> list:
    """Forward tensors (activations and inputs, not parameters) that gradient nodes read: what a
    training step must keep from its forward pass."""
    saved = []
    for node in graph.topo():
        if node.stage != "forward" or node.role in ("param", "buffer"):
            continue
        if any(graph.node(u).stage == "backward" for u, _ in graph.users(node.name)):
            saved.append(node)
    return saved


def saved_bytes(graph, batch=None):
    """Bytes of the saved tensors, as a sympy expression of the symbolic dims (or a number)."""
    total = sum((numel(n.shape) * ITEMSIZE[n.dtype] for n in saved_tensors(graph)), sp.Integer(0))
    if batch is not None:
        total = total.subs({s: batch for s in total.free_symbols})
    return total
