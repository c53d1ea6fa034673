"""Training as graphs: one training step is one graph computing the loss, the gradients, the batch
norm running statistics and the optimizer's parameter updates. `Trainer` runs it on a backend,
keeps the state (parameters and optimizer buffers) and saves it atomically.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from .autodiff import derive_backward
from .errors import GraphConvError, GraphError
from .params import init_params
from .shapes import fmt_shape
from .passes import set_training

LOSSES = {"cross_entropy": "cross_entropy", "hinge": "hinge_loss"}


def attach_loss(graph, kind="cross_entropy", target="y"):
    """The graph with an int64 class-index input `target` and a scalar loss on its first output
    (flattened if needed). Outputs: (loss, scores)."""
    if kind not in LOSSES:
        raise GraphError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    g = graph.copy()
    if not g.outputs:
        raise GraphError(f"{g.name}: no outputs to put a loss on; mark the class scores with g.output(...)")
    scores = g.outputs[0]
    shape = g.node(scores).shape
    if len(shape) < 2 or any(d != 1 for d in shape[2:]):
        raise GraphError(f"{g.name}: a loss needs class scores [N, classes], but the output {scores} is "
                         f"{fmt_shape(shape)}")
    if len(shape) != 2:  # [N, C, 1, 1] after a global pool
        scores = g.flatten(scores, name="scores").name
    y = g.input(target, (g.node(scores).shape[0],), dtype="int64")
    loss = getattr(g, LOSSES[kind])(scores, y, name="loss")
    g.output(loss, scores)
    return g.verify()


@dataclass
class Optimizer:
    kind: str = "adam"          # "adam" or "sgd"
    lr: float = 1e-3
    momentum: float = 0.9       # sgd
    weight_decay: float = 0.0
    beta1: float = 0.9          # adam
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        if self.kind not in ("adam", "sgd"):
            raise GraphError(f"unknown optimizer {self.kind!r}; choose adam or sgd")
        if not self.lr > 0:
            raise GraphError(f"learning rate must be positive, got {self.lr}")


def build_train_step(graph_with_loss, optimizer: Optimizer):
    """The training-step graph. meta["updates"] maps each state tensor (parameter, running
    statistic, optimizer buffer) to the node holding its value after the step."""
    g = derive_backward(set_training(graph_with_loss, True), name=f"{graph_with_loss.name}.train_step")
    updates = {}
    for node in g.topo():
        if node.op == "batch_norm" and node.attrs["training"]:
            x, mean, var = g.operands(node.name)[:3]
            for stat, buf in (("mean", mean), ("var", var)):
                updates[buf] = g.add_node("batch_norm_update_stats", [x, buf],
                                          {"momentum": node.attrs["momentum"], "stat": stat},
                                          name=f"{buf}.next", layer=node.layer,
                                          provenance={"update_of": buf, "rule": "batch_norm running statistic"})
    opt = optimizer
    step, optimizer_state = None, []
    if opt.kind == "adam":
        step = g.param("opt.step", (), ("constant", 0.0), trainable=False, layer="opt")
        optimizer_state.append(step)
        updates[step.name] = g.add_node("increment", [step], {}, name="opt.step.next", layer="opt",
                                        provenance={"update_of": step.name, "rule": "adam"})
    for param, grad in g.meta["grads"].items():
        node = g.node(param)
        meta = {"layer": node.layer}

        def buffer(suffix):
            optimizer_state.append(g.param(f"{param}.{suffix}", node.shape, ("constant", 0.0), trainable=False, **meta))
            return optimizer_state[-1]

        def emit(op, operands, attrs, name, of):
            return g.add_node(op, operands, attrs, name=name, provenance={"update_of": of, "rule": opt.kind}, **meta)

        if opt.kind == "sgd":
            v = buffer("velocity")
            v_next = emit("sgd_velocity", [v, grad, param], {"momentum": opt.momentum, "weight_decay": opt.weight_decay},
                          f"{v.name}.next", v.name)
            updates[v.name] = v_next
            updates[param] = emit("sgd_param", [param, v_next], {"lr": opt.lr}, f"{param}.next", param)
        else:
            m, v = buffer("adam_m"), buffer("adam_v")
            m_next = emit("adam_moment1", [m, grad, param], {"beta1": opt.beta1, "weight_decay": opt.weight_decay},
                          f"{m.name}.next", m.name)
            v_next = emit("adam_moment2", [v, grad, param], {"beta2": opt.beta2, "weight_decay": opt.weight_decay},
                          f"{v.name}.next", v.name)
            updates[m.name], updates[v.name] = m_next, v_next
            updates[param] = emit("adam_param", [param, m_next, v_next, updates[step.name]],
                                  {"lr": opt.lr, "beta1": opt.beta1, "beta2": opt.beta2, "eps": opt.eps},
                                  f"{param}.next", param)
    g.outputs = g.outputs[:2] + [t.name for t in updates.values()]
    g.meta["updates"] = {state: t.name for state, t in updates.items()}
    g.meta["optimizer_state"] = [t.name for t in optimizer_state]
    return g.verify()


class Trainer:
    """Runs training steps and evaluations of one model on one backend, holding its state."""

    def __init__(self, graph, optimizer=None, loss="cross_entropy", backend="numpy", seed=0):
        from . import compile as gc_compile
        self.model = graph
        self.optimizer = optimizer or Optimizer()
        self.with_loss = attach_loss(graph, loss)
        self.step_graph = build_train_step(self.with_loss, self.optimizer)
        self.eval_graph = set_training(self.with_loss, False)
        self.step_program = gc_compile(self.step_graph, backend=backend)
        self.eval_program = gc_compile(self.eval_graph, backend=backend)
        self.state = init_params(self.step_graph, seed=seed)   # parameters, running statistics, buffers
        self.epoch = 0

    @property
    def params(self):
        return {n.name: self.state[n.name] for n in self.model.params}

    def step(self, x, y):
        """One training step; returns (loss, scores)."""
        out = self.step_program.run({"x": x, "y": y}, self.state)
        for state, node in self.step_graph.meta["updates"].items():
            self.state[state] = out[node]
        loss, scores = self.step_graph.outputs[:2]
        return float(out[loss]), out[scores]

    def evaluate(self, x, y, batch=256):
        """(mean loss, accuracy) with running statistics."""
        losses, correct = [], 0
        params = {n.name: self.state[n.name] for n in self.eval_graph.params}
        for i in range(0, len(x), batch):
            out = self.eval_program.run({"x": x[i:i + batch], "y": y[i:i + batch]}, params)
            losses.append(float(out["loss"]) * len(y[i:i + batch]))
            correct += int((out[self.eval_graph.outputs[1]].argmax(axis=1) == y[i:i + batch]).sum())
        return sum(losses) / len(x), correct / len(x)

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self, path):
        """Write parameters, buffers and the epoch count to an .npz, atomically: a temporary file in
        the same folder, renamed over the target only when complete."""
        arrays = {f"state/{k}": v for k, v in self.state.items()}
        arrays["meta/epoch"] = np.array(self.epoch)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def load(self, path):
        """Restore a checkpoint written by save(); every name and shape must match this graph."""
        self.state, self.epoch = load_checkpoint(path, self.step_graph)


def load_checkpoint(path, graph):
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise GraphConvError(f"{path}: no such checkpoint") from None
    except (ValueError, OSError) as e:
        raise GraphConvError(f"{path}: not a readable .npz checkpoint ({e})") from None
    state = {k[len("state/"):]: v for k, v in arrays.items() if k.startswith("state/")}
    wanted = {n.name: n for n in graph.params}
    for name in state:
        if name not in wanted:
            raise GraphConvError(f"{path}: {name}: {graph.name} has no parameter or buffer of that name")
    for name, node in wanted.items():
        if name not in state:
            raise GraphConvError(f"{path}: {name}: missing from the checkpoint")
        shape = tuple(int(d) for d in node.shape)
        if state[name].shape != shape:
            raise GraphConvError(f"{path}: {name}: shape {list(state[name].shape)} in the checkpoint, "
                                 f"{list(shape)} in {graph.name}")
        if str(state[name].dtype) != node.dtype:
            raise GraphConvError(f"{path}: {name}: {state[name].dtype} in the checkpoint, {node.dtype} in {graph.name}")
    return state, int(arrays.get("meta/epoch", np.array(0)))


def batches(n, batch, seed, epoch):
    """Shuffled index batches for one epoch, seeded by (seed, epoch) so a resumed run sees the same order."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    parts = [order[i:i + batch] for i in range(0, n, batch)]
    if len(parts) > 1 and len(parts[-1]) == 1:  # batch statistics need two examples: join the last one
        parts[-2:] = [np.concatenate(parts[-2:])]
    return parts
