"""Gradient checks in float64 against central finite differences along random directions (JAX's
check_vjp): for one rule, <vjp(dy), v> must equal d/dt <dy, f(x + t v)> at t = 0.

`check_rule` checks one op's gradient rule at given operand values; `check_graph` checks the rule of
every forward node of a model's backward graph (on random data of that node's shapes and
attributes) and the whole model end to end.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .autodiff import GradEmitter, derive_backward
from .builder import Graph
from .ops import OPS
from .params import init_params
from .passes import cast
from .reference import NumpyProgram, concrete

TOLERANCE = 1e-5


@dataclass
class Check:
    rule: str          # e.g. "conv2d.grad[weight]"
    node: str          # the forward node (or "end to end")
    error: float       # worst relative error over the directions

    @property
    def ok(self):
        return self.error <= TOLERANCE


def relative_error(a, b, floor=1e-6):
    """|a - b| relative to the larger magnitude, absolute below `floor` (round-off of a difference
    quotient is ~1e-16/eps in float64)."""
    return abs(a - b) / max(abs(a), abs(b), floor)


def check_rule(op_name, values, attrs, rng, directions=3, node_name="f"):
    """Check op_name's gradient rule at `values` (one float64/int64 array per operand)."""
    op = OPS[op_name]
    g = Graph("check", "float64")
    ins = [g.input(f"in{i}", v.shape, dtype=str(v.dtype)) for i, v in enumerate(values)]
    out = g.add_node(op_name, ins, attrs, name=node_name)
    dy_value = rng.standard_normal([int(d) for d in out.shape])
    dy = g.input("dy", out.shape)
    needs = [str(v.dtype) == "float64" for v in values]
    names = {i: f"d{i}" for i in range(len(values))}
    grads = op.grad(GradEmitter(g, g.node(node_name), names), dy, needs)
    checked = [(i, t) for i, t in enumerate(grads) if needs[i] and t is not None]
    if not checked:
        return []
    g.output(*[t for _, t in checked])
    feed = {f"in{i}": v for i, v in enumerate(values)}
    feed["dy"] = dy_value
    vjps = NumpyProgram(g).run(feed, {})
    node = g.node(node_name)

    def phi(arrays):
        shape = concrete(node.shape, {})
        return float(np.vdot(dy_value, op.evaluate(arrays, node.attrs, shape)))

    results = []
    for i, t in checked:
        worst = 0.0
        for _ in range(directions):
            v = unit_direction(rng, values[i].shape)

            def along(step, i=i, v=v):
                plus, minus = list(values), list(values)
                plus[i], minus[i] = values[i] + step * v, values[i] - step * v
                return phi(plus), phi(minus)

            worst = max(worst, directional_error(along, float(np.vdot(vjps[t.name], v))))
        results.append(Check(f"{op_name}.grad[{op.operand_name(i)}]", node_name, worst))
    return results


STEPS = (1e-4, 1e-5, 1e-6, 1e-7)


def unit_direction(rng, shape):
    """A random direction of norm 1: a step moves each element far less than a kink's width."""
    v = rng.standard_normal(shape)
    return v / np.linalg.norm(v)


def directional_error(along, analytic):
    """Relative error of the central difference (f(+h) - f(-h)) / 2h against `analytic`, at the
    best of four step sizes: a ReLU kink within reach spoils the large steps, round-off the small
    ones, while a wrong gradient is wrong at every step."""
    errors = []
    for h in STEPS:
        f_plus, f_minus = along(h)
        errors.append(relative_error((f_plus - f_minus) / (2 * h), analytic))
    return min(errors)


