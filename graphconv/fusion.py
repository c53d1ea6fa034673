"""Fusion passes: each finds chains by explicit patterns with guards, replaces every chain by one
fused node (Graph.replace records what it stood for), and writes a ledger entry for every
candidate, fired or refused, with the bytes moved through memory before and after.

Bytes count each kernel as reading its inputs once and writing its output once (op.cost), so a
fused chain saves the writes and re-reads of the tensors between its nodes.

Patterns:
  fold_batch_norm  (eval mode) conv -> batch_norm with running statistics -> one conv whose weight
               and bias a fold_batch_norm node computes from both layers' parameters.
  conv_chain   conv (+bias) -> elementwise ops (activations, sympy-defined ones, residual add,
               per-channel affine) -> optionally one max/avg pool, 1-D/2-D/3-D -> fused_conv.
               Guards: each intermediate has exactly one user and is not a graph output; the next
               node is of the same stage; an elementwise op reads the running value once.
  linear_chain linear (+bias) -> elementwise ops -> fused_linear (the same guards); matmul_chain
               matmul -> elementwise ops -> fused_matmul (a linear's input gradient and the
               activation gradient after it).
  conv_act_maxpool_train  (training graphs) conv -> act -> max pool with its backward pair ->
               a fused forward node saving pooled output + uint8 argmax codes, one pool_act_backward.
  collapse_convs   (opt-in) conv -> conv with nothing between -> one conv with the composed kernel,
               where exact (the second conv does not pad, neither is grouped).
  pointwise_chain  elementwise ops, each the only user of the one before -> one fused_pointwise
               node whose sympy expression is the composition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import sympy as sp

from .ops import OPS
from .ops.base import nbytes
from .ir import records
from .ops.fused import Z, compose, epilogue_step, lost_operands, pool_spec

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
    macs_before: sp.Expr = None    # for rules that change the arithmetic (collapse_convs)
    macs_after: sp.Expr = None


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
            names = ", ".join(called(graph.node(u)) for u in dict.fromkeys(u for u, _ in users)) or "none"
            where = "so nothing after it fuses into it" if current is conv else f"the chain from {layers(conv)[0]} stops there"
            return nodes, extras, epilogue, pool, f"{current.name} has {len(users)} users ({names}): {where}"
        user = graph.node(users[0][0])
        op = OPS[user.op]
        if user.stage != conv.stage:
            return nodes, extras, epilogue, pool, f"{user.name} is a {user.stage} node"
        if op.kind == "elementwise" and user.dtype == conv.dtype:
            refs, more = [], list(extras)
            for operand in graph.operands(user.name):
                if operand == current.name:
                    refs.append(-1)
                    continue
                if operand not in more:
                    more.append(operand)
                refs.append(more.index(operand))
            if refs.count(-1) != 1:
                return nodes, extras, epilogue, pool, f"{user.name} reads {current.name} twice"
            step = epilogue_step(user.op, user.attrs, refs)
            lost = cancelled(epilogue + [step], more, Z)
            if lost:
                names = " -> ".join(n.name for n in nodes[1:] + [user])
                return nodes, extras, epilogue, pool, (f"composed, {names} would cancel {', '.join(lost)} algebraically "
                                                       f"({compose(epilogue + [step], len(more), Z)}), and an inf or "
                                                       f"NaN there would no longer come through")
            extras[:] = more
            epilogue.append(step)
            nodes.append(user)
            current = user
            continue
        pools = user.op in POOLS and op.nd == getattr(OPS[conv.op], "nd", None)     # not after a linear
        if pools and math.prod(user.attrs["kernel_size"]) > max_window(user):
            return nodes, extras, epilogue, pool, (f"{user.name}'s window has {math.prod(user.attrs['kernel_size'])} "
                                                   f"elements, more than the {max_window(user)} a fused kernel pools "
                                                   f"in registers")
        if pools:
            nodes.append(user)
            return nodes, extras, epilogue, pool_spec(user.op, user.attrs), ""
        if user.op in ("fused_conv", "fused_linear", "fused_matmul"):
            return nodes, extras, epilogue, pool, (f"it feeds {user.name}, which already fused "
                                                   f"{' -> '.join(layers(user))}")
        if user.op.startswith("adaptive_"):
            return nodes, extras, epilogue, pool, (sizes_pending(user, current) or
                                                   f"{user.name} [{user.op}] has windows of two sizes (its input is "
                                                   f"not a multiple of its output), which no fused kernel pools")
        return nodes, extras, epilogue, pool, (f"{called(user)} [{user.op}] is not elementwise" if conv.op in ("linear", "matmul")
                                               else f"{called(user)} [{user.op}] is neither elementwise nor a pool")


def sizes_pending(pool, source) -> str:
    """Why an adaptive pool over `source` does not fuse while its sizes are symbolic, or ""."""
    if all(getattr(d, "is_Integer", False) for d in source.shape[2:]):
        return ""
    return (f"{pool.name} [{pool.op}] pools sizes not known yet (--dim, or bind_dims, makes it a plain pool where "
            f"they divide)")


def layers(node) -> list:
    """The names a node stands for: itself, or what it replaced."""
    return [r[0] for r in node.replaces] if node.replaces else [node.name]


def called(node) -> str:
    """A node as the ledger names it: a conv with its batch norm folded in is `conv2+bn2` (the node
    itself took the batch norm's name)."""
    return "+".join(layers(node))


def max_window(pool) -> int:
    """The largest pooling window a fused conv takes: its kernel holds a window's results in
    registers, one per element (32 floats, 16 doubles: with 64, resnet8's 8 x 8 global average pool
    took all 255 registers and NVRTC 13.0 spilled)."""
    return 32 if pool.dtype == "float32" else 16


def training_chain(graph, conv):
    """In a training graph, conv -> act -> max pool whose only other readers are the backward pass's
    act gradient (reading the conv output) and max-pool backward (reading the activation):
    (act, pool, pool_backward, act_grad), or the reason it does not match."""
    def users(node):
        return [graph.node(u) for u, _ in graph.users(node.name)]

    conv_users = users(conv)
    fwd = [u for u in conv_users if u.stage == "forward"]
    if len(conv_users) != 2 or len(fwd) != 1 or conv.name in graph.outputs:
        return None
    act = fwd[0]
    act_op = OPS[act.op]
    if act_op.kind != "elementwise" or len(graph.operands(act.name)) != 1 or act.op == "add":
        return None
    act_grad = next(u for u in conv_users if u is not act)
    act_users = users(act)
    pools = [u for u in act_users if u.op in POOLS and u.op.startswith("max_pool") and u.stage == "forward"]
    averages = [u for u in act_users if u.op in POOLS and u.op.startswith("avg_pool")]
    if averages:
        return (f"{averages[0].name} is an average pool: the gradient of {act.name} needs {conv.name} at every "
                f"position, not only at each window's maximum, so {conv.name} stays saved")
    adaptive = [u for u in act_users if u.op.startswith("adaptive_") and u.stage == "forward"]
    if adaptive and not pools and sizes_pending(adaptive[0], act):
        return sizes_pending(adaptive[0], act)
    if not pools and act.name not in graph.outputs:
        return (f"no max pool follows {act.name}: the training pattern saves a max pool's output and its argmax "
                f"codes in place of {conv.name}'s output")
    if (act_grad.op != f"{act.op}_grad" or graph.operands(act_grad.name)[0] != conv.name or len(act_users) != 2
            or len(pools) != 1 or act.name in graph.outputs):
        return f"the backward pass reads {conv.name} and {act.name} in a way no pattern covers"
    pool = pools[0]
    pool_bwd = next(u for u in act_users if u is not pool)
    if (pool_bwd.op != f"{pool.op}_backward" or graph.operands(pool_bwd.name)[0] != act.name
            or [u.name for u in users(pool_bwd)] != [act_grad.name] or pool_bwd.name in graph.outputs
            or graph.operands(act_grad.name)[1] != pool_bwd.name or pool_bwd.attrs != pool.attrs):
        return f"{pool.name}: its backward node {pool_bwd.name} does not feed only {act_grad.name}"
    if OPS[pool.op].nd != OPS[conv.op].nd:
        return f"{pool.name} pools {OPS[pool.op].nd}-D after a {OPS[conv.op].nd}-D conv"
    return act, pool, pool_bwd, act_grad


def reroute_act_grad(graph, layer) -> str:
    """In a training graph, conv/linear -> act whose gradient reads the layer's output (and nothing
    else does): where act' can be read off act's output (reads_sign_from_output), the gradient is
    made to read act's output instead, so the layer's output is no longer saved and the chain can
    fuse. Returns what was done, or ""."""
    users = [graph.node(u) for u, _ in graph.users(layer.name)]
    fwd = [u for u in users if u.stage == "forward"]
    if len(users) != 2 or len(fwd) != 1 or layer.name in graph.outputs:
        return ""
    act, grad = fwd[0], next(u for u in users if u.stage != "forward")
    if (not reads_sign_from_output(act) or act.dtype != layer.dtype or grad.op != f"{act.op}_grad"
            or graph.operands(grad.name)[0] != layer.name or graph.operands(grad.name).count(layer.name) != 1):
        return ""
    graph.set_operand(grad.name, 0, act.name)
    return f"{grad.name} reads {act.name} ({act.op}'s derivative is read off its output), so {layer.name} is not saved"


def reads_sign_from_output(act):
    """relu and leaky_relu with a slope >= 0: y > 0 exactly where x > 0 (at slope 0 the negative side
    is 0, as relu's), so their derivative can be evaluated at the output; others (a negative slope
    makes y > 0 where x < 0) need the pre-activation."""
    return act.op == "relu" or (act.op == "leaky_relu" and act.attrs["negative_slope"] >= 0)


def fuse_training_chain(g, conv, match):
    """Rewrite conv -> act -> max pool (+ their backward nodes) into a fused forward node with
    outputs (pooled, argmax codes[, pre-activation at the argmax]) and one pool_act_backward node.
    The pooled output keeps the pool's name; the full-size conv and activation outputs are gone."""
    act, pool, pool_bwd, act_grad = match
    aux_from_output = reads_sign_from_output(act)
    operands = g.operands(conv.name)
    dpool = g.operands(pool_bwd.name)[1]
    attrs = {**conv.attrs, "bias": len(operands) > 2, "epilogue": (epilogue_step(act.op, act.attrs, (-1,)),),
             "pool": pool_spec(pool.op, pool.attrs), "nd": OPS[conv.op].nd,
             "save": "argmax" if aux_from_output else "argmax_preact"}
    forward, backward = [conv, act, pool], [pool_bwd, act_grad]
    edges = g.remove([n.name for n in forward + backward])
    fused = g.add_node("fused_conv", operands, attrs, name=f"{pool.name}.fused", layer=conv.layer,
                       index=conv.index, replaces=records(forward))
    parts = {}
    for i, (suffix, index) in enumerate((("", pool.index), (".argmax", act.index), (".preact", None))):
        if i == 2 and aux_from_output:
            break
        parts[i] = g.add_node("part", [fused], {"index": i}, name=pool.name + suffix, layer=pool.layer, index=index)
    g.reconnect(parts[0].name, edges[pool.name])
    aux = parts[0] if aux_from_output else parts[2]
    spatial = g.node(operands[0]).shape[0:0] + tuple(act.shape[2:])
    bwd = g.add_node("pool_act_backward", [dpool, parts[1], aux],
                     {"act": (act.op, tuple(sorted(act.attrs.items()))), "pool": pool_spec(pool.op, pool.attrs),
                      "input_size": spatial},
                     name=act_grad.name, layer=act_grad.layer, provenance=dict(act_grad.provenance), stage="backward",
                     index=pool_bwd.index, replaces=records(backward))
    g.reconnect(bwd.name, edges[act_grad.name])
    return fused, bwd


def fuse_conv_chains(graph):
    """Pass: every conv (+bias) -> elementwise* -> pool? chain becomes one fused_conv node, every
    linear (+bias) / matmul -> elementwise* chain one fused_linear / fused_matmul node; in a training
    graph, conv -> act -> max pool and its backward pair become a fused forward node that saves the
    argmax codes and one pool_act_backward node."""
    g = graph.copy()
    ledger = list(g.meta.get("fusion", []))
    for conv in [n for n in graph.topo() if n.op in CONVS or n.op in ("linear", "matmul")]:
        conv = g.node(conv.name)
        linear = conv.op in ("linear", "matmul")
        rule = {"linear": "linear_chain", "matmul": "matmul_chain"}.get(conv.op, "conv_chain")
        match = training_chain(g, conv) if conv.stage == "forward" and not linear else None
        if isinstance(match, tuple):
            act, pool, pool_bwd, act_grad = match
            names = [conv.name, act.name, pool.name]
            before = sum((node_bytes(g, n) for n in names + [pool_bwd.name, act_grad.name]), sp.Integer(0))
            fused, bwd = fuse_training_chain(g, conv, match)
            after = node_bytes(g, fused.name) + node_bytes(g, bwd.name)
            ledger.append(Decision("conv_act_maxpool_train", conv.name, names + [pool_bwd.name, act_grad.name], True,
                                   "saved for the backward pass: " + ", ".join(sorted(u for u, _ in g.users(fused.name))),
                                   before, after, f"{fused.name} + {bwd.name}"))
            continue
        rerouted = reroute_act_grad(g, conv) if conv.stage == "forward" and not isinstance(match, tuple) else ""
        nodes, extras, epilogue, pool, reason = conv_chain(g, conv)
        if isinstance(match, str) and not rerouted:
            reason = match
        if rerouted and len(nodes) > 1:
            reason = f"{rerouted}; {reason}" if reason else rerouted
        names = [n.name for n in nodes]
        shown = [name for n in nodes for name in layers(n)]       # a folded conv shows conv and bn
        before = sum((node_bytes(g, n) for n in names), sp.Integer(0))
        if len(nodes) == 1:
            if conv.op != "matmul" or conv.stage == "forward":   # a gradient's matmul fusing nothing: no line
                ledger.append(Decision(rule, shown[0], shown, False, reason or "nothing follows it",
                                       before, before, conv.name))
            continue
        operands = g.operands(conv.name)
        if conv.op == "matmul":
            op, attrs = "fused_matmul", {**conv.attrs, "epilogue": tuple(epilogue)}
        elif linear:
            op, attrs = "fused_linear", {"bias": len(operands) > 2, "epilogue": tuple(epilogue)}
        else:
            op, attrs = "fused_conv", {**conv.attrs, "bias": len(operands) > 2, "epilogue": tuple(epilogue),
                                       "pool": pool, "nd": OPS[conv.op].nd}
        fused = g.replace(names, op, [*operands, *extras], attrs, layer=g.node(names[0]).layer)   # the conv's layer
        ledger.append(Decision(rule, shown[0], shown, True, reason, before, node_bytes(g, fused.name),
                               fused.name))
    g.meta["fusion"] = ledger
    return g.verify()


CONVS = ("conv1d", "conv2d", "conv3d")


def drop_eval_dropout(graph):
    """Pass: a dropout in eval mode is the identity: its users read its input instead, so a conv ->
    act -> dropout -> pool chain still fuses (the kernels would make it a view either way). One that is
    a graph output stays (its name is the output's)."""
    g = graph.copy()
    ledger = list(g.meta.get("fusion", []))
    for node in [n for n in graph.topo() if n.op == "dropout" and not n.attrs["training"]]:
        if node.name in g.outputs:
            continue
        x = g.operands(node.name)[0]
        before = node_bytes(g, node.name)
        g.replace_uses(node.name, x)
        g.remove([node.name])
        ledger.append(Decision("eval_dropout", node.name, [node.name], True, "eval mode: the identity, no kernel",
                               before, sp.Integer(0), x))
    g.meta["fusion"] = ledger
    return g.verify()


def fold_batch_norm(graph):
    """Pass (eval mode): a convolution followed by a batch norm using running statistics becomes one
    convolution whose weight and bias a fold_batch_norm node computes from both layers' parameters.
    Guards: the batch norm is in eval mode and reads the conv, which has no other user and is not a
    graph output."""
    g = graph.copy()
    ledger = list(g.meta.get("fusion", []))
    for bn in [n for n in graph.topo() if n.op == "batch_norm"]:
        bn = g.node(bn.name)
        conv = g.node(g.operands(bn.name)[0])
        if conv.op not in CONVS:
            continue
        users = [u for u, _ in g.users(conv.name)]
        reason = ("it uses batch statistics (training mode): they change with every batch" if bn.attrs["training"]
                  else f"{conv.name} is a graph output" if conv.name in g.outputs
                  else f"{conv.name} has {len(users)} users ({', '.join(users)})" if len(users) != 1 else "")
        before = node_bytes(g, conv.name) + node_bytes(g, bn.name)
        if reason:
            ledger.append(Decision("fold_batch_norm", bn.name, [conv.name, bn.name], False,
                                   f"{bn.name} not folded into {conv.name}: {reason}", before, before, bn.name))
            continue
        x, w, *b = g.operands(conv.name)
        stats = g.operands(bn.name)[1:]
        fold = g.add_node("fold_batch_norm", [w, *b, *stats],
                          {"eps": bn.attrs["eps"], "conv_bias": bool(b), "affine": len(stats) == 4},
                          name=f"{bn.name}.fold", layer=bn.layer, stage=bn.stage)
        weight = g.add_node("part", [fold], {"index": 0}, name=f"{bn.name}.fold.weight", layer=bn.layer)
        bias = g.add_node("part", [fold], {"index": 1}, name=f"{bn.name}.fold.bias", layer=bn.layer)
        folded = g.replace([conv.name, bn.name], conv.op, [x, weight, bias], conv.attrs, layer=conv.layer)
        after = node_bytes(g, folded.name) + node_bytes(g, fold.name)
        ledger.append(Decision("fold_batch_norm", bn.name, [conv.name, bn.name], True, "", before, after,
                               folded.name))
    g.meta["fusion"] = ledger
    return g.verify()


def collapse_convs(graph):
    """Pass (opt-in): conv1 -> conv2 with nothing between them becomes one convolution with the
    composed kernel (compose_conv_weights). Exact, and applied, only where conv2 does not pad and
    neither conv is grouped; conv1 may pad (the composed conv pads x the same way). The ledger gives
    the multiply-adds before and after: a composed kernel can cost more than the two it replaces."""
    g = graph.copy()
    ledger = list(g.meta.get("fusion", []))
    for conv2 in [n for n in graph.topo() if n.op in CONVS]:
        if conv2.name not in g:
            continue
        conv2 = g.node(conv2.name)
        conv1 = g.node(g.operands(conv2.name)[0])
        if conv1.op != conv2.op or conv1.stage != conv2.stage:
            continue
        op = OPS[conv1.op]
        users = [u for u, _ in g.users(conv1.name)]
        pads2 = op.pads(conv2.attrs, g.node(g.operands(conv2.name)[1]).shape)
        reason = (f"{conv1.name} has {len(users)} users ({', '.join(users)})" if len(users) != 1
                  else f"{conv1.name} is a graph output" if conv1.name in g.outputs
                  else f"{conv2.name} pads its input ({pads2}): those zeros are not {conv1.name}'s output, so no single "
                       f"convolution equals the two" if any(lo or hi for lo, hi in pads2)
                  else "grouped convolutions are not collapsed" if conv1.attrs["groups"] != 1 or conv2.attrs["groups"] != 1
                  else "")
        names = [conv1.name, conv2.name]
        macs_before = sum((cost_of(g, n).macs for n in names), sp.Integer(0))
        before = sum((node_bytes(g, n) for n in names), sp.Integer(0))
        if reason:
            ledger.append(Decision("collapse_convs", conv1.name, names, False, f"not collapsed: {reason}", before,
                                   before, conv2.name, macs_before, macs_before))
            continue
        x, w1, *b1 = g.operands(conv1.name)
        _, w2, *b2 = g.operands(conv2.name)
        compose = g.add_node("compose_conv_weights", [w1, *b1, w2, *b2],
                             {"stride1": conv1.attrs["stride"], "dilation1": conv1.attrs["dilation"],
                              "dilation2": conv2.attrs["dilation"], "bias1": bool(b1), "bias2": bool(b2)},
                             name=f"{conv2.name}.compose", layer=conv2.layer, stage=conv2.stage)
        weight = g.add_node("part", [compose], {"index": 0}, name=f"{conv2.name}.compose.weight", layer=conv2.layer)
        bias = g.add_node("part", [compose], {"index": 1}, name=f"{conv2.name}.compose.bias", layer=conv2.layer)
        attrs = {"stride": tuple(a * b for a, b in zip(conv1.attrs["stride"], conv2.attrs["stride"])),
                 "padding": op.pads(conv1.attrs, g.node(w1).shape), "dilation": 1, "groups": 1,
                 "padding_mode": conv1.attrs["padding_mode"]}
        new = g.replace(names, conv2.op, [x, weight, bias], attrs)
        ledger.append(Decision("collapse_convs", conv1.name, names, True, "", before,
                               node_bytes(g, new.name) + node_bytes(g, compose.name), new.name,
                               macs_before, cost_of(g, new.name).macs))
    g.meta["fusion"] = ledger
    return g.verify()


def cost_of(graph, name):
    node = graph.node(name)
    return OPS[node.op].cost(graph.in_types(name), node.type, node.attrs)


def elementwise(node) -> bool:
    return OPS[node.op].kind == "elementwise" and not node.is_tuple


def fuse_pointwise_chains(graph):
    """Pass: a chain of elementwise ops (activations, their gradients, residual adds, optimizer
    updates), each link the only user of the one before and not a graph output, becomes one
    fused_pointwise node whose expression is the composition (printed as one C expression)."""
    g = graph.copy()
    ledger = list(g.meta.get("fusion", []))
    done = set()
    for head in [n for n in graph.topo() if n.role == "op"]:
        if head.name in done or head.name not in g or not elementwise(g.node(head.name)):
            continue
        head = g.node(head.name)
        chain, reason = [head], ""
        while True:
            current = chain[-1]
            users = g.users(current.name)
            if current.name in g.outputs:
                reason = f"{current.name} is a graph output"
                break
            if len(users) != 1:
                reason = f"{current.name} has {len(users)} users" if users else ""
                break
            user = g.node(users[0][0])
            if not elementwise(user) or user.stage != head.stage or user.dtype != head.dtype:
                reason = f"{user.name} [{user.op}] is not elementwise" if not elementwise(user) else \
                    f"{user.name} is a {user.stage} node" if user.stage != head.stage else f"{user.name} is {user.dtype}"
                break
            if g.operands(user.name).count(current.name) != 1:
                reason = f"{user.name} reads {current.name} twice"
                break
            chain.append(user)
        done.update(n.name for n in chain)
        if len(chain) < 2:
            continue
        names = [n.name for n in chain]
        externals, steps = [], []
        for k, node in enumerate(chain):
            refs = []
            for o in g.operands(node.name):
                if k and o == chain[k - 1].name:
                    refs.append(-1)
                    continue
                if o not in externals:
                    externals.append(o)
                refs.append(externals.index(o))
            steps.append((node.op, tuple(sorted(node.attrs.items())), tuple(refs)))
        expr = compose(steps, len(externals))
        lost = cancelled(steps, externals)
        if lost:
            ledger.append(Decision("pointwise_chain", names[0], names, False,
                                   f"composed, {' -> '.join(names)} would cancel {', '.join(lost)} algebraically "
                                   f"({expr}), and an inf or NaN there would no longer come through"))
            continue
        before = sum((node_bytes(g, n) for n in names), sp.Integer(0))
        fused = g.replace(names, "fused_pointwise", externals, {"expr": str(expr)})
        ledger.append(Decision("pointwise_chain", names[0], names, True, f"{fused.name} = {expr}" if len(str(expr)) < 120
                               else "", before, node_bytes(g, fused.name), fused.name))
    g.meta["fusion"] = ledger
    return g.verify()


def cancelled(steps, externals, start=None) -> list:
    """The operands a chain's ops read that its composed expression no longer does (lost_operands):
    sympy cancels on construction ((x - c) - x is -c), which would turn the unfused graph's NaN into
    a number."""
    return [externals[k] for k in lost_operands(tuple(steps), len(externals), start)]


def report(unfused, fused, batch=None) -> dict:
    """The ledger of a fused graph with its byte counts (per example, or for `batch`)."""
    n = unfused.batch_symbol()
    bind = {n: batch if batch is not None else 1} if n is not None else {}

    def value(expr):
        v = sp.simplify(sp.sympify(expr).subs(bind))
        return int(v) if v.is_Integer else str(v)

    groups = [{"rule": d.rule, "anchor": d.anchor, "nodes": d.nodes, "fired": d.fired, "reason": d.reason,
               "into": d.into, "bytes_before": value(d.bytes_before), "bytes_after": value(d.bytes_after),
               **({"macs_before": value(d.macs_before), "macs_after": value(d.macs_after)}
                  if d.macs_before is not None else {})}
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
            note = d["reason"]
            if d["rule"] in ("conv_chain", "linear_chain", "matmul_chain") and note:
                rerouted, _, stop = note.rpartition(" is not saved; ")     # reroute_act_grad's note first
                note = (f"{rerouted} is not saved; " if rerouted else "") + (f"the chain stops: {stop}" if stop else "")
            if d["rule"] == "fold_batch_norm":
                note = "weight and bias folded from both layers' parameters"
            if d["rule"] == "eval_dropout":
                lines.append(f"  removed  {chain}  (eval mode: the identity; its users read {d['into']})")
                continue
            if "macs_before" in d:
                note = f"multiply-adds {d['macs_before']:,} -> {d['macs_after']:,}" if isinstance(
                    d["macs_before"], int) else f"multiply-adds {d['macs_before']} -> {d['macs_after']}"
            lines.append(f"  fused    {chain}  =>  {d['into']}   {b(d['bytes_before'])} -> {b(d['bytes_after'])}"
                         f"   [{d['rule']}]" + (f"\n           ({note})" if note else ""))
        else:
            lines.append(f"  refused  {d['anchor']}: {d['reason']}")
    lines.append(f"  total    {r['kernels_before']} kernels, {b(r['total_bytes_before'])}  ->  "
                 f"{r['kernels_after']} kernels, {b(r['total_bytes_after'])}")
    return "\n".join(lines)


def fuse(graph):
    """The default fusion passes on a graph built elsewhere (a Trainer's step graph), as the fused
    stages run them: what the kernel backends compile, one kernel per fused node."""
    from .passes import eliminate_dead_code
    for run in (drop_eval_dropout, fold_batch_norm, fuse_conv_chains, fuse_pointwise_chains):
        graph = run(graph)
    return eliminate_dead_code(graph)
