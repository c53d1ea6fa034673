"""Fused ops: one node standing for a chain the fusion pass found, with the chain's semantics.

`fused_conv`: a convolution (+ bias), then an epilogue of elementwise ops applied to its output in
order (relu, any sympy activation, a residual add, a per-channel scale), then optionally a pooling
op. Its NumPy reference is literally the composition of the replaced ops' references, its shape rule
is theirs applied in turn, and its cost reads the operands once and writes the final output once:
the pre-activation and pre-pool tensors never exist in memory. That is the whole point.

Attributes, all plain values so that dumps and kernel names can print them:
  stride, padding, dilation, groups, padding_mode   the convolution's, normalised as conv{nd}d's
  bias       whether operand 2 is the conv's bias
  epilogue   ((op, ((attr, value), ...), refs), ...): refs name each operand of the op,
             -1 for the running value, k >= 0 for extra operand k (after input, weight, bias)
  pool       () or (op, ((attr, value), ...))
  save       "" for inference; in a training graph "argmax" (outputs: pooled, argmax codes) or
             "argmax_preact" (also the pre-activation at each argmax, for activations whose
             derivative cannot be read off the output): what the backward pass needs, in place of the
             full-size pre-pool tensors

`fused_linear`, `fused_matmul`: a linear layer (+ bias) or a matmul and an epilogue, as fused_conv
without the pool.

`pool_act_backward`: the matching backward node: the activation's derivative at each window's
argmax times the pooled gradient, routed to the argmax position; one node for max-pool backward
followed by the activation's gradient.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import sympy as sp

from ..errors import GraphError, OpError
from ..shapes import as_shape, fmt_shape, numel
from .base import OPS, REQUIRED, Cost, GradientOp, Op, TensorType, TupleType, as_bool, register
from .conv import Conv


SAVES = ("", "argmax", "argmax_preact")


def _items(attrs: dict) -> tuple:
    return tuple(sorted(attrs.items()))


def epilogue_step(op_name, attrs, refs) -> tuple:
    return (op_name, _items(attrs), tuple(refs))


def pool_spec(op_name, attrs) -> tuple:
    return (op_name, _items(attrs))


def check_epilogue(steps) -> tuple:
    """A fused node's epilogue, normalised: elementwise ops, each reading the running value once."""
    epilogue = []
    for op, items, refs in steps:
        if op not in OPS or OPS[op].kind != "elementwise":
            raise OpError(f"epilogue op {op!r} is not an elementwise op", kind=GraphError)
        epilogue.append(epilogue_step(op, OPS[op].check_attrs(dict(items)), refs))
    for op, items, refs in epilogue:
        if refs.count(-1) != 1:
            raise OpError(f"epilogue op {op} must read the running value exactly once, got refs {refs}",
                          kind=GraphError)
    n_external = 1 + max((r for _, _, refs in epilogue for r in refs), default=-1)
    lost = lost_operands(tuple(epilogue), n_external, Z)
    if lost:
        raise OpError(f"epilogue {', '.join(op for op, _, _ in epilogue)} cancels its operand(s) "
                      f"{', '.join(f'${k}' for k in lost)} algebraically (composed: {compose(epilogue, n_external, Z)}); "
                      f"an inf or NaN there would not come through: leave those ops out of the epilogue", kind=GraphError)
    return tuple(epilogue)


