"""The compile pipeline: per named stage, a flat list of Graph -> Graph passes, read top to bottom.
Every command speaks these stage names (dump, summary, fuse, check), and `--after PASS` stops a
stage after any of its passes.

    forward      the model as declared
    backward     loss attached, gradients derived
    train        one training step: backward, batch-norm running statistics, optimizer updates
    fused        inference: eval-mode batch norm, conv chains fused
    fused-train  the training step with the fusion passes applied where their guards allow
"""
from __future__ import annotations

from .autodiff import derive_backward
from .errors import GraphError
from .fusion import collapse_convs, drop_eval_dropout, fold_batch_norm, fuse_conv_chains, fuse_pointwise_chains
from .passes import eliminate_dead_code, set_training
from .training import Optimizer, add_optimizer, add_running_statistics, attach_loss

STAGES = ("forward", "backward", "train", "fused", "fused-train")


def passes(stage, loss=None, optimizer=None, collapse=False):
    """[(name, pass)] for a stage; `collapse` adds the opt-in collapse_convs to the fused stages."""
    optimizer = optimizer or Optimizer()
    train = [
        ("attach_loss", lambda g: attach_loss(g, loss)),                      # input y, node loss
        ("set_training", lambda g: set_training(g, True)),                    # batch statistics
        ("derive_backward", lambda g: derive_backward(g, name=f"{g.name}.train_step")),
        ("add_running_statistics", add_running_statistics),                   # batch-norm buffers' next values
        ("add_optimizer", lambda g: add_optimizer(g, optimizer)),             # parameters' next values
    ]
    fusion = [("collapse_convs", collapse_convs)] if collapse else []          # conv -> conv: one conv, if exact
    fusion += [
        ("drop_eval_dropout", drop_eval_dropout),                             # eval-mode dropout: the identity
        ("fold_batch_norm", fold_batch_norm),                                 # eval-mode BN into the conv before it
        ("fuse_conv_chains", fuse_conv_chains),                               # conv (+bias) -> act* -> pool?
        ("fuse_pointwise_chains", fuse_pointwise_chains),                     # what elementwise chains remain
        ("eliminate_dead_code", eliminate_dead_code),
    ]
    table = {
        "forward": [],
        "backward": [("attach_loss", lambda g: attach_loss(g, loss)), ("derive_backward", derive_backward)],
        "train": train,
        "fused": [("set_training", lambda g: set_training(g, False))] + fusion,   # running statistics
        "fused-train": train + fusion,
    }
    if stage not in table:
        raise GraphError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    return table[stage]


def build(graph, stage="forward", loss=None, optimizer=None, after=None, collapse=False):
    """The graph of `stage` (stopping after the pass named `after`, if given)."""
    steps = passes(stage, loss, optimizer, collapse)
    if after is not None and after not in [name for name, _ in steps]:
        names = ", ".join(name for name, _ in steps) or "none"
        raise GraphError(f"stage {stage} has no pass {after!r}; its passes are: {names}")
    graph = graph.verify()
    for name, run in steps:
        graph = run(graph)
        if name == after:
            break
    return graph


FUSION_PASSES = ("collapse_convs", "drop_eval_dropout", "fold_batch_norm", "fuse_conv_chains", "fuse_pointwise_chains")


def build_unfused(graph, stage="fused", loss=None, optimizer=None):
    """What a fused stage is checked against: the same stage, stopped before its first fusion pass."""
    steps = [name for name, _ in passes(stage, loss, optimizer)]
    before = [name for name in steps[:min((steps.index(f) for f in FUSION_PASSES if f in steps), default=len(steps))]]
    return build(graph, stage, loss, optimizer, after=before[-1]) if before else graph.verify()
