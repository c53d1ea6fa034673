"""Run a graphconv graph with torch.nn.functional, op by op: an independent implementation of
every op (PyTorch CPU), used where torch is installed."""
import warnings

import numpy as np

torch = None
try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - torch is optional
    pass


def _conv(node, x, w, b):
    nd = x.dim() - 2
    pad = node.attrs["padding"]
    mode = node.attrs["padding_mode"]
    conv = getattr(F, f"conv{nd}d")
    kw = dict(stride=node.attrs["stride"], dilation=node.attrs["dilation"], groups=node.attrs["groups"])
    if pad == "same" and mode == "zeros":
        with warnings.catch_warnings():  # torch warns that even kernels need a padded copy
            warnings.simplefilter("ignore", UserWarning)
            return conv(x, w, b, padding="same", **kw)
    if pad == "same":
        raise NotImplementedError
    flat = []
    for lo, hi in reversed(pad):
        flat += [lo, hi]
    if mode == "zeros" and all(lo == hi for lo, hi in pad):
        return conv(x, w, b, padding=tuple(lo for lo, _ in pad), **kw)
    torch_mode = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}[mode]
    return conv(F.pad(x, flat, mode=torch_mode), w, b, **kw)


def _pool(node, x):
    nd = x.dim() - 2
    mode = node.op.split("_")[0]
    pad = tuple(lo for lo, _ in node.attrs["padding"])
    a = node.attrs
    if mode == "max":
        return getattr(F, f"max_pool{nd}d")(x, a["kernel_size"], a["stride"], pad, a["dilation"], ceil_mode=a["ceil_mode"])
    extra = {"divisor_override": a["divisor_override"]} if a["divisor_override"] and nd > 1 else {}
    return getattr(F, f"avg_pool{nd}d")(x, a["kernel_size"], a["stride"], pad, ceil_mode=a["ceil_mode"],
                                        count_include_pad=a["count_include_pad"], **extra)


def run_torch(graph, inputs, params):
    """Every node's value, computed by torch (in float64 when the graph is float64)."""
    vals = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in {**inputs, **params}.items()}
    for node in graph.topo():
        if node.role == "op":
            vals[node.name] = eval_node(node, [vals[o] for o in graph.operands(node.name)])
    return {k: v.detach().numpy() for k, v in vals.items()}


def evaluate_into(graph, tensors):
    """Evaluate every op node of `graph` with torch, reading and filling `tensors` (name -> tensor),
    so that the caller's leaves can require gradients."""
    for node in graph.topo():
        if node.role == "op":
            tensors[node.name] = eval_node(node, [tensors[o] for o in graph.operands(node.name)])
    return tensors


def eval_node(node, xs):
    """One node of a graphconv graph, computed by torch.nn.functional."""
    a = node.attrs
    op = node.op
    if op.startswith("conv_transpose"):
        return getattr(F, op)(xs[0], xs[1], xs[2] if len(xs) > 2 else None, stride=a["stride"],
                              padding=tuple(lo for lo, _ in a["padding"]), output_padding=a["output_padding"],
                              groups=a["groups"], dilation=a["dilation"])
    if op.startswith("conv"):
        return _conv(node, xs[0], xs[1], xs[2] if len(xs) > 2 else None)
    if op.startswith("adaptive_"):
        return getattr(F, op)(xs[0], a["output_size"])
    if "_pool" in op:
        return _pool(node, xs[0])
    if op == "linear":
        return F.linear(xs[0], xs[1].T, xs[2] if len(xs) > 2 else None)
    if op == "batch_norm":
        w, b = (xs[3], xs[4]) if len(xs) == 5 else (None, None)
        return F.batch_norm(xs[0], xs[1].clone(), xs[2].clone(), w, b, a["training"], a["momentum"], a["eps"])
    if op == "relu":
        return F.relu(xs[0])
    if op == "leaky_relu":
        return F.leaky_relu(xs[0], a["negative_slope"])
    if op == "sigmoid":
        return torch.sigmoid(xs[0])
    if op == "tanh":
        return torch.tanh(xs[0])
    if op == "swish":
        return F.silu(xs[0])
    if op == "mish":
        return F.mish(xs[0])
    if op == "add":
        return xs[0] + xs[1]
    if op in ("mul", "sub"):
        rank = max(x.dim() for x in xs)
        if rank >= 2:                               # a per-channel operand, either one, lines up with dim 1
            xs = [x.reshape(1, -1, *[1] * (rank - 2)) if x.dim() == 1 else x for x in xs]
        return xs[0] * xs[1] if op == "mul" else xs[0] - xs[1]
    if op == "mean":
        dims = a["dim"] if a["dim"] is not None else tuple(range(xs[0].dim()))
        return torch.mean(xs[0], dim=dims, keepdim=a["keepdim"])
    if op == "upsample":
        kw = {} if a["mode"] == "nearest" else {"align_corners": a["align_corners"]}
        return F.interpolate(xs[0], size=a["size"], mode=a["mode"], **kw)
    if op == "dropout":
        if not a["training"] or a["p"] == 0:
            return F.dropout(xs[0], a["p"], training=False)
        raise NotImplementedError("dropout in training: PyTorch draws its own mask")
    if op == "softmax":
        return F.softmax(xs[0], dim=a["dim"])
    if op == "log_softmax":
        return F.log_softmax(xs[0], dim=a["dim"])
    if op == "concat":
        return torch.cat(xs, dim=a["dim"])
    if op == "flatten":
        return torch.flatten(xs[0], a["start_dim"], a["end_dim"])
    if op == "reshape":
        return xs[0].reshape(tuple(int(d) if str(d).lstrip("-").isdigit() else xs[0].shape[0] for d in a["shape"]))
    if op == "softmax_cross_entropy":
        return F.cross_entropy(xs[0], xs[1])
    if op == "hinge_loss":
        return F.multi_margin_loss(xs[0], xs[1], margin=a["margin"]) * xs[0].shape[1]
    raise NotImplementedError(op)
