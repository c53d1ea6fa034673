"""Weights in and out: a training checkpoint or a plain weights file into any graph of the same model
(forward, fused, eval mode), predictions with them, and PyTorch state dicts both ways.

A plain weights file (`graphconv export`, `save_weights`) is an .npz whose keys are the graph's
parameter and buffer names (`conv1.weight`, `bn1.running_mean`, ...); a checkpoint (`graphconv
train --save`) holds the same under `state/` plus the optimizer's state and `meta/`. Loading either
keeps what the graph needs and drops the optimizer's state; every other name must match.
"""
from __future__ import annotations

import os

import numpy as np

from .checkpoint import all_finite, check_state, negative_state, read_checkpoint, write_npz
from .errors import CheckpointError, GraphConvError, GraphError, InputError
from .ops.dropout import STEP_BUFFER
from .params import init_params, need_graph

OPTIMIZER_SUFFIXES = (".adam_m", ".adam_v", ".velocity")


def image_input(graph):
    """The name of the model's one float input (the images a Trainer feeds)."""
    floats = [n.name for n in graph.inputs if n.dtype != "int64"]
    if len(floats) != 1:
        found = ", ".join(floats) if floats else "none"
        raise GraphError(f"{graph.name}: training needs exactly one float input (the examples), found {found}")
    return floats[0]



def is_optimizer_state(name: str) -> bool:
    return name in ("opt.step", "opt.lr") or name.endswith(OPTIMIZER_SUFFIXES)


def read_weights(path) -> dict:
    """name -> array from a checkpoint (its state, optimizer state dropped) or a plain weights file."""
    ckpt = read_checkpoint(path, plain_ok=True)
    return {k: v for k, v in ckpt.state.items() if not is_optimizer_state(k)}


def weights_for(graph, weights: dict, where="weights") -> dict:
    """The parameters and buffers `graph` needs, from `weights`, checked by name, shape and dtype."""
    need_graph(graph, "load_weights")
    wanted = {n.name for n in graph.params}
    if any(is_optimizer_state(n) for n in wanted):
        raise CheckpointError(f"{where}: {graph.name} is a training-step graph (it holds the optimizer's state); "
                              f"weights go into forward, fused or eval graphs; resume training with Trainer.load "
                              f"or graphconv train --resume")
    extra = sorted(k for k in weights if k not in wanted)
    if extra:
        raise CheckpointError(f"{where}: {extra[0]}: {graph.name} has no parameter or buffer of that name "
                              f"(weights of another model?)")
    dtypes = sorted({str(v.dtype) for v in weights.values()})
    if len(dtypes) > 1:
        raise CheckpointError(f"{where}: holds weights of several float types ({', '.join(dtypes)}); a model's "
                              f"weights share one")
    if dtypes and dtypes != [graph.dtype]:
        hint = (f"build it in {dtypes[0]} (--dtype {dtypes[0]})" if dtypes[0] in ("float32", "float64") else
                f"convert them to {graph.dtype}")
        raise CheckpointError(f"{where}: holds {dtypes[0]} weights and {graph.name} computes in {graph.dtype}; "
                              f"{hint}")
    missing = [n for n in RUNTIME_STATE if n in wanted and n not in weights]
    if missing:          # weights from elsewhere (PyTorch, an older file): the run-time state starts fresh
        weights = {**{n: v for n, v in init_params(graph).items() if n in missing}, **weights}
    return check_state(where, weights, graph)


def load_weights(path, graph) -> dict:
    """The parameters and buffers of `graph` from a checkpoint or weights file."""
    need_graph(graph, "load_weights")
    return weights_for(graph, read_weights(path), os.fspath(path))


def save_weights(path, params: dict):
    """A plain weights file: one array per parameter or buffer name, nothing else."""
    if not isinstance(params, dict) or not params or not all(isinstance(k, str) for k in params):
        raise InputError(f"save_weights: params is a non-empty dict of name -> array, got {type(params).__name__}"
                         f"{' (empty)' if isinstance(params, dict) and not params else ''}")
    for name, value in params.items():
        if is_optimizer_state(name):
            continue
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            raise InputError(f"{name}: weights are float arrays, got {type(value).__name__}")
        if not all_finite(value):
            raise CheckpointError(f"{path}: not written: {name} holds NaN or infinite values")
    write_npz(path, {k: v for k, v in params.items() if not is_optimizer_state(k)})