@register
class FusedConv(Op):
    name = "fused_conv"
    kind = "opaque"
    variadic = True
    attrs = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "padding_mode": "zeros", "bias": True,
             "epilogue": (), "pool": (), "save": "", "nd": REQUIRED}

    def conv(self, attrs) -> Conv:
        return OPS[f"conv{attrs['nd']}d"]

    def normalize(self, a):
        nd = a["nd"]
        if nd not in (1, 2, 3):
            raise OpError(f"nd must be 1, 2 or 3, got {nd!r}", kind=GraphError)
        conv = Conv(nd).normalize({k: a[k] for k in ("stride", "padding", "dilation", "groups", "padding_mode")})
        epilogue = check_epilogue(a["epilogue"])
        pool = tuple(a["pool"])
        if pool:
            op, items = pool
            if op not in OPS or OPS[op].kind != "window" or OPS[op].nd != nd or op.endswith("_backward"):
                raise OpError(f"pool {op!r} is not a {nd}-D pooling op", kind=GraphError)
            pool = pool_spec(op, OPS[op].check_attrs(dict(items)))
        save = a["save"]
        if save not in SAVES:
            raise OpError(f"save must be one of {SAVES}, got {save!r}", kind=GraphError)
        if save:
            if not pool or not pool[0].startswith("max_pool") or len(epilogue) != 1 or len(epilogue[0][2]) != 1:
                raise OpError("save needs exactly one one-operand activation followed by a max pool", kind=GraphError)
            if math.prod(dict(pool[1])["kernel_size"]) > 256:
                raise OpError("save: a pooling window over 256 elements does not fit a uint8 argmax code",
                              kind=GraphError)
        return {**conv, "bias": as_bool(a["bias"], "bias"), "epilogue": epilogue, "pool": pool, "save": save,
                "nd": nd}

    def split(self, xs, attrs):
        """(conv operands, extra epilogue operands)."""
        n = 3 if attrs["bias"] else 2
        return xs[:n], xs[n:]

    def conv_attrs(self, attrs):
        return {k: attrs[k] for k in ("stride", "padding", "dilation", "groups", "padding_mode")}

    def infer(self, ins, attrs):
        conv_ins, extra = self.split(ins, attrs)
        if len(conv_ins) < (3 if attrs.get("bias") else 2):
            raise OpError(f"{self.name} needs an input and a weight{', then a bias (bias=True)' if attrs.get('bias') else ''}"
                          f", got {len(ins)} operands", kind=GraphError)
        t = self.conv(attrs).infer(conv_ins, self.conv_attrs(attrs))
        for op, items, refs in attrs["epilogue"]:
            operands = [t if r == -1 else self._extra(extra, r) for r in refs]
            t = OPS[op].infer(operands, dict(items))
        if attrs.get("pool"):
            op, items = attrs["pool"]
            t = OPS[op].infer([t], dict(items))
        y = TensorType(tuple(t.shape), t.dtype)
        if not attrs.get("save"):
            return y
        parts = (y, TensorType(y.shape, "uint8")) + ((y,) if attrs["save"] == "argmax_preact" else ())
        return TupleType(parts)

    @staticmethod
    def _extra(extra, r):
        if r >= len(extra):
            raise OpError(f"the epilogue reads extra operand {r}, but only {len(extra)} are given", kind=GraphError)
        return extra[r]

    def operand_name(self, i):
        return ("input", "weight", "bias")[i] if i < 3 else f"operand {i}"

    def reference(self, xs, attrs):
        conv_xs, extra = self.split(xs, attrs)
        z = y = self.conv(attrs).reference(conv_xs, self.conv_attrs(attrs))
        for op, items, refs in attrs["epilogue"]:
            y = OPS[op].reference([y if r == -1 else extra[r] for r in refs], dict(items))
        if not attrs.get("pool"):
            return y
        op, items = attrs["pool"]
        pool, pool_attrs = OPS[op], dict(items)
        if not attrs["save"]:
            return pool.reference([y], pool_attrs)
        out_sp = pool.shape([TensorType(y.shape, str(y.dtype))], pool_attrs)[2:]
        pooled, codes = pool.max_with_argmax(y, pool_attrs, tuple(int(o) for o in out_sp))
        if attrs["save"] == "argmax":
            return pooled, codes
        return pooled, codes, pool.gather(z, codes, pool_attrs, tuple(int(o) for o in out_sp))

    def windows(self, in_types, attrs):
        conv_in, _ = self.split(in_types, attrs)
        out = [self.conv(attrs).window([t.shape for t in conv_in], self.conv_attrs(attrs))]
        if attrs.get("pool"):
            out.append(OPS[attrs["pool"][0]].window([], dict(attrs["pool"][1])))
        return out

    def grad(self, e, dy, needs):
        """Rematerialise: the replaced ops are emitted again (as backward nodes) from the fused node's
        operands, and each one's own gradient rule runs in reverse order. A training graph is fused
        after the backward pass instead (fuse_conv_chains), which keeps what the backward reads."""
        if e.attrs.get("save"):
            raise OpError("a fused node that saves argmax codes is already part of a training graph",
                          kind=GraphError)
        attrs, graph = e.attrs, e.graph
        conv_in, extra = self.split(e.inputs, attrs)
        chain = [e.emit(self.conv(attrs).name, conv_in, self.conv_attrs(attrs))]
        for op, items, refs in attrs["epilogue"]:
            chain.append(e.emit(op, [chain[-1] if r == -1 else extra[r] for r in refs], dict(items)))
        if attrs.get("pool"):
            chain.append(e.emit(attrs["pool"][0], [chain[-1]], dict(attrs["pool"][1])))
        inner = {t.name for t in chain}
        fused_operands = [t.name for t in e.inputs]
        first_index = {name: fused_operands.index(name) for name in fused_operands}
        wanted = {name for i, name in enumerate(fused_operands) if needs[i]}
        readers = {}                      # external operand -> how many recomputed nodes read it
        for t in chain:
            for o in graph.operands(t.name):
                if o not in inner and o in wanted:
                    readers[o] = readers.get(o, 0) + 1
        pending, parts = {chain[-1].name: dy}, {}
        for t in reversed(chain):
            operands = graph.operands(t.name)
            names, sub_needs = {}, []
            for j, o in enumerate(operands):
                sub_needs.append(o in inner or o in wanted)
                if o in inner:
                    names[j] = graph.unique_name(f"d{o}")
                elif o in wanted:
                    single = readers[o] == 1 and operands.count(o) == 1
                    names[j] = e.names[first_index[o]] if single else graph.unique_name(f"{e.names[first_index[o]]}.part")
            sub = type(e)(graph, graph.node(t.name), names)
            for o, r in zip(operands, OPS[graph.node(t.name).op].grad(sub, pending.pop(t.name), sub_needs)):
                if r is None:
                    continue
                if o in inner:
                    pending[o] = r
                else:
                    parts.setdefault(o, []).append(r)
        results = [None] * len(fused_operands)
        for name, contributions in parts.items():
            i = first_index[name]
            total = contributions[0]
            for k, part in enumerate(contributions[1:], 1):
                total = e.emit("add", [total, part], wrt=i if k == len(contributions) - 1 else None)
            results[i] = total
        return results

    def scratch_bytes(self, in_shapes, out_shape, attrs, itemsize):
        """The NumPy reference still builds the im2col columns and the pre-pool tensor."""
        conv_shapes, _ = self.split(in_shapes, attrs)
        conv = self.conv(attrs)
        w = conv_shapes[1]
        pre = list(in_shapes[0][:1]) + [w[0]] + [int(d) for d in conv.infer(
            [TensorType(tuple(s), "float32") for s in conv_shapes], self.conv_attrs(attrs)).shape[2:]]
        n = 1
        for d in pre:
            n *= int(d)
        return conv.scratch_bytes(conv_shapes, tuple(pre), self.conv_attrs(attrs), itemsize) + 2 * n * itemsize

    def macs(self, ins, out, attrs):
        conv_ins, _ = self.split(ins, attrs)
        conv_out = self.conv(attrs).infer(conv_ins, self.conv_attrs(attrs))
        return self.conv(attrs).macs(conv_ins, conv_out, self.conv_attrs(attrs))

    def cost(self, ins, out, attrs):
        c = super().cost(ins, out, attrs)
        conv_ins, _ = self.split(ins, attrs)
        params = sum((numel(t.shape) for t in conv_ins[1:]), 0)
        return Cost(params, c.macs, c.bytes_read, c.bytes_written)


