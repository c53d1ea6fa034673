"""Bundled models, addressable by name on the CLI; `load("path/to/file.py:function")` for user models."""
from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import sys
import traceback
import zlib

import sympy as sp

from .builder import Graph
from .ops.pointwise import define_activation, sigmoid, softplus
from .errors import GraphConvError, GraphError

MODELS: dict = {}


def model(fn):
    MODELS[fn.__name__] = fn
    return fn


@model
def lenet5(dtype="float32") -> Graph:
    """LeNet-5 exactly as in the lecture's table: 1x28x28 input, [conv, relu, pool] x 2, fc 500, fc 10."""
    g = Graph("lenet5", dtype)
    x = g.input("x", ("N", 1, 28, 28))
    h = g.max_pool2d(g.relu(g.conv2d(x, 20, 5, padding=2, name="conv1")), 2, stride=2)
    h = g.max_pool2d(g.relu(g.conv2d(h, 50, 5, padding=2, name="conv2")), 2, stride=2)
    h = g.relu(g.linear(g.flatten(h), 500, name="fc1"))
    return _out(g, g.linear(h, 10, name="fc2"))


# the activations lenet5_swish uses, registered (with their gradients) when this module is imported
define_activation("swish", lambda x: x * sigmoid(x))
define_activation("mish", lambda x: x * sp.tanh(softplus(x)))


@model
def lenet5_swish(dtype="float32") -> Graph:
    """LeNet-5 with activations defined by sympy expressions: Swish x*sigmoid(x) and Mish
    x*tanh(softplus(x)); their gradients come from sympy.diff."""
    g = Graph("lenet5_swish", dtype)
    h = g.input("x", ("N", 1, 28, 28))
    h = g.max_pool2d(g.activation(g.conv2d(h, 20, 5, padding=2, name="conv1"), "swish"), 2, stride=2)
    h = g.max_pool2d(g.activation(g.conv2d(h, 50, 5, padding=2, name="conv2"), "swish"), 2, stride=2)
    h = g.activation(g.linear(g.flatten(h), 500, name="fc1"), "mish")
    return _out(g, g.linear(h, 10, name="fc2"))


@model
def seed_conv(dtype="float32") -> Graph:
    """The lecture's convolution example: 3x32x32 input, ten 5x5 filters, stride 1, pad 2."""
    g = Graph("seed_conv", dtype)
    x = g.input("x", ("N", 3, 32, 32))
    return _out(g, g.conv2d(x, 10, 5, stride=1, padding=2, name="conv"))


@model
def vgg_small(dtype="float32") -> Graph:
    """VGG-style CIFAR-size net: [conv3-BN-ReLU] x 2 + max-pool, three stages (32, 64, 128), fc 256, fc 10."""
    g = Graph("vgg_small", dtype)
    h = g.input("x", ("N", 3, 32, 32))
    for stage, width in enumerate((32, 64, 128), 1):
        for i in (1, 2):
            h = g.conv2d(h, width, 3, padding=1, bias=False, name=f"conv{stage}_{i}")
            h = g.relu(g.batch_norm2d(h, name=f"bn{stage}_{i}"), name=f"relu{stage}_{i}")
        h = g.max_pool2d(h, 2, name=f"pool{stage}")
    h = g.relu(g.linear(g.flatten(h), 256, name="fc1"))
    return _out(g, g.linear(h, 10, name="fc2"))


def basic_block(g, x, width, stride, name):
    """ResNet basic block: conv3-BN-ReLU-conv3-BN, plus the shortcut (1x1 conv + BN when the shape
    changes), then ReLU."""
    h = g.conv2d(x, width, 3, stride=stride, padding=1, bias=False, name=f"{name}.conv1")
    h = g.relu(g.batch_norm2d(h, name=f"{name}.bn1"), name=f"{name}.relu1")
    h = g.batch_norm2d(g.conv2d(h, width, 3, padding=1, bias=False, name=f"{name}.conv2"), name=f"{name}.bn2")
    shortcut = x
    if stride != 1 or int(x.shape[1]) != width:
        shortcut = g.conv2d(x, width, 1, stride=stride, bias=False, name=f"{name}.down")
        shortcut = g.batch_norm2d(shortcut, name=f"{name}.down_bn")
    return g.relu(g.add(h, shortcut, name=f"{name}.add"), name=f"{name}.relu2")