def program_for(graph, backend="numpy", tf32=False, winograd=False):
    """`graph` compiled for a backend the way training and prediction run it: the graph itself on
    numpy, its fused form (one kernel per fused node) on the kernel backends."""
    from . import compile as gc_compile
    if backend != "numpy":
        from .fusion import fuse
        graph = fuse(graph)
    return gc_compile(graph, backend=backend, tf32=tf32, winograd=winograd)


def predict(graph, params, x, backend="numpy", batch=256, program=None):
    """(class per example, scores) of `graph` (eval mode: running statistics) on `x`, `batch` rows at
    a time. `program`: a compiled eval-mode program of the graph to reuse."""
    from .passes import set_training
    need_graph(graph, "predict")
    if not isinstance(x, np.ndarray) or x.ndim < 1 or len(x) == 0:
        raise InputError(f"predict: x must be a non-empty numpy array with one row per example, got "
                         f"{type(x).__name__}{list(np.shape(x))}")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch <= 0:
        raise InputError(f"predict: batch must be a positive integer, got {batch!r}")
    if x.dtype.kind == "f" and not all_finite(x):
        raise InputError(f"predict: {int(x.size - np.isfinite(x).sum())} of {x.size} input values are NaN or "
                         f"infinite; nothing was predicted")
    bad = [k for k, v in (params or {}).items() if isinstance(v, np.ndarray) and v.dtype.kind == "f" and not all_finite(v)]
    if bad:
        raise InputError(f"predict: {bad[0]}: holds NaN or infinite values")
    negative = [negative_state(k, v) for k, v in (params or {}).items() if negative_state(k, v)]
    if negative:
        raise InputError(f"predict: {negative[0]}")
    output = graph.outputs[0] if graph.outputs else None
    shape = graph.node(output).shape if output else ()
    if len(shape) < 2 or any(d != 1 for d in shape[2:]):
        raise GraphError(f"predict: {graph.name}'s first output {output} is {list(shape)}; predicting takes class "
                         f"scores [N, classes] (or [N, classes, 1, ...] after a global pool)")
    if program is None:
        program = program_for(set_training(graph, False), backend)
    name = image_input(graph)
    with np.errstate(over="ignore", invalid="ignore"):      # an overflow is reported below, by name
        scores = np.concatenate([program.run({name: x[i:i + batch]}, params)[output]
                                 for i in range(0, len(x), batch)])
    scores = scores.reshape(len(x), -1)
    if scores.dtype.kind == "f" and not all_finite(scores):
        rows = int((~np.isfinite(scores)).any(axis=1).sum())
        raise InputError(f"predict: {graph.name} gave NaN or infinite scores for {rows} of {len(x)} examples (finite "
                         f"inputs and weights, but too large for {scores.dtype}: the layers overflow); nothing was "
                         f"predicted")
    return scores.argmax(axis=1), scores


def confusion(labels, predicted, classes) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((classes, classes), np.int64)
    np.add.at(counts, (labels, predicted), 1)
    return counts


# ---- PyTorch state dicts ------------------------------------------------------------------------------
# graphconv's own run-time state, which no PyTorch module holds: dropout's step counter (its masks
# are graphconv's, so a PyTorch state dict neither has nor needs it); it starts at its initial value
RUNTIME_STATE = (STEP_BUFFER,)


def _layers(graph):
    """[(layer prefix, op of the node using its weight, [param names])] in graph order, without the
    run-time state."""
    users = {}
    for node in graph.topo():
        if node.role == "op":
            for operand in graph.operands(node.name):
                users.setdefault(operand, node.op)
    layers, index = [], {}
    for p in graph.params:
        if p.name in RUNTIME_STATE:
            continue
        prefix = p.name.rsplit(".", 1)[0] if "." in p.name else ""
        if prefix not in index:
            index[prefix] = len(layers)
            layers.append((prefix, users.get(p.name), []))
        layers[index[prefix]][2].append(p.name)
    return [(prefix, next((users.get(n) for n in names if n.endswith(".weight")), op), names)
            for prefix, op, names in layers]


def _numpy(value, key="a state dict value"):
    if hasattr(value, "detach"):                     # a torch tensor; torch itself stays optional
        if getattr(value, "is_meta", False):
            raise InputError(f"{key}: a tensor on the meta device holds no values (a model built with "
                             f"device='meta'); load its real weights first")
        value = value.detach().cpu()
        if getattr(value, "is_sparse", False) or str(getattr(value, "layout", "torch.strided")) != "torch.strided":
            value = value.to_dense()                 # a sparse weight: its dense values, as PyTorch would use them
        if str(value.dtype) == "torch.bfloat16":     # NumPy has no bfloat16: widened exactly to float32, then cast
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _torch_modules(state_dict):
    """[(module prefix, {suffix: key})] in the state dict's order, without BN's num_batches_tracked."""
    modules, index = [], {}
    for key in state_dict:
        if not isinstance(key, str):
            raise InputError(f"a state dict's keys are parameter names (strings), got {key!r}")
        if key.endswith("num_batches_tracked"):
            continue
        prefix, suffix = key.rsplit(".", 1) if "." in key else ("", key)
        if prefix not in index:
            index[prefix] = len(modules)
            modules.append((prefix, {}))
        modules[index[prefix]][1][suffix] = key
    return modules