@register
class FusedLinear(FusedConv):
    """linear (+ bias), then an epilogue of elementwise ops (fuse_conv_chains): the linear's GEMM
    applies the chain to each result before storing it. Operands: input, weight, [bias], the
    epilogue's extra operands. Attributes: bias, epilogue (as fused_conv's)."""
    name = "fused_linear"
    mixes_all = True
    attrs = {"bias": True, "epilogue": ()}

    def conv(self, attrs):
        return OPS["linear"]

    def conv_attrs(self, attrs):
        return {}

    def normalize(self, a):
        return {"bias": as_bool(a["bias"], "bias"), "epilogue": check_epilogue(a["epilogue"])}

    def windows(self, in_types, attrs):
        return []

    def scratch_bytes(self, in_shapes, out_shape, attrs, itemsize):
        """The NumPy reference builds the linear's output before the epilogue."""
        n = 1
        for d in out_shape:
            n *= int(d)
        return n * itemsize


@register
class FusedMatmul(FusedLinear):
    """matmul, then an epilogue of elementwise ops (fuse_conv_chains): in a training step, a linear
    layer's input gradient and the activation gradient that reads it (dy @ W^T, then relu_grad).
    Operands: a, b, the epilogue's extra operands. Attributes: transpose_a, transpose_b, epilogue."""
    name = "fused_matmul"
    attrs = {"transpose_a": False, "transpose_b": False, "epilogue": ()}

    def conv(self, attrs):
        return OPS["matmul"]

    def conv_attrs(self, attrs):
        return {"transpose_a": attrs["transpose_a"], "transpose_b": attrs["transpose_b"]}

    def normalize(self, a):
        return {"transpose_a": as_bool(a["transpose_a"], "transpose_a"),
                "transpose_b": as_bool(a["transpose_b"], "transpose_b"), "epilogue": check_epilogue(a["epilogue"])}

    def split(self, xs, attrs):
        return xs[:2], xs[2:]

    def operand_name(self, i):
        return ("a", "b")[i] if i < 2 else f"operand {i}"

    def cost(self, ins, out, attrs):
        return Op.cost(self, ins, out, attrs)


