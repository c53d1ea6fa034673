"""Bundled models, addressable by name on the CLI; `load("path/to/file.py:function")` for user models."""
from __future__ import annotations

import importlib.util
import os

import sympy as sp

from .builder import Graph
from .ops.pointwise import define_activation, sigmoid, softplus
from .errors import GraphError

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


@model
def lenet5_swish(dtype="float32") -> Graph:
    """LeNet-5 with activations defined by sympy expressions: Swish x*sigmoid(x) and Mish
    x*tanh(softplus(x)); their gradients come from sympy.diff."""
    x = sp.Symbol("x")
    define_activation("swish", x * sigmoid(x))
    define_activation("mish", x * sp.tanh(softplus(x)))
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


def load(spec: str, dtype="float32") -> Graph:
    """A bundled model by name, or `path/to/file.py:function` (the function returns a Graph)."""
    if spec in MODELS:
        return MODELS[spec](dtype)
    if ":" not in spec:
        raise GraphError(f"unknown model {spec!r}: bundled models are {', '.join(MODELS)}; "
                         f"or give path/to/file.py:function")
    path, func = spec.rsplit(":", 1)
    if not os.path.isfile(path):
        raise GraphError(f"model file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"graphconv_user_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, func, None)
    if not callable(fn):
        raise GraphError(f"{path} has no function {func!r}")
    graph = fn()
    if not isinstance(graph, Graph):
        raise GraphError(f"{spec} returned {type(graph).__name__}, not a graphconv Graph")
    if dtype != graph.dtype:
        from .passes import cast
        graph = cast(graph, dtype)
    return graph.verify()