def _match(graph, state_dict):
    """graphconv name -> (torch key, transposed) for every parameter and buffer: by layer name where
    every graphconv layer has a PyTorch module of its name, else by order of the layers."""
    return _mapping(graph, _pairs(graph, state_dict))


def _pairs(graph, state_dict):
    """[((layer prefix, op, [param names]), {suffix: torch key}, torch module prefix)]: each graphconv
    layer with parameters and its PyTorch module, by name where every layer has a module of its name,
    else by order."""
    ours, theirs = _layers(graph), _torch_modules(state_dict)
    by_name = {prefix: suffixes for prefix, suffixes in theirs}
    if all(prefix in by_name for prefix, _, _ in ours):
        pairs = [(layer, by_name[layer[0]], layer[0]) for layer in ours]
        unclaimed = [prefix for prefix, _ in theirs if prefix not in {p for p, _, _ in ours}]
        if unclaimed:                # a layer graphconv's graph does not have: its outputs would differ
            raise GraphConvError(f"the state dict's module {unclaimed[0]} has no layer of that name in {graph.name} "
                                 f"(its layers: {', '.join(p for p, _, _ in ours)})")
    elif len(ours) == len(theirs):
        pairs = [(layer, suffixes, prefix) for layer, (prefix, suffixes) in zip(ours, theirs)]
    else:
        raise GraphConvError(f"{graph.name} has {len(ours)} layers with parameters "
                             f"({', '.join(p for p, _, _ in ours)}) and the state dict {len(theirs)} modules "
                             f"({', '.join(p or '(root)' for p, _ in theirs)}): neither their names nor their "
                             f"count match")
    return pairs


def _mapping(graph, pairs):
    mapping = {}
    for (prefix, op, names), suffixes, torch_prefix in pairs:
        mine = {name.rsplit(".", 1)[-1]: name for name in names}
        for suffix, name in mine.items():
            if suffix not in suffixes:
                raise GraphConvError(f"{name}: the PyTorch module {torch_prefix or '(root)'} has no {suffix} "
                                     f"(it has {', '.join(sorted(suffixes))})")
            mapping[name] = (suffixes[suffix], op in ("linear", "fused_linear") and suffix == "weight")
        extra = sorted(set(suffixes) - set(mine))
        if extra:         # e.g. a conv bias graphconv's layer was built without: dropping it would change outputs
            raise GraphConvError(f"{prefix}: PyTorch's {suffixes[extra[0]]} has no counterpart in {graph.name}'s "
                                 f"{prefix} (it has {', '.join(sorted(mine))})")
    return mapping