@register
class PoolActBackward(GradientOp):
    """dL/dz for z -> act -> max pool, from the pooled gradient, the argmax codes and `aux` (the
    pooled output when the derivative can be read off it, as for relu; else the pre-activation at
    each argmax): act'(z at argmax) * dy, routed to the argmax position. Operands (grad_output,
    argmax, aux); output [N, C, *input_size]."""
    name = "pool_act_backward"
    kind = "window"
    operands = ("grad_output", "argmax", "aux")
    attrs = {"act": REQUIRED, "pool": REQUIRED, "input_size": REQUIRED}

    def normalize(self, a):
        op, items = a["act"]
        if op not in OPS or OPS[op].kind != "elementwise" or len(OPS[op].operands) != 1:
            raise OpError(f"act {op!r} is not a one-operand activation", kind=GraphError)
        pool_op, pool_items = a["pool"]
        if not pool_op.startswith("max_pool") or pool_op.endswith("_backward"):
            raise OpError(f"pool {pool_op!r} is not a max pool", kind=GraphError)
        return {"act": (op, tuple(sorted(OPS[op].check_attrs(dict(items)).items()))),
                "pool": (pool_op, tuple(sorted(OPS[pool_op].check_attrs(dict(pool_items)).items()))),
                "input_size": as_shape(a["input_size"], "input_size")}

    def infer(self, ins, attrs):
        dy, codes, aux = ins
        if codes.dtype != "uint8" or tuple(codes.shape) != tuple(dy.shape) or tuple(aux.shape) != tuple(dy.shape):
            raise OpError(f"argmax u8 and aux must have the pooled gradient's shape {fmt_shape(dy.shape)}", 1)
        return TensorType((dy.shape[0], dy.shape[1], *attrs["input_size"]), dy.dtype)

    def reference(self, xs, attrs):
        dy, codes, aux = xs
        op, items = attrs["act"]
        g = OPS[op].derivative(0).reference([aux, dy], dict(items))
        pool_op, pool_items = attrs["pool"]
        return OPS[pool_op].route(g, codes, [int(d) for d in attrs["input_size"]], dict(pool_items))