@model
def resnet8(dtype="float32") -> Graph:
    """A CIFAR-size ResNet with one basic block per stage (16, 32, 64 channels), global average pool, fc 10."""
    g = Graph("resnet8", dtype)
    x = g.input("x", ("N", 3, 32, 32))
    h = g.relu(g.batch_norm2d(g.conv2d(x, 16, 3, padding=1, bias=False, name="stem"), name="stem_bn"))
    for i, (width, stride) in enumerate(((16, 1), (32, 2), (64, 2)), 1):
        h = basic_block(g, h, width, stride, f"block{i}")
    h = g.avg_pool2d(h, 8, name="gap")
    return _out(g, g.linear(g.flatten(h), 10, name="fc"))


@model
def conv1d_net(dtype="float32") -> Graph:
    """A Conv1d net for 1x40 sequences (mnist1d): two [conv1d, relu, pool] stages, fc 10."""
    g = Graph("conv1d_net", dtype)
    x = g.input("x", ("N", 1, 40))
    h = g.max_pool1d(g.relu(g.conv1d(x, 16, 5, padding=2, name="conv1")), 2)
    h = g.max_pool1d(g.relu(g.conv1d(h, 32, 3, padding=1, name="conv2")), 2)
    return _out(g, g.linear(g.flatten(h), 10, name="fc"))


@model
def conv3d_net(dtype="float32") -> Graph:
    """A small Conv3d net for 1x16x16x16 volumes: two [conv3d, relu, pool] stages, fc 10."""
    g = Graph("conv3d_net", dtype)
    x = g.input("x", ("N", 1, 16, 16, 16))
    h = g.max_pool3d(g.relu(g.conv3d(x, 8, 3, padding=1, name="conv1")), 2)
    h = g.max_pool3d(g.relu(g.conv3d(h, 16, 3, padding=1, name="conv2")), 2)
    return _out(g, g.linear(g.flatten(h), 10, name="fc"))


def _out(g, y):
    g.output(y)
    return g.verify()