# graphconv's layer ops and the PyTorch module classes whose parameters they take
TORCH_CLASSES = {"conv1d": ("Conv1d",), "conv2d": ("Conv2d",), "conv3d": ("Conv3d",),
                 "conv_transpose1d": ("ConvTranspose1d",), "conv_transpose2d": ("ConvTranspose2d",),
                 "conv_transpose3d": ("ConvTranspose3d",), "linear": ("Linear",), "fused_linear": ("Linear",),
                 "fused_conv": ("Conv1d", "Conv2d", "Conv3d"),
                 "batch_norm": ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")}


def _check_module_types(graph, module, mapping):
    """Given a module (not only its state dict): each parameter's PyTorch layer is of the kind of the
    graphconv layer that reads it (a ConvTranspose2d's weight has a Conv2d's shape when the channels
    agree, and would load silently into a conv2d)."""
    for node in graph.params:
        if node.name not in mapping or not hasattr(module, "get_submodule"):
            continue
        key = mapping[node.name][0]
        prefix = key.rsplit(".", 1)[0] if "." in key else ""
        try:
            sub = module.get_submodule(prefix)
        except (AttributeError, TypeError):
            continue
        classes = {c.__name__ for c in type(sub).__mro__}
        for user, _ in graph.users(node.name):
            wanted = TORCH_CLASSES.get(graph.node(user).op)
            if wanted and not classes & set(wanted):
                layer = graph.node(user).layer or user
                raise GraphConvError(f"{layer}: PyTorch's {key} belongs to a {type(sub).__name__}, where {graph.name}'s "
                                     f"{layer} is a {graph.node(user).op} (a {' or '.join(wanted)} in PyTorch)")


# the settings of a layer that change its result, compared when a module (not only its state dict) is
# loaded: per kind, graphconv's op names and PyTorch's classes
_CONV_OPS = ("conv1d", "conv2d", "conv3d", "fused_conv")
_KINDS = (("conv", _CONV_OPS, ("Conv1d", "Conv2d", "Conv3d")),
          ("conv_transpose", ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"),
           ("ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")),
          ("linear", ("linear", "fused_linear"), ("Linear",)),
          ("batch_norm", ("batch_norm", "fold_batch_norm"), ("_BatchNorm", "SyncBatchNorm")))


def _show(value):
    """A setting as PyTorch writes it: padding pairs with equal sides as one int per axis."""
    if isinstance(value, tuple) and value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        return str(tuple(lo for lo, _ in value)) if all(lo == hi for lo, hi in value) else str(value)
    return repr(value)


def _conv_settings(node, weight_shape, transposed):
    """A graphconv conv node's settings, PyTorch's names, padding as (lo, hi) pairs."""
    from .ops.window import resolve_same
    kernel = tuple(int(d) for d in weight_shape[2:])
    attrs = node.attrs
    out = {"kernel_size": kernel, "stride": tuple(attrs["stride"]),
           "padding": tuple(tuple(p) for p in resolve_same(attrs["padding"], kernel, attrs["dilation"])),
           "dilation": tuple(attrs["dilation"]), "groups": int(attrs["groups"])}
    if transposed:
        out["output_padding"] = tuple(attrs.get("output_padding", (0,) * len(kernel)))
    else:
        out["padding_mode"] = attrs.get("padding_mode", "zeros")
    return out


def _torch_conv_settings(sub, transposed):
    from .ops.window import resolve_same
    kernel = tuple(int(k) for k in sub.kernel_size)
    padding = sub.padding
    if isinstance(padding, str):
        padding = ((0, 0),) * len(kernel) if padding == "valid" else resolve_same("same", kernel, sub.dilation)
    else:
        padding = tuple((int(p), int(p)) for p in padding)
    out = {"kernel_size": kernel, "stride": tuple(int(v) for v in sub.stride), "padding": tuple(padding),
           "dilation": tuple(int(v) for v in sub.dilation), "groups": int(sub.groups)}
    if transposed:
        out["output_padding"] = tuple(int(v) for v in sub.output_padding)
    else:
        out["padding_mode"] = sub.padding_mode
    return out


def _check_module_settings(graph, module, pairs):
    """Given a module (not only its state dict): each layer's settings that change its result
    (conv: kernel size, stride, padding, dilation, groups, padding mode, output padding; linear: in and
    out features; batch norm: eps, momentum, affine) must be the graphconv layer's; a Conv2d with
    padding_mode="reflect" loaded into a conv that pads with zeros would give other numbers silently.
    A module of another kind is left to _check_module_types."""
    if not hasattr(module, "get_submodule"):
        return
    for (prefix, _, names), _, torch_prefix in pairs:
        try:
            sub = module.get_submodule(torch_prefix)
        except (AttributeError, TypeError):
            continue
        classes = {c.__name__ for c in type(sub).__mro__}
        users = {}          # the layer's nodes: its parameters' users, and (a fused graph) its fused node
        for name in names:
            for user, _ in graph.users(name):
                users.setdefault(graph.node(user).op, graph.node(user))
        for node in graph.topo():
            if node.role == "op" and node.layer == prefix:
                users.setdefault(node.op, node)
        for kind, ops, torch_classes in _KINDS:
            node = next((users[op] for op in ops if op in users), None)
            if node is not None and classes & set(torch_classes):
                break
        else:
            continue
        weight = f"{prefix}.weight" if prefix else "weight"
        shape = tuple(int(d) for d in graph.node(weight).shape) if weight in graph else None
        if kind in ("conv", "conv_transpose"):
            ours = _conv_settings(node, shape, kind == "conv_transpose")
            theirs = _torch_conv_settings(sub, kind == "conv_transpose")
        elif kind == "linear":
            ours = {"in_features": shape[0], "out_features": shape[1]}
            theirs = {"in_features": int(sub.in_features), "out_features": int(sub.out_features)}
        else:
            ours = {"eps": float(node.attrs["eps"]), "affine": shape is not None}
            theirs = {"eps": float(sub.eps), "affine": bool(sub.affine)}
            if "momentum" in node.attrs:
                ours["momentum"] = float(node.attrs["momentum"])
                theirs["momentum"] = None if sub.momentum is None else float(sub.momentum)
        for key, value in ours.items():
            other = theirs[key]
            same = (other is not None and abs(value - other) <= 1e-12 * max(abs(value), abs(other))
                    if isinstance(value, float) and not isinstance(value, bool) else value == other)
            if not same:
                layer = node.layer or prefix
                raise GraphConvError(f"{layer}: {key} differs: {graph.name}'s {layer} has {key}={_show(value)}, "
                                     f"PyTorch's {torch_prefix or '(root)'} ({type(sub).__name__}) has "
                                     f"{key}={_show(other)}; its outputs would differ (build the layer with "
                                     f"PyTorch's setting, or load a module that matches)")


def load_state_dict(graph, state_dict) -> dict:
    """graphconv parameters from a PyTorch state dict (or module) of the same architecture, tensors or
    arrays: names mapped by layer name, else by layer order; linear weights transposed (PyTorch stores
    [out, in], graphconv [in, out]); shapes checked, values finite floats, cast to the graph's dtype.
    Given a module, each layer's kind and the settings that change its result are checked too."""
    need_graph(graph, "load_state_dict")
    module = None
    if hasattr(state_dict, "state_dict") and callable(state_dict.state_dict):
        module, state_dict = state_dict, state_dict.state_dict()      # a module: its state dict, its layers' types
    if not hasattr(state_dict, "keys"):
        raise InputError(f"load_state_dict: takes a state dict (module.state_dict()), got {type(state_dict).__name__}")
    pairs = _pairs(graph, state_dict)
    if module is not None:
        _check_module_settings(graph, module, pairs)     # before the parameters: an affine=False BN has none
    mapping = _mapping(graph, pairs)
    if module is not None:
        _check_module_types(graph, module, mapping)
    params = {n: v for n, v in init_params(graph).items() if n in RUNTIME_STATE}
    for node in graph.params:
        if node.name in RUNTIME_STATE:
            continue
        key, transposed = mapping[node.name]
        value = _numpy(state_dict[key], key)
        if value.dtype.kind != "f" or not all_finite(value):
            raise GraphConvError(f"{node.name}: PyTorch's {key} holds "
                                 f"{'NaN or infinite values' if value.dtype.kind == 'f' else str(value.dtype) + ' values'}"
                                 f"; weights are finite floats")
        value = value.T if transposed else value
        shape = tuple(int(d) for d in node.shape)
        if value.shape != shape:
            raise GraphConvError(f"{node.name}: PyTorch's {key} has shape {list(value.shape)}"
                                 f"{' (transposed)' if transposed else ''}, {graph.name} needs {list(shape)}")
        with np.errstate(over="ignore"):
            cast = np.ascontiguousarray(value, dtype=node.dtype)
        if not all_finite(cast):
            raise GraphConvError(f"{node.name}: PyTorch's {key} holds values too large for {node.dtype} "
                                 f"(largest magnitude {float(np.abs(value).max()):.3g}); weights are finite floats")
        if negative_state(node.name, value):
            raise GraphConvError(f"PyTorch's {key} -> {negative_state(node.name, value)}")
        params[node.name] = cast
    return params


def state_dict(graph, params, like=None) -> dict:
    """A PyTorch state dict of graphconv parameters: graphconv's names, or the names of `like` (a
    torch module or its state dict, mapped as load_state_dict maps), linear weights transposed.
    Values are NumPy arrays, or torch tensors when `like` is given."""
    need_graph(graph, "state_dict")
    missing = [n.name for n in graph.params
               if n.name not in RUNTIME_STATE and (not isinstance(params, dict) or n.name not in params)]
    if missing:
        raise InputError(f"state_dict: {missing[0]}: missing from params (gc.init_params(graph) or "
                         f"gc.load_weights(path, graph) give them all)")
    if like is None:
        return {name: (params[name].T.copy() if transposed else params[name].copy())
                for name, (_, transposed) in _match(graph, {n.name: None for n in graph.params
                                                            if n.name not in RUNTIME_STATE}).items()}
    reference = like.state_dict() if hasattr(like, "state_dict") else like
    import torch
    out = {}
    for name, (key, transposed) in _match(graph, reference).items():
        value = np.ascontiguousarray(params[name].T if transposed else params[name])
        out[key] = torch.from_numpy(value.copy()).to(reference[key].dtype)
    return out