@register
class FoldBatchNorm(Op):
    """An eval-mode batch norm folded into the convolution before it: from the conv's weight (and
    bias) and the batch norm's running statistics (and affine weight and bias), the weight and bias of
    one convolution computing both. scale = gamma / sqrt(var + eps); W' = W * scale per output
    channel; b' = (b - mean) * scale + beta. Operands: weight, [bias], running_mean, running_var,
    [bn_weight, bn_bias]; outputs (weight', bias')."""
    name = "fold_batch_norm"
    kind = "injective"
    variadic = True
    attrs = {"eps": REQUIRED, "conv_bias": REQUIRED, "affine": REQUIRED}

    def normalize(self, a):
        from .base import as_float
        return {"eps": as_float(a["eps"], "eps", positive=True), "conv_bias": as_bool(a["conv_bias"], "conv_bias"),
                "affine": as_bool(a["affine"], "affine")}

    def split(self, xs, attrs):
        w, rest = xs[0], list(xs[1:])
        b = rest.pop(0) if attrs["conv_bias"] else None
        mean, var = rest[0], rest[1]
        gamma, beta = (rest[2], rest[3]) if attrs["affine"] else (None, None)
        return w, b, mean, var, gamma, beta

    def infer(self, ins, attrs):
        want = 3 + attrs["conv_bias"] + 2 * attrs["affine"]
        if len(ins) != want:
            raise OpError(f"fold_batch_norm takes {want} operands here, got {len(ins)}", kind=GraphError)
        w = ins[0]
        c = w.shape[0]
        for i, t in enumerate(ins[1:], 1):
            if len(t.shape) != 1 or t.shape[0] != c:
                raise OpError(f"operand {i} must have shape [{c}] (one value per output channel), got "
                              f"{fmt_shape(t.shape)}", i)
        return TupleType((w, TensorType((c,), w.dtype)))

    def reference(self, xs, attrs):
        w, b, mean, var, gamma, beta = self.split(xs, attrs)
        scale = 1 / np.sqrt(var + w.dtype.type(attrs["eps"]))
        if gamma is not None:
            scale = gamma * scale
        bias = (-mean if b is None else b - mean) * scale
        if beta is not None:
            bias = bias + beta
        return (w * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype), bias.astype(w.dtype)