def random_operands(graph, node, rng, batch):
    """Random float64 values of a node's operand shapes (class indices for int64 targets)."""
    n = graph.batch_symbol()
    bindings = {n: batch} if n is not None else {}
    values = []
    for i, o in enumerate(graph.operands(node.name)):
        src = graph.node(o)
        shape = concrete(src.shape, bindings)
        if src.dtype == "int64":  # class indices for a loss: operand 0 holds the scores
            classes = int(graph.node(graph.operands(node.name)[0]).shape[1])
            values.append(rng.integers(0, classes, size=shape))
        elif OPS[node.op].operand_name(i) == "running_var":  # a variance must be positive
            values.append(rng.uniform(0.5, 2.0, size=shape))
        else:
            values.append(rng.standard_normal(shape))
    return values


def check_graph(graph, seed=0, batch=2, directions=3):
    """Every gradient rule used by the backward graph of `graph` (whose first output is a scalar
    loss), checked at its node's shapes and attributes, then the whole model end to end."""
    if not any(n.attrs["trainable"] for n in graph.params):
        from .errors import GraphError
        raise GraphError(f"{graph.name} has no trainable parameters: its backward graph computes no gradient, so "
                         f"there is no gradient rule to check")
    rng = np.random.default_rng(seed)
    graph64 = cast(graph, "float64")
    backward = derive_backward(graph64)
    n = graph64.batch_symbol()
    NumpyProgram(backward).shapes({n: batch} if n is not None else {})   # refuses a batch that cannot fit
    results = []
    for node in graph64.topo():
        if node.role != "op" or not any(b.provenance.get("grad_of") == node.name
                                        for b in backward.topo() if b.provenance.get("rule") != "seed"):
            continue
        values = random_operands(graph64, node, rng, batch)
        results += check_rule(node.op, values, node.attrs, rng, directions, node_name=node.name)
    results.append(check_end_to_end(graph64, backward, rng, batch, directions))
    return results


def check_end_to_end(graph64, backward, rng, batch, directions):
    """Each parameter's whole-model gradient <dL/dp, v> against the finite difference of the loss
    along v. (One tensor at a time: moving every parameter at once shifts so many pre-activations
    that some cross a ReLU kink inside the difference step.)"""
    from .data import random_inputs
    params = init_params(graph64, seed=int(rng.integers(1 << 30)))
    inputs = random_inputs(graph64, batch, int(rng.integers(1 << 30)))
    grads = NumpyProgram(backward).run(inputs, params)
    loss_program = NumpyProgram(_loss_only(graph64))
    loss = backward.meta["loss"]

    def loss_at(p):
        return float(loss_program.run(inputs, p)[loss])

    worst = 0.0
    for name in (n.name for n in graph64.params if n.attrs["trainable"]):
        for _ in range(directions):
            v = unit_direction(rng, params[name].shape)

            def along(step, name=name, v=v):
                return (loss_at({**params, name: np.asarray(params[name] + step * v)}),    # a 0-d parameter
                        loss_at({**params, name: np.asarray(params[name] - step * v)}))    # stays an array

            worst = max(worst, directional_error(along, float(np.vdot(grads[backward.meta["grads"][name]], v))))
    return Check("model (end to end)", "every parameter", worst)


def _loss_only(graph):
    g = graph.copy()
    g.outputs = g.outputs[:1]
    return g


def format_table(results) -> str:
    rules = {}
    for r in results:
        row = rules.setdefault(r.rule, {"nodes": [], "error": 0.0})
        row["nodes"].append(r.node)
        row["error"] = max(row["error"], r.error)
    width = max(len(k) for k in rules)
    lines = [f"{'rule'.ljust(width)}  nodes  max rel. error  status", "-" * (width + 33)]
    for rule, row in rules.items():
        status = "ok" if row["error"] <= TOLERANCE else "FAIL"
        lines.append(f"{rule.ljust(width)}  {len(row['nodes']):5d}  {row['error']:14.2e}  {status}")
    failed = sum(r.error > TOLERANCE for r in results)
    lines.append(f"{len(results)} checks, {failed} failed (tolerance {TOLERANCE:g}, float64, central differences)")
    return "\n".join(lines)
