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
    from .summary import format_json, format_table, summarize
    s = summarize(load(args.model, args.dtype), batch=args.batch)
    print(format_json(s) if args.format == "json" else format_table(s))


def cmd_dump(args):
    from .models import load
    from .printer import FORMATS
    graph = load(args.model, args.dtype)
    if args.stage != "forward":
        raise GraphConvError(f"stage {args.stage!r} is not built yet (the backward pass is the next issue)")
    sys.stdout.write(FORMATS[args.format](graph))


def random_inputs(graph, batch, seed):
    """Random arrays for every input: N(0,1) floats, uniform class indices for int64 targets."""
    from .reference import concrete
    from .summary import batch_symbol
    rng = np.random.default_rng(seed)
    n = batch_symbol(graph)
    bindings = {n: batch} if n is not None else {}
    arrays = {}
    for node in graph.inputs:
        shape = concrete(node.shape, bindings)
        if node.dtype == "int64":
            arrays[node.name] = rng.integers(0, 10, size=shape)
        else:
            arrays[node.name] = rng.standard_normal(shape).astype(node.dtype)
    return arrays


def cmd_run(args):
    from . import compile as gc_compile
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
    s.set_defaults(func=cmd_summary)
    s = with_model("dump", "print the graph IR")
    s.add_argument("--stage", default="forward", choices=("forward", "backward"))
    s.add_argument("--format", default="text", choices=("text", "dot", "json"))
    s.set_defaults(func=cmd_dump)
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
        args.func(args)
    except GraphConvError as e:
        print(f"graphconv: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