@register
class FusedPointwise(Op):
    """A chain of elementwise ops as one: the composition of their sympy expressions, over operands
    a0, a1, ... (`expr` is its text, parsed back with the same functions). The NumPy reference is
    the lambdified composition and code generation prints it as one C expression; the gradient is
    sympy's derivative of the composition, another fused_pointwise."""
    name = "fused_pointwise"
    kind = "elementwise"
    variadic = True
    attrs = {"expr": REQUIRED}
    _cache: dict = {}

    @staticmethod
    def symbols(n):
        return tuple(sp.Symbol(f"a{i}", real=True) for i in range(n))

    def impl(self, expr_text, n):
        """The Pointwise op of this expression (not registered: it lives in this node's attributes)."""
        key = (expr_text, n)
        if key not in self._cache:
            from .pointwise import Pointwise, sigmoid, softplus
            names = {f"a{i}": s for i, s in enumerate(self.symbols(n))}
            try:
                expr = sp.sympify(expr_text, locals={**names, "sigmoid": sigmoid, "softplus": softplus})
            except (sp.SympifyError, SyntaxError, TypeError) as e:
                raise OpError(f"expr {expr_text!r} is not a sympy expression ({e})", kind=GraphError) from None
            self._cache[key] = Pointwise("fused_pointwise", expr, tuple(names))
        return self._cache[key]

    def normalize(self, a):
        if not isinstance(a["expr"], str):
            raise OpError(f"expr must be the text of a sympy expression, got {a['expr']!r}", kind=GraphError)
        return {"expr": a["expr"]}

    def infer(self, ins, attrs):
        op = self.impl(attrs["expr"], len(ins))
        return op.infer(ins, {})

    def reference(self, xs, attrs):
        return self.impl(attrs["expr"], len(xs)).reference(xs, {})

    def grad(self, e, dy, needs):
        from .pointwise import broadcast_axes
        n = len(e.inputs)
        op = self.impl(e.attrs["expr"], n)
        full = e.output.shape
        grads = []
        for i, need in enumerate(needs):
            if not need:
                grads.append(None)
                continue
            derivative = op.derivative(i, register_it=False).expr.subs(sp.Symbol("dy", real=True),
                                                                           sp.Symbol(f"a{n}", real=True))
            args = ([*e.inputs, dy], {"expr": str(derivative)})
            axes = broadcast_axes(e.inputs[i].shape, full)
            if axes is None:
                grads.append(e.emit("fused_pointwise", *args, wrt=i))
                continue
            whole = e.emit("fused_pointwise", *args)
            grads.append(e.emit("reduce_sum", [whole], {"axes": axes}, wrt=i))
        return grads


def compose(steps, n_external, start=None):
    """The expression of a chain of elementwise ops over external operands a0..a{n-1}: steps are
    (op, attrs, refs) as in an epilogue, refs naming the running value (-1) or external operand k.
    The first step reads `start` as its running value (an epilogue's z), or only external operands."""
    symbols = FusedPointwise.symbols(n_external)
    value = start
    for op_name, attrs, refs in steps:
        args = [value if r == -1 else symbols[r] for r in refs]
        value = expression_of(op_name, dict(attrs), args)
    return value


Z = sp.Symbol("z", real=True)     # an epilogue's running value: the conv's, linear's or matmul's result


def lost_operands(steps, n_external, start=None) -> list:
    """The external operands (indices) a chain's ops read, each op's own expression using them,
    that the composed expression no longer does: sympy cancels on construction ((z + s) - s is z),
    which would turn the unfused graph's inf or NaN in s into a number, and a huge s's rounding
    into none."""
    expr = compose(steps, n_external, start)
    symbols = FusedPointwise.symbols(n_external)
    read = set()
    for op_name, attrs, refs in steps:
        own = [sp.Symbol(f"_arg{i}", real=True) for i in range(len(refs))]
        used = expression_of(op_name, dict(attrs), own).free_symbols
        read |= {refs[i] for i in range(len(refs)) if refs[i] != -1 and own[i] in used}
    return [k for k in sorted(read) if symbols[k] not in expr.free_symbols]


def expression_of(op_name, attrs, args):
    """The sympy expression an elementwise op computes from argument expressions (memoized: sympy's
    substitution is most of a program's build time, and a program composes the same ops many times)."""
    try:
        return _expression_memo(op_name, tuple(sorted(attrs.items())), tuple(args))
    except TypeError:       # an unhashable attribute
        return _expression_of(op_name, attrs, args)


@functools.lru_cache(maxsize=4096)
def _expression_memo(op_name, attr_items, args):
    return _expression_of(op_name, dict(attr_items), list(args))


def _expression_of(op_name, attrs, args):
    op = OPS[op_name]
    if op_name == "add":
        return args[0] + args[1]
    if op_name == "fused_pointwise":
        inner = op.impl(attrs["expr"], len(args))
        return inner.expr.subs(dict(zip(inner.symbols, args)), simultaneous=True)
    subs = dict(zip(op.symbols, args))
    subs.update({s: sp.Float(attrs[str(s)]) for s in op.param_symbols})
    return op.expr.subs(subs, simultaneous=True)