def load(spec: str, dtype=None) -> Graph:
    """A bundled model by name, or `path/to/file.py:function` (the function returns a Graph), in
    `dtype` (None: a bundled model in float32, a user's graph in its own dtype). An error in the
    user's file is reported as one line naming the function and the user's own frames."""
    if spec in MODELS:
        return MODELS[spec](dtype or "float32")
    if ":" not in spec and os.path.isdir(spec):
        raise GraphError(f"{spec!r} is a folder; give path/to/file.py:function")
    if ":" not in spec and os.path.exists(spec):
        raise GraphError(f"{spec}: name the function that builds the graph, {spec}:function")
    if ":" not in spec:
        hint = difflib.get_close_matches(spec, MODELS, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise GraphError(f"unknown model {spec!r}{extra}: bundled models are {', '.join(MODELS)}; "
                         f"or give path/to/file.py:function")
    path, func = spec.rsplit(":", 1)
    if os.path.isdir(path):
        raise GraphError(f"model file {path!r} is a folder; give path/to/file.py:function")
    if not os.path.exists(path):
        raise GraphError(f"model file {path!r} does not exist")
    if not os.path.isfile(path):
        raise GraphError(f"model file {path!r} is not a regular file (a pipe or a device); give path/to/file.py:function")
    if not path.endswith(".py"):
        raise GraphError(f"model file {path!r} is not a Python file (.py); give path/to/file.py:function")
    with _user_code(path):
        module = _import(path)
        graph = _build(module, spec, path, func)
    if not isinstance(graph, Graph):
        raise GraphError(f"{spec} returned {type(graph).__name__}, not a graphconv Graph")
    if dtype is not None and dtype != graph.dtype:
        from .passes import cast
        graph = cast(graph, dtype)
    return graph.verify()


OWN_PACKAGES = ("graphconv", "codegen")


class _user_code:
    """While a model file is imported and called, its own folder (links resolved, as `python net.py`
    has it) is first on sys.path, so it can import its neighbours; what it imports of them is
    forgotten after, so that the next model file's `import helper` finds its own helper.py, not the
    first one's. A neighbour named like graphconv's own packages is refused: graphconv imports those
    while the model is built."""

    def __init__(self, path):
        self.path, self.folder = path, os.path.dirname(os.path.realpath(path))

    def _neighbours(self) -> dict:
        """{module name: path} of the .py files and the packages beside the model file."""
        found = {}
        for entry in os.listdir(self.folder):
            full = os.path.join(self.folder, entry)
            if entry.endswith(".py") and os.path.isfile(full):
                found[entry[:-3]] = full
            elif os.path.isfile(os.path.join(full, "__init__.py")):
                found[entry] = full
        return found

    def __enter__(self):
        self.neighbours = self._neighbours()
        for name in OWN_PACKAGES:
            if name not in self.neighbours:
                continue
            full = self.neighbours[name]
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.origin or not _under(spec.origin, os.path.realpath(full)):
                what = os.path.basename(full) + ("" if full.endswith(".py") else "/")
                raise GraphError(f"{self.path}: its folder holds {what}, which has the name of graphconv's own "
                                 f"{name!r} package and would stand in for it; rename it")
        self.before = set(sys.modules)
        sys.path.insert(0, self.folder)

    def __exit__(self, *exc):
        if self.folder in sys.path:
            sys.path.remove(self.folder)
        for name in set(sys.modules) - self.before:
            top, file = name.split(".")[0], getattr(sys.modules[name], "__file__", None)
            if top in self.neighbours and top not in OWN_PACKAGES and file and _under(file, self.folder):
                del sys.modules[name]


def _under(file, folder) -> bool:
    return os.path.commonpath([os.path.realpath(file), folder]) == folder


def _import(path):
    name = f"graphconv_user_{zlib.crc32(path.encode())}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module          # as an import has it: dataclasses and pickling look a module up there
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        text, where = (e.text or "").strip(), f" line {e.lineno}" if e.lineno else ""
        if not e.lineno and "null bytes" in e.msg:      # Python names no line for a NUL byte: find it
            with open(path, "rb") as f:
                lineno = f.read().split(b"\0")[0].count(b"\n") + 1
            where, e.msg = f" line {lineno}", "the file holds a NUL byte (\\0): is it a Python source file?"
        raise GraphError(f"{path}{where}: SyntaxError: {e.msg}{f': {text}' if text else ''}") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module raised while being imported
        raise GraphError(f"{path} failed to import: {_user_failure(e, path)}") from None
    return module


def _build(module, spec, path, func):
    """The Graph that `func` of the user's module returns (or `func` itself when it names a Graph)."""
    found = sorted(n for n, v in vars(module).items()
                   if (inspect.isfunction(v) and v.__module__ == module.__name__) or isinstance(v, Graph))
    defines = f" (it defines: {', '.join(found)})" if found else ""
    if not func:
        raise GraphError(f"{spec}: give the function after the colon, path/to/file.py:function{defines}")
    fn = getattr(module, func, None)
    if isinstance(fn, Graph):
        return fn
    if not callable(fn):
        raise GraphError(f"{path} has no function {func!r}{defines}")
    required = [p.name for p in _parameters(fn) if p.default is p.empty and
                p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        raise GraphError(f"{spec}: a model function is called with no arguments, but {func} needs "
                         f"{', '.join(required)} (give {'it a default' if len(required) == 1 else 'them defaults'})")
    try:
        return fn()
    except GraphConvError as e:
        raise type(e)(f"{os.path.basename(path)}:{func}: {e}") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's function raised
        raise GraphError(f"{spec} failed: {_user_failure(e, path)}") from None


def _parameters(fn):
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []


def _user_failure(error, path) -> str:
    """`ZeroDivisionError: division by zero (at net.py:7 in build: return 1 / 0)`: the exception and
    the frames of the user's own file, innermost last; graphconv's and the standard library's
    frames are left out, and a frame repeated in a row (a recursion) is shown once with its count."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if os.path.abspath(f.filename) == os.path.abspath(path)]
    lines = [f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}: {(f.line or '').strip()}" for f in reversed(frames)]
    shown = []
    for line in lines:
        if shown and shown[-1][0] == line:
            shown[-1][1] += 1
        else:
            shown.append([line, 1])
    where = " <- ".join(line + (f" (x{count})" if count > 1 else "") for line, count in shown[:8])
    if len(shown) > 8:
        where += f" <- ... {len(shown) - 8} more"
    if isinstance(error, SystemExit):
        return f"it called sys.exit({error.code!r})" + (f" (at {where})" if where else "")
    message = str(error)
    if len(message) > 300:
        message = message[:300] + " ..."
    return f"{type(error).__name__}: {message}" + (f" (at {where})" if where else "")
