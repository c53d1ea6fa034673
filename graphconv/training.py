"""Training as graphs: one training step is one graph computing the loss, the gradients, the batch
norm running statistics and the optimizer's parameter updates. `Trainer` runs it on a backend,
keeps the state (parameters and optimizer buffers) and saves it atomically.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, fields

import numpy as np

from .autodiff import derive_backward
from .checkpoint import (all_finite, check_finite, check_state, check_writable, checkpoint_path,  # noqa: F401
                         read_checkpoint)
from .errors import CheckpointError, GraphError, InputError, TrainingError
from .ops.base import as_flag
from .params import check_seed, init_params
from .shapes import fmt_shape
from .passes import set_training
from .weights import image_input, predict, program_for, write_npz

LOSSES = {"cross_entropy": "cross_entropy", "hinge": "hinge_loss"}


def attach_loss(graph, kind=None, target="y"):
    """The graph with an int64 class-index input `target` and a scalar loss (`kind`: cross_entropy, the
    default, or hinge) on its first output (flattened if needed). Outputs: (loss, scores). A graph
    whose first output is already a scalar carries its own loss (its inputs feed the targets): it
    comes back as it is, and asking for a loss kind on it is an error (it would be ignored)."""
    if kind is not None and kind not in LOSSES:
        raise GraphError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    g = graph.copy()
    if not g.outputs:
        raise GraphError(f"{g.name}: no outputs to put a loss on; mark the class scores with g.output(...)")
    scores = g.outputs[0]
    shape = g.node(scores).shape
    if shape == ():                 # the graph's own scalar loss (g.mse_loss, g.cross_entropy, g.mean)
        if kind is not None:
            raise GraphError(f"{g.name} already ends in its own loss ({scores} [{g.node(scores).op}] is a scalar), "
                             f"so the loss {kind!r} would not be used: leave the loss kind out (--loss) or take "
                             f"the class scores as the graph's output instead")
        return g.verify()
    kind = kind or "cross_entropy"
    if len(shape) < 2 or any(d != 1 for d in shape[2:]):
        raise GraphError(f"{g.name}: a loss needs class scores [N, classes], but the output {scores} is "
                         f"{fmt_shape(shape)}")
    reserve(g, [target, "loss"] + (["scores"] if len(shape) != 2 else []),
            f"the names the loss adds to {g.name} (the class-index input {target!r} and the node 'loss')")
    if len(shape) != 2:  # [N, C, 1, 1] after a global pool
        scores = g.flatten(scores, name="scores").name
    y = g.input(target, (g.node(scores).shape[0],), dtype="int64")
    loss = getattr(g, LOSSES[kind])(scores, y, name="loss")
    g.output(loss, scores)          # the copy's outputs: the model's give way to (loss, scores)
    return g.verify()


def reserve(graph, names, what):
    """Refuse a user layer that takes a name a training pass is about to add."""
    for name in names:
        if name in graph:
            raise GraphError(f"{name}: this name is reserved for {what}, but {graph.name} already has a "
                             f"{graph.node(name).op} node called {name!r}; rename that layer")


@dataclass
class Optimizer:
    kind: str = "adam"          # "adam" or "sgd"
    lr: float = 1e-3
    momentum: float = 0.9       # sgd
    weight_decay: float = 0.0
    beta1: float = 0.9          # adam
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"  # the learning rate per epoch: constant, step (x gamma every step_size
    step_size: int = 10         # epochs: PyTorch's StepLR) or cosine (from lr to 0 over `epochs`:
    gamma: float = 0.1          # CosineAnnealingLR with eta_min 0)
    epochs: int = 0

    SCHEDULES = ("constant", "step", "cosine")
    # (attribute, lowest allowed, highest allowed, is the lowest itself allowed)
    LIMITS = (("lr", 0.0, math.inf, False), ("momentum", 0.0, 1.0, True), ("weight_decay", 0.0, math.inf, True),
              ("beta1", 0.0, 1.0, True), ("beta2", 0.0, 1.0, True), ("eps", 0.0, math.inf, False))

    def __post_init__(self):
        if self.kind not in ("adam", "sgd"):
            raise GraphError(f"unknown optimizer {self.kind!r}; choose adam or sgd")
        for key, low, high, closed in self.LIMITS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise GraphError(f"optimizer {key} must be a number, got {value!r}")
            value = float(value)
            ok = math.isfinite(value) and (value >= low if closed else value > low) and value < high
            if not ok:
                want = {"lr": "positive", "eps": "positive", "beta1": "in [0, 1)", "beta2": "in [0, 1)",
                        "momentum": "in [0, 1)"}.get(key, ">= 0")
                raise GraphError(f"optimizer {key} must be finite and {want}, got {value!r}")
            setattr(self, key, value)
        # a setting of the other optimizer would be silently ignored: refused as the CLI refuses --momentum with adam
        defaults = {f.name: f.default for f in fields(self)}
        foreign = (["momentum"] if self.kind == "adam" else ["beta1", "beta2", "eps"])
        given = [key for key in foreign if getattr(self, key) != defaults[key]]
        if given:
            raise GraphError(f"optimizer {', '.join(given)}: {'an sgd' if self.kind == 'adam' else 'an adam'} "
                             f"setting, which {self.kind} does not use (drop it, or use "
                             f"Optimizer({'sgd' if self.kind == 'adam' else 'adam'!r}, ...))")
        if self.schedule not in self.SCHEDULES:
            raise GraphError(f"unknown learning-rate schedule {self.schedule!r}; choose one of {', '.join(self.SCHEDULES)}")
        for key in ("step_size", "epochs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < (1 if key == "step_size" else 0):
                raise GraphError(f"schedule {key} must be a {'positive' if key == 'step_size' else 'non-negative'} "
                                 f"integer, got {value!r}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, numbers.Real) or not 0 < float(self.gamma) <= 1:
            raise GraphError(f"schedule gamma must be in (0, 1], got {self.gamma!r}")
        self.gamma = float(self.gamma)
        if self.schedule == "cosine" and self.epochs < 1:
            raise GraphError("the cosine schedule needs the run's length: Optimizer(..., schedule='cosine', epochs=E)")

    def lr_at(self, epoch: int) -> float:
        """The learning rate of the steps of epoch `epoch` (0-based)."""
        if self.schedule == "step":
            return self.lr * self.gamma ** (epoch // self.step_size)
        if self.schedule == "cosine":
            return self.lr * (1 + math.cos(math.pi * min(epoch, self.epochs) / self.epochs)) / 2
        return self.lr

    def remedy(self) -> str:
        """What to lower when a step overflows: the learning rate, and a weight decay as large as 1."""
        return ("a lower learning rate or weight decay may help" if self.weight_decay >= 1
                else "a lower learning rate may help")

    def describe(self) -> str:
        def epochs(n):
            return f"{n} epoch{'' if n == 1 else 's'}"
        # the schedule is an item of its own after the optimizer's settings (a header lists items with commas)
        sched = {"constant": "", "step": f", lr x{self.gamma:g} every {epochs(self.step_size)}",
                 "cosine": f", lr cosine to 0 over {epochs(self.epochs)}"}[self.schedule]
        if self.kind == "sgd":
            return f"sgd lr {self.lr:g} momentum {self.momentum:g} weight decay {self.weight_decay:g}{sched}"
        return f"adam lr {self.lr:g} betas ({self.beta1:g}, {self.beta2:g}) weight decay {self.weight_decay:g}{sched}"


def as_optimizer(optimizer) -> Optimizer:
    """An Optimizer from what a caller gave: an Optimizer, a kind ("adam", "sgd": its defaults) or None
    (Adam's defaults); anything else is refused in one line."""
    if optimizer is None:
        return Optimizer()
    if isinstance(optimizer, str):
        return Optimizer(kind=optimizer)
    if not isinstance(optimizer, Optimizer):
        raise GraphError(f"optimizer must be an Optimizer (gc.Optimizer('adam', lr=1e-3)) or its kind ('adam', "
                         f"'sgd'), got {type(optimizer).__name__} {optimizer!r}")
    return optimizer


def build_train_step(graph_with_loss, optimizer: Optimizer):
    """The training-step graph: backward, then two passes. meta["updates"] maps each state tensor
    (parameter, running statistic, optimizer buffer) to the node holding its value after the step."""
    g = derive_backward(set_training(graph_with_loss, True), name=f"{graph_with_loss.name}.train_step")
    g = add_running_statistics(g)
    return add_optimizer(g, optimizer)


def add_running_statistics(graph):
    """Pass: every training-mode batch norm's running mean and variance after the step, and dropout's
    step counter plus one (each step draws new masks), as outputs."""
    from .ops.dropout import STEP_BUFFER
    g = graph.copy()
    updates = {}
    if any(n.op == "dropout" and n.attrs["training"] for n in g.topo()):
        updates[STEP_BUFFER] = g.add_node("increment", [STEP_BUFFER], {}, name=f"{STEP_BUFFER}.next", layer="dropout",
                                          provenance={"update_of": STEP_BUFFER, "rule": "dropout step counter"},
                                          stage="update")
    for node in g.topo():
        if node.op == "batch_norm" and node.attrs["training"]:
            x, mean, var = g.operands(node.name)[:3]
            for stat, buf in (("mean", mean), ("var", var)):
                updates[buf] = g.add_node("batch_norm_update_stats", [x, buf],
                                          {"momentum": node.attrs["momentum"], "stat": stat},
                                          name=f"{buf}.next", layer=node.layer,
                                          provenance={"update_of": buf, "rule": "batch_norm running statistic"},
                                          stage="update")
    g.outputs = g.outputs + [t.name for t in updates.values()]
    g.meta["updates"] = {**g.meta.get("updates", {}), **{state: t.name for state, t in updates.items()}}
    return g.verify()


def add_optimizer(graph, optimizer: Optimizer):
    """Pass: the optimizer's state buffers and each parameter's value after the step; the gradients
    stop being outputs (the updates consume them)."""
    g = graph.copy()
    updates = {}
    opt = optimizer = as_optimizer(optimizer)
    suffixes = ("velocity",) if opt.kind == "sgd" else ("adam_m", "adam_v")
    reserve(g, [f"{p}.{x}" for p in g.meta["grads"] for x in suffixes] + ["opt.lr"] +
            (["opt.step"] if opt.kind == "adam" else []), f"the {opt.kind} optimizer's state")
    # the learning rate is a scalar buffer the Trainer sets before each step (a schedule), not a constant
    # in the kernels: a captured step follows it
    lr = g.param("opt.lr", (), ("constant", opt.lr), trainable=False, layer="opt")
    step, optimizer_state = None, [lr]
    if opt.kind == "adam":
        step = g.param("opt.step", (), ("constant", 0.0), trainable=False, layer="opt")
        optimizer_state.append(step)
        updates[step.name] = g.add_node("increment", [step], {}, name="opt.step.next", layer="opt",
                                        provenance={"update_of": step.name, "rule": "adam"}, stage="update")
    for param, grad in g.meta["grads"].items():
        node = g.node(param)
        meta = {"layer": node.layer}

        def buffer(suffix):
            optimizer_state.append(g.param(f"{param}.{suffix}", node.shape, ("constant", 0.0), trainable=False, **meta))
            return optimizer_state[-1]

        def emit(op, operands, attrs, name, of):
            return g.add_node(op, operands, attrs, name=name, provenance={"update_of": of, "rule": opt.kind},
                              stage="update", **meta)

        if opt.kind == "sgd":
            v = buffer("velocity")
            v_next = emit("sgd_velocity", [v, grad, param], {"momentum": opt.momentum, "weight_decay": opt.weight_decay},
                          f"{v.name}.next", v.name)
            updates[v.name] = v_next
            updates[param] = emit("sgd_param", [param, v_next, lr], {}, f"{param}.next", param)
        else:
            m, v = buffer("adam_m"), buffer("adam_v")
            m_next = emit("adam_moment1", [m, grad, param], {"beta1": opt.beta1, "weight_decay": opt.weight_decay},
                          f"{m.name}.next", m.name)
            v_next = emit("adam_moment2", [v, grad, param], {"beta2": opt.beta2, "weight_decay": opt.weight_decay},
                          f"{v.name}.next", v.name)
            updates[m.name], updates[v.name] = m_next, v_next
            updates[param] = emit("adam_param", [param, m_next, v_next, updates[step.name], lr],
                                  {"beta1": opt.beta1, "beta2": opt.beta2, "eps": opt.eps},
                                  f"{param}.next", param)
    grads = set(g.meta["grads"].values())
    g.outputs = [o for o in g.outputs if o not in grads] + [t.name for t in updates.values()]
    g.meta["updates"] = {**g.meta.get("updates", {}), **{state: t.name for state, t in updates.items()}}
    g.meta["optimizer_state"] = [t.name for t in optimizer_state]
    return g.verify()


class Trainer:
    """Runs training steps and evaluations of one model on one backend, holding its state. A step
    that would make the loss or any state non-finite is refused and leaves the state as it was.
    On the kernel backends the state lives in the bound step's buffers (CuPy arrays on cuda), two
    sets that the steps alternate between (`state` names the current one after each step): copy an
    array to keep a snapshot; `numpy_state()` gives NumPy copies."""

    def __init__(self, graph, optimizer=None, loss=None, backend="numpy", seed=0, tf32=False,
                 winograd=False):
        tf32, winograd = as_flag(tf32, "tf32"), as_flag(winograd, "winograd")
        from .weights import need_graph
        need_graph(graph, "Trainer")
        self.model = graph
        self.optimizer = as_optimizer(optimizer)
        tiny, huge = float(np.finfo(graph.dtype).tiny), float(np.finfo(graph.dtype).max)
        if self.optimizer.lr < tiny:          # it would be 0 (or lose its digits) in the graph's dtype: no training
            raise GraphError(f"optimizer lr {self.optimizer.lr:g} is below the smallest normal {graph.dtype} "
                             f"({tiny:.3g}): the step would multiply by 0 and nothing would train")
        for key in ("lr", "weight_decay", "eps"):     # past the dtype's range: inf in the graph, every step refused
            if getattr(self.optimizer, key) > huge:
                raise GraphError(f"optimizer {key} {getattr(self.optimizer, key):g} is above the largest {graph.dtype} "
                                 f"({huge:.3g}): it would be inf in the graph")
        if self.optimizer.kind == "adam" and self.optimizer.eps < tiny:
            raise GraphError(f"optimizer eps {self.optimizer.eps:g} is below the smallest normal {graph.dtype} "
                             f"({tiny:.3g}): m / (sqrt(v) + eps) would divide by 0 where a gradient is 0")
        scalar = next((o for o in graph.outputs if graph.node(o).shape == ()), None)
        if scalar is not None:
            raise GraphError(f"{graph.name} carries its own loss ({scalar} is a scalar): Trainer and "
                             f"`graphconv train` fit classifiers (one float input, class labels y); run its "
                             f"training step instead: gc.compile(build_train_step({graph.name}, optimizer)), then "
                             f"feed the state its meta['updates'] after each run (README: \"A graph with its own "
                             f"loss\")" + ("" if scalar == graph.outputs[0] else
                                           f"; the step takes the first output as the loss: list {scalar} first"))
        self.input_name = image_input(graph)
        self.with_loss = attach_loss(graph, loss)
        self.step_graph = build_train_step(self.with_loss, self.optimizer)
        self.eval_graph = set_training(self.with_loss, False)
        self.backend, self.tf32, self.winograd = backend, tf32, winograd
        self.step_program = self._compile(self.step_graph)
        self.eval_program = self._compile(self.eval_graph)
        self._predict_program = None
        self.state = init_params(self.step_graph, seed=check_seed(seed))   # parameters, running statistics, buffers
        self.epoch = 0
        self.steps = 0
        self._bound: dict = {}      # batch size -> bound step (kernel backends)

    def _compile(self, graph):
        """A program of `graph` on this trainer's backend (the kernel backends run the fused graph)."""
        return program_for(graph, self.backend, self.tf32, self.winograd)

    @property
    def params(self):
        """The model's parameters as NumPy arrays that later steps leave alone (see numpy_state)."""
        return self.numpy_state({n.name for n in self.model.params})

    def _run_step(self, batch, inputs):
        """One step's outputs, with how to test arrays for finiteness, how to make its updates the
        state, and how to bring an output to NumPy. numpy: the program itself. Kernel backends: a step
        bound to this batch size (static buffers, every launch fixed: one CUDA graph replay per step on
        cuda) whose updates become the state by flipping between two sets of buffers (no copy), so
        parameters and optimizer state stay on the device between steps; only the batch goes in and
        the loss and scores come out."""
        updates = self.step_graph.meta["updates"]
        if not hasattr(self.step_program, "bind"):
            out = self.step_program.run(inputs, self.state)
            finite = lambda arrays: all(all_finite(a) for a in arrays)   # noqa: E731
            return out, finite, (lambda: {state: out[node] for state, node in updates.items()}), (lambda a: a)
        if batch not in self._bound:
            self._bound[batch] = self.step_program.bind(batch, updates)     # state buffers alternate
        bound, runtime = self._bound[batch], self.step_program.runtime
        out = bound(inputs, self.state)
        return out, runtime.all_finite, (lambda: bound.commit(updates)), runtime.download

    def step(self, x, y):
        """One training step; returns (loss, scores), the scores as a NumPy array."""
        if getattr(x, "ndim", 0) == 0:         # a NumPy or CuPy array of examples; anything else, one line
            raise InputError(f"step: {self.input_name} must be an array with one row per example, got "
                             f"{type(x).__name__}")
        check_finite(self.input_name, x)
        self.state["opt.lr"] = np.array(self.optimizer.lr_at(self.epoch), dtype=self.state["opt.lr"].dtype)
        with np.errstate(all="ignore"):   # overflow is checked below, and reported as a TrainingError
            out, finite, commit, to_numpy = self._run_step(len(x), {self.input_name: x, "y": y})
        loss_name, scores = self.step_graph.outputs[:2]
        loss = float(out[loss_name])
        where = f"{self.model.name}, epoch {self.epoch + 1}, step {self.steps + 1}"
        if not math.isfinite(loss):
            raise TrainingError(f"{where}: the loss is {loss}; the step was not applied, the state is "
                                f"the one before it ({self.optimizer.describe()}: {self.optimizer.remedy()})")
        updates = self.step_graph.meta["updates"]
        if not finite([out[node] for node in updates.values()]):
            state = next(state for state, node in updates.items() if not finite([out[node]]))
            raise TrainingError(f"{where}: the update would make {state} non-finite; the step was not applied, "
                                f"the state is the one before it ({self.optimizer.describe()}: "
                                f"{self.optimizer.remedy()})")
        self.state.update(commit())
        self.steps += 1
        return loss, to_numpy(out[scores])

    def numpy_state(self, names=None) -> dict:
        """The state (or the `names` in it) as NumPy arrays that later steps leave alone: copies on the
        kernel backends (whose steps overwrite their buffers; on cuda they are downloaded); on
        numpy the arrays themselves (a step replaces them, it never writes into them)."""
        state = {k: v for k, v in self.state.items() if names is None or k in names}
        if not hasattr(self.step_program, "runtime"):
            return state
        download = self.step_program.runtime.download      # a copy, from either runtime
        return {k: download(v) for k, v in state.items()}

    def evaluate(self, x, y, batch=256):
        """(mean loss, accuracy) with running statistics."""
        if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch <= 0:
            raise InputError(f"evaluate: batch must be a positive integer, got {batch!r}")
        for name, a in ((self.input_name, x), ("y", y)):
            if not isinstance(a, np.ndarray) or a.ndim == 0:
                raise InputError(f"evaluate: {name} must be a numpy array with one row per example, got "
                                 f"{type(a).__name__}")
        if len(x) == 0:
            raise InputError("evaluate: no examples (an empty batch has no loss or accuracy)")
        if len(x) != len(y):
            raise InputError(f"evaluate: {len(x)} examples but {len(y)} labels")
        losses, correct = [], 0
        params = {n.name: self.state[n.name] for n in self.eval_graph.params}
        for i in range(0, len(x), batch):
            out = self.eval_program.run({self.input_name: x[i:i + batch], "y": y[i:i + batch]}, params)
            losses.append(float(out["loss"]) * len(y[i:i + batch]))
            correct += int((out[self.eval_graph.outputs[1]].argmax(axis=1) == y[i:i + batch]).sum())
        return sum(losses) / len(x), correct / len(x)

    def predict(self, x, batch=256):
        """The class of each example of `x` (eval mode: running statistics), with the current weights."""
        if not isinstance(x, np.ndarray) or x.ndim == 0:
            raise InputError(f"predict: x must be a numpy array with one row per example, got {type(x).__name__}")
        if getattr(self, "_predict_program", None) is None:
            self._predict_program = self._compile(set_training(self.model, False))
        return predict(self.model, self.params, x, batch=batch, program=self._predict_program)[0]

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self, path):
        """Write parameters, buffers, the epoch count and the optimizer's settings to an .npz,
        atomically: a temporary file in the same folder, renamed over the target only when
        complete. Non-finite state is never written."""
        path = checkpoint_path(path)
        state = self.numpy_state()
        for name, value in state.items():
            if not all_finite(value):
                raise TrainingError(f"{path}: not saved: {name} holds non-finite values")
        arrays = {f"state/{k}": v for k, v in state.items()}
        arrays["meta/epoch"] = np.array(self.epoch)
        arrays["meta/optimizer"] = np.array(json.dumps(asdict(self.optimizer), sort_keys=True))
        shape = self.model.node(self.input_name).shape           # the sizes it was trained at (--dim)
        arrays["meta/input"] = np.array(json.dumps([int(d) if d.is_Integer else str(d) for d in shape]))
        write_npz(path, arrays)

    def load(self, path):
        """Restore a checkpoint written by save(); every name, shape and dtype must match this
        graph and every value must be finite. Returns the notes worth telling the user (an
        optimizer setting that differs from the checkpoint's)."""
        ckpt = read_checkpoint(path)
        from .weights import is_optimizer_state
        own = {n.name for n in self.step_graph.params}
        foreign = [k for k in ckpt.state if not is_optimizer_state(k) and k not in own]
        if foreign:                  # another model's checkpoint: say so before any optimizer mismatch
            raise CheckpointError(f"{path}: {foreign[0]}: {self.model.name} has no parameter or buffer of that name "
                                  f"(a checkpoint of another model?)")
        if ckpt.optimizer and ckpt.optimizer.get("kind") not in ("adam", "sgd"):
            raise CheckpointError(f"{path}: meta/optimizer names the optimizer {ckpt.optimizer.get('kind')!r}, "
                                  f"which graphconv never writes (adam or sgd): not a checkpoint of graphconv's")
        if ckpt.optimizer and ckpt.optimizer.get("kind") != self.optimizer.kind:
            raise CheckpointError(f"{path}: written by {ckpt.optimizer.get('kind')} training; resume it with "
                                  f"--optimizer {ckpt.optimizer.get('kind')} (Optimizer({ckpt.optimizer.get('kind')!r}))")
        state = dict(ckpt.state)
        state.setdefault("opt.lr", self.state["opt.lr"])   # checkpoints from before the learning rate was state
        self.state = check_state(path, state, self.step_graph, self.optimizer.kind)
        self.epoch = ckpt.epoch
        notes = []
        for key, value in sorted((ckpt.optimizer or {}).items()):
            now = getattr(self.optimizer, key, None)
            if key != "kind" and now is not None and isinstance(value, (int, float)) and float(value) != now:
                notes.append(f"{key} is {now:g} now, {float(value):g} in {os.path.basename(str(path))}")
        return notes


def batches(n, batch, seed, epoch):
    """Shuffled index batches for one epoch, seeded by (seed, epoch) so a resumed run sees the same order."""
    check_seed(seed)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    parts = [order[i:i + batch] for i in range(0, n, batch)]
    if len(parts) > 1 and len(parts[-1]) == 1:  # batch statistics need two examples: join the last one
        parts[-2:] = [np.concatenate(parts[-2:])]
    return parts
