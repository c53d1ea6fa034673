"""The `graphconv` command line."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from .errors import GraphConvError


def cmd_models(args):
    from .models import MODELS
    width = max(map(len, MODELS))
    for name, fn in MODELS.items():
        print(f"{name.ljust(width)}  {fn.__doc__.strip().splitlines()[0]}")


def cmd_summary(args):
    from .models import load
    from .summary import format_json, format_table, format_training, summarize, summarize_training
    graph = load(args.model, args.dtype)
    if args.stage == "train":
        from .training import Optimizer, attach_loss, build_train_step
        t = summarize_training(build_train_step(attach_loss(graph, args.loss), Optimizer(args.optimizer)), args.batch)
        print(format_json(t) if args.format == "json" else format_training(t))
        return
    s = summarize(graph, batch=args.batch)
    print(format_json(s) if args.format == "json" else format_table(s))


def cmd_dump(args):
    from .autodiff import derive_backward, saved_bytes, saved_tensors
    from .models import load
    from .printer import FORMATS
    from .training import Optimizer, attach_loss, build_train_step
    graph = load(args.model, args.dtype)
    if args.stage == "backward":
        graph = derive_backward(attach_loss(graph, args.loss))
    elif args.stage == "train":
        graph = build_train_step(attach_loss(graph, args.loss), Optimizer(args.optimizer))
    sys.stdout.write(FORMATS[args.format](graph))
    if args.stage != "forward" and args.format == "text":
        saved = saved_tensors(graph)
        size = int(saved_bytes(graph, args.batch or 1))
        per = f"at batch {args.batch}" if args.batch else "per example"
        print(f"# saved for the backward pass: {len(saved)} tensors, {size:,} bytes {per} "
              f"({', '.join(n.name for n in saved)})")


def cmd_gradcheck(args):
    from .gradcheck import check_graph, format_table
    from .models import load
    from .training import attach_loss
    results = check_graph(attach_loss(load(args.model), args.loss), seed=args.seed, batch=args.batch)
    print(f"gradcheck {args.model}: every gradient rule of its backward graph, float64, batch {args.batch}, "
          f"seed {args.seed}")
    print(format_table(results))
    return 0 if all(r.ok for r in results) else 1


def cmd_train(args):
    from . import data
    from .models import load
    from .training import Optimizer, Trainer, batches
    graph = load(args.model, args.dtype)
    x_tr, y_tr, x_te, y_te = data.load(args.data, graph.inputs[0].shape, graph.name, args.dtype)
    opt = Optimizer(args.optimizer, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    trainer = Trainer(graph, opt, loss=args.loss, backend=args.backend, seed=args.seed)
    classes = int(trainer.with_loss.node(trainer.with_loss.outputs[1]).shape[1])
    if classes != len(np.unique(y_tr)):
        raise GraphConvError(f"{graph.name} outputs {classes} scores per example; {args.data} has "
                             f"{len(np.unique(y_tr))} classes")
    if args.resume:
        trainer.load(args.resume)
        print(f"resumed from {args.resume} after epoch {trainer.epoch}")
    save = args.save or f"{graph.name}.npz"
    print(f"training {graph.name} on {args.data} ({len(x_tr)} train / {len(x_te)} test), {args.backend} backend, "
          f"{args.optimizer} lr {args.lr:g}, batch {args.batch}, seed {args.seed}")
    for _ in range(args.epochs):
        start = time.perf_counter()
        order = batches(len(x_tr), args.batch, args.seed, trainer.epoch)
        losses, correct = [], 0
        for idx in progress(order, f"epoch {trainer.epoch + 1}", args.progress):
            loss, scores = trainer.step(x_tr[idx], y_tr[idx])
            losses.append(loss * len(idx))
            correct += int((scores.argmax(axis=1) == y_tr[idx]).sum())
        trainer.epoch += 1
        test_loss, test_acc = trainer.evaluate(x_te, y_te)
        trainer.save(save)
        print(f"epoch {trainer.epoch:3d}  loss {sum(losses) / len(x_tr):.4f}  train acc {correct / len(x_tr):6.2%}  "
              f"test loss {test_loss:.4f}  test acc {test_acc:6.2%}  ({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"saved {save}")


def progress(items, desc, mode):
    """A tqdm progress bar on stderr when tqdm is installed and stderr is a terminal (or forced)."""
    if mode == "off":
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False, disable=None if mode == "auto" else False, file=sys.stderr)


def cmd_run(args):
    from . import compile as gc_compile
    from .data import random_inputs
    from .models import load
    from .params import init_params
    from .printer import fmt_type
    graph = load(args.model, args.dtype)
    program = gc_compile(graph, backend=args.backend)
    params = init_params(graph, seed=args.seed)
    inputs = random_inputs(graph, args.batch, args.seed)
    start = time.perf_counter()
    outs = program.run(inputs, params)
    elapsed = time.perf_counter() - start
    print(f"{graph.name} on {args.backend}: batch {args.batch}, seed {args.seed}, {elapsed * 1e3:.1f} ms")
    for name, value in outs.items():
        print(f"  {name}: {fmt_type(graph.node(name).type)} -> {value.dtype}{list(value.shape)}  "
              f"mean {value.mean():+.6f}  std {value.std():.6f}  min {value.min():+.6f}  max {value.max():+.6f}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphconv", description="A symbolic graph compiler for CNNs.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_model(name, help_):
        s = sub.add_parser(name, help=help_)
        s.add_argument("model", help="a bundled model name (see `graphconv models`) or path/to/file.py:function")
        s.add_argument("--dtype", default="float32", choices=("float32", "float64"))
        return s

    sub.add_parser("models", help="list the bundled models").set_defaults(func=cmd_models)
    s = with_model("summary", "the layer table: sizes, parameters, multiply-adds, receptive fields")
    s.add_argument("--batch", type=_positive, default=None, help="batch size (default: counts per example)")
    s.add_argument("--format", default="table", choices=("table", "json"))
    s.add_argument("--stage", default="forward", choices=("forward", "train"),
                   help="train: what one training step computes and holds")
    s.add_argument("--loss", default="cross_entropy", choices=("cross_entropy", "hinge"))
    s.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    s.set_defaults(func=cmd_summary)
    s = with_model("dump", "print the graph IR: forward, backward (with the loss) or a whole training step")
    s.add_argument("--stage", default="forward", choices=("forward", "backward", "train"))
    s.add_argument("--format", default="text", choices=("text", "dot", "json"))
    s.add_argument("--loss", default="cross_entropy", choices=("cross_entropy", "hinge"))
    s.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="for --stage train")
    s.add_argument("--batch", type=_positive, default=None, help="batch size for the saved-bytes line")
    s.set_defaults(func=cmd_dump)
    s = with_model("gradcheck", "check every gradient rule of the model's backward graph by finite differences")
    s.add_argument("--loss", default="cross_entropy", choices=("cross_entropy", "hinge"))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch", type=_positive, default=2)
    s.set_defaults(func=cmd_gradcheck)
    s = with_model("train", "train a model on an offline data set")
    s.add_argument("--data", default="digits", choices=("digits", "mnist1d"))
    s.add_argument("--epochs", type=_positive, default=3, help="epochs to run now (a resumed run continues counting)")
    s.add_argument("--batch", type=_positive, default=64)
    s.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--momentum", type=float, default=0.9, help="sgd")
    s.add_argument("--weight-decay", type=float, default=0.0)
    s.add_argument("--loss", default="cross_entropy", choices=("cross_entropy", "hinge"))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--backend", default="numpy", choices=("numpy",))
    s.add_argument("--save", default=None, help="checkpoint path (default MODEL.npz), written after every epoch")
    s.add_argument("--resume", default=None, help="continue from a checkpoint written by --save")
    s.add_argument("--progress", default="auto", choices=("auto", "on", "off"))
    s.set_defaults(func=cmd_train)
    s = with_model("run", "run a model on random inputs and print its outputs")
    s.add_argument("--batch", type=_positive, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--backend", default="numpy", choices=("numpy",))
    s.set_defaults(func=cmd_run)
    return p


def _positive(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except GraphConvError as e:
        print(f"graphconv: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("graphconv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