@register
class ComposeConvWeights(Op):
    """Two stacked convolutions with nothing between them are one convolution (the lecture: a
    stack of convolutions is a convolution). conv2(conv1(x)) reads x at offsets j*d2*s1 + k*d1, so
    the composed kernel spans d1(K1-1) + s1*d2(K2-1) + 1 per axis, with stride s1*s2:
        W[o, i, t] = sum over m and j*d2*s1 + k*d1 = t of W2[o, m, j] W1[m, i, k]
        b[o]       = b2[o] + sum over m, j of W2[o, m, j] b1[m]
    Operands: w1, [b1], w2, [b2]; outputs (W, b). Exact only where conv2 does not pad (its zeros are
    not conv1's output) and neither is grouped: the fusion pass checks that."""
    name = "compose_conv_weights"
    kind = "injective"
    variadic = True
    attrs = {"stride1": REQUIRED, "dilation1": REQUIRED, "dilation2": REQUIRED, "bias1": REQUIRED,
             "bias2": REQUIRED}

    def normalize(self, a):
        return {"stride1": tuple(int(v) for v in a["stride1"]), "dilation1": tuple(int(v) for v in a["dilation1"]),
                "dilation2": tuple(int(v) for v in a["dilation2"]), "bias1": as_bool(a["bias1"], "bias1"),
                "bias2": as_bool(a["bias2"], "bias2")}

    def split(self, xs, attrs):
        rest = list(xs)
        w1 = rest.pop(0)
        b1 = rest.pop(0) if attrs["bias1"] else None
        w2 = rest.pop(0)
        b2 = rest.pop(0) if attrs["bias2"] else None
        return w1, b1, w2, b2

    def kernel(self, k1, k2, attrs):
        return tuple(d1 * (a - 1) + s1 * d2 * (b - 1) + 1 for a, b, s1, d1, d2 in
                     zip(k1, k2, attrs["stride1"], attrs["dilation1"], attrs["dilation2"]))

    def infer(self, ins, attrs):
        if len(ins) != 2 + attrs["bias1"] + attrs["bias2"]:
            raise OpError(f"compose_conv_weights takes {2 + attrs['bias1'] + attrs['bias2']} operands here, "
                          f"got {len(ins)}", kind=GraphError)
        w1, _, w2, _ = self.split(ins, attrs)
        if w2.shape[1] != w1.shape[0]:
            raise OpError(f"conv2 expects {w2.shape[1]} channels, conv1 gives {w1.shape[0]}", 1)
        k = self.kernel([int(d) for d in w1.shape[2:]], [int(d) for d in w2.shape[2:]], attrs)
        return TupleType((TensorType((w2.shape[0], w1.shape[1], *[sp.Integer(v) for v in k]), w1.dtype),
                          TensorType((w2.shape[0],), w1.dtype)))

    def reference(self, xs, attrs):
        w1, b1, w2, b2 = self.split(xs, attrs)
        k = self.kernel(w1.shape[2:], w2.shape[2:], attrs)
        out = np.zeros((w2.shape[0], w1.shape[1], *k), w1.dtype)
        for j in np.ndindex(*w2.shape[2:]):
            part = np.tensordot(w2[(slice(None), slice(None)) + j], w1, axes=(1, 0))        # O, I, K1...
            start = [jj * d2 * s1 for jj, d2, s1 in zip(j, attrs["dilation2"], attrs["stride1"])]
            index = tuple(slice(st, st + d1 * (kk - 1) + 1, d1)
                          for st, d1, kk in zip(start, attrs["dilation1"], w1.shape[2:]))
            out[(slice(None), slice(None)) + index] += part
        bias = np.zeros(w2.shape[0], w1.dtype) if b2 is None else b2.copy()
        if b1 is not None:
            bias += w2.sum(axis=tuple(range(2, w2.ndim))) @ b1
        return out, bias.astype(w1.dtype)
