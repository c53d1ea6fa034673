"""The layer builder: PyTorch's layer names and hyperparameters, one method per layer.

A layer call creates its parameters as nodes (`conv1.weight`, `conv1.bias`) with PyTorch's default
initialisation recorded on them, then the op node; input channels are read from the input's shape.
A layer that fails leaves the graph as it was.
"""
from __future__ import annotations

import difflib
import functools
import keyword
import math
import zlib
import numbers

import sympy as sp

from .errors import GraphError, OpError
from .ir import GraphCore, Tensor
from .ops.adaptive import even_windows
from .ops.base import as_bool, rank_error
from .ops.linear import linear_rank_error
from .ops.window import LAYOUT, per_axis
from .printer import FORMATS
from .shapes import fmt_dim, fmt_shape, provably_ne
from .summary import format_json, format_table, summarize


CONV_ARGS = ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias", "padding_mode",
             "in_channels", "name")
CONV_TRANSPOSE_ARGS = ("out_channels", "kernel_size", "stride", "padding", "output_padding", "groups", "bias",
                       "dilation", "in_channels", "name")
LINEAR_ARGS = ("out_features", "bias", "in_features", "name")
BN_ARGS = ("num_features", "eps", "momentum", "affine", "training", "name")


def _layer(method):
    """A failed layer call leaves the graph as it was: no params, no name used up."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.atomic():
            return method(self, *args, **kwargs)
    return wrapper


# PyTorch's positional order after the leading arguments (nn.Conv2d(in, out, kernel_size, stride, ...)):
# what a layer takes positionally, the rest by name only
POSITIONAL = {"conv": ("stride", "padding", "dilation", "groups", "bias"),
              "conv_transpose": ("stride", "padding", "output_padding", "groups", "bias", "dilation"),
              "max_pool": ("stride", "padding", "dilation"),
              "avg_pool": ("stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
              "batch_norm": ("num_features", "eps", "momentum", "affine")}


def by_name(op, args, kw) -> dict:
    """`kw` with the positional `args` of `op` (g.conv2d(x, 8, 3, 2, 1)) named as PyTorch orders them;
    GraphError for more of them than PyTorch's order has here, or one given both ways."""
    names = POSITIONAL[op[:-2]]                 # conv2d -> conv, max_pool3d -> max_pool
    where = f"{kw['name']} [{op}]" if isinstance(kw.get("name"), str) else op
    if len(args) > len(names):
        raise GraphError(f"{where}: takes at most {len(names)} positional arguments after the leading ones "
                         f"({', '.join(names)}, in PyTorch's order), got {len(args)}; give the rest by name")
    for key, value in zip(names, args):
        if key in kw:
            raise GraphError(f"{where}: {key} given both by position and by name")
        kw[key] = value
    return kw


class Graph(GraphCore):
    """A network under construction. See the README for the full API."""

    # ---- sources ----------------------------------------------------------------------------
    @_layer
    def input(self, name, shape, dtype=None) -> Tensor:
        """A graph input; a string dim ("N") stays a symbol until arrays are bound."""
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise GraphError(f"{self.name}: input names are identifiers (letters, digits and _, as in "
                             f"run(x=...)); got {name!r}")
        return self.add_node("input", (), {"shape": shape, "dtype": dtype or self.dtype}, name=name)

    @_layer
    def param(self, name, shape, init, trainable=True, layer=None, dtype=None) -> Tensor:
        return self.add_node("param", (), {"shape": tuple(shape), "dtype": dtype or self.dtype, "init": init,
                                           "trainable": trainable}, name=name, layer=layer)

    @_layer
    def apply(self, op, *inputs, name=None, **attrs) -> Tensor:
        """Any registered op by name, e.g. g.apply("relu", h). Attributes are validated."""
        return self.add_node(op, inputs, attrs, name=name)

    # ---- convolution and linear ---------------------------------------------------------------
    @_layer
    def conv1d(self, x, out_channels, kernel_size, *args, **kw) -> Tensor:
        return self._conv(1, x, out_channels, kernel_size, **by_name("conv1d", args, kw))

    @_layer
    def conv2d(self, x, out_channels, kernel_size, *args, **kw) -> Tensor:
        return self._conv(2, x, out_channels, kernel_size, **by_name("conv2d", args, kw))

    @_layer
    def conv3d(self, x, out_channels, kernel_size, *args, **kw) -> Tensor:
        return self._conv(3, x, out_channels, kernel_size, **by_name("conv3d", args, kw))

    def _conv_layer(self, op, nd, prefix, x, out_channels, kernel_size, groups, in_channels, name, unknown, accepted):
        """What a conv and a transposed conv check alike: (layer name, input, kernel, out_channels,
        groups, in_channels)."""
        name = self._layer_name(name, prefix)
        x = self._tensor(x, name, op)
        with self.layer_errors(name, op, [x.name]):
            self._reject(op, unknown, accepted)
            if len(x.shape) != nd + 2:
                raise rank_error(op, nd + 2, LAYOUT[nd], x)
            kernel = per_axis(kernel_size, nd, "kernel_size", 1)
            out_channels = _positive_int(out_channels, "out_channels")
            groups = _positive_int(groups, "groups")
            c_in = self._channels(x, in_channels, "in_channels")
            if c_in % groups:
                raise OpError(f"groups={groups} does not divide in_channels={c_in}")
            if out_channels % groups:
                raise OpError(f"groups={groups} does not divide out_channels={out_channels}", kind=GraphError)
        return name, x, kernel, out_channels, groups, c_in

    def _conv(self, nd, x, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
              padding_mode="zeros", in_channels=None, name=None, **unknown):
        op = f"conv{nd}d"
        name, x, kernel, out_channels, groups, c_in = self._conv_layer(
            op, nd, "conv", x, out_channels, kernel_size, groups, in_channels, name, unknown, CONV_ARGS)
        with self.layer_errors(name, op, [x.name]):
            bias = as_bool(bias, "bias")           # "False" is a string, not False: refused, not read as True
        bound = 1 / math.sqrt(c_in // groups * math.prod(kernel))  # PyTorch: kaiming_uniform(a=sqrt(5))
        attrs = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups,
                 "padding_mode": padding_mode}
        w = self.param(f"{name}.weight", (out_channels, c_in // groups, *kernel), ("uniform", bound), layer=name)
        b = [self.param(f"{name}.bias", (out_channels,), ("uniform", bound), layer=name)] if bias else []
        return self.add_node(op, [x, w, *b], attrs, name=name)

    @_layer
    def conv_transpose1d(self, x, out_channels, kernel_size, *args, **kw) -> Tensor:
        return self._conv_transpose(1, x, out_channels, kernel_size, **by_name("conv_transpose1d", args, kw))

    @_layer
    def conv_transpose2d(self, x, out_channels, kernel_size, *args, **kw) -> Tensor:
        return self._conv_transpose(2, x, out_channels, kernel_size, **by_name("conv_transpose2d", args, kw))

    @_layer
    def conv_transpose3d(self, x, out_channels, kernel_size, *args, **kw) -> Tensor:
        return self._conv_transpose(3, x, out_channels, kernel_size, **by_name("conv_transpose3d", args, kw))

    def _conv_transpose(self, nd, x, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                        bias=True, dilation=1, in_channels=None, name=None, **unknown):
        """nn.ConvTranspose{nd}d: weight [in_channels, out_channels/groups, K...] as PyTorch stores it."""
        op = f"conv_transpose{nd}d"
        name, x, kernel, out_channels, groups, c_in = self._conv_layer(
            op, nd, "deconv", x, out_channels, kernel_size, groups, in_channels, name, unknown, CONV_TRANSPOSE_ARGS)
        with self.layer_errors(name, op, [x.name]):
            bias = as_bool(bias, "bias")
        bound = 1 / math.sqrt(out_channels // groups * math.prod(kernel))  # PyTorch: fan_in from weight dim 1
        attrs = {"stride": stride, "padding": padding, "output_padding": output_padding, "dilation": dilation,
                 "groups": groups}
        w = self.param(f"{name}.weight", (c_in, out_channels // groups, *kernel), ("uniform", bound), layer=name)
        b = [self.param(f"{name}.bias", (out_channels,), ("uniform", bound), layer=name)] if bias else []
        return self.add_node(op, [x, w, *b], attrs, name=name)

    @_layer
    def linear(self, x, out_features, bias=True, in_features=None, name=None, **unknown) -> Tensor:
        """y = x @ W + b, W of shape [in_features, out_features] as in the lecture's tables."""
        name = self._layer_name(name, "fc")
        x = self._tensor(x, name, "linear")
        with self.layer_errors(name, "linear", [x.name]):
            self._reject("linear", unknown, LINEAR_ARGS)
            if len(x.shape) != 2:
                raise linear_rank_error(x)
            out_features = _positive_int(out_features, "out_features")
            c_in = self._channels(x, in_features, "in_features")
            bias = as_bool(bias, "bias")
        bound = 1 / math.sqrt(c_in)
        w = self.param(f"{name}.weight", (c_in, out_features), ("uniform", bound), layer=name)
        b = [self.param(f"{name}.bias", (out_features,), ("uniform", bound), layer=name)] if bias else []
        return self.add_node("linear", [x, w, *b], {}, name=name)

    # ---- normalisation ------------------------------------------------------------------------
    @_layer
    def batch_norm1d(self, x, *args, **kw) -> Tensor:
        return self._batch_norm(1, x, **by_name("batch_norm1d", args, kw))

    @_layer
    def batch_norm2d(self, x, *args, **kw) -> Tensor:
        return self._batch_norm(2, x, **by_name("batch_norm2d", args, kw))

    @_layer
    def batch_norm3d(self, x, *args, **kw) -> Tensor:
        return self._batch_norm(3, x, **by_name("batch_norm3d", args, kw))

    def _batch_norm(self, nd, x, num_features=None, eps=1e-5, momentum=0.1, affine=True, training=True,
                    name=None, **unknown):
        op = f"batch_norm{nd}d"
        name = self._layer_name(name, "bn")
        x = self._tensor(x, name, op)
        with self.layer_errors(name, op, [x.name]):
            self._reject(op, unknown, BN_ARGS)
            ranks = (2, 3) if nd == 1 else (nd + 2,)
            if len(x.shape) not in ranks:
                want = " or ".join(f"{r}-D" for r in ranks)
                raise OpError(f"{op} expects a {want} input, got {len(x.shape)}-D {fmt_shape(x.shape)}")
            c = self._channels(x, num_features, "num_features")
            affine = as_bool(affine, "affine")
        stats = [self.param(f"{name}.running_mean", (c,), ("constant", 0.0), trainable=False, layer=name),
                 self.param(f"{name}.running_var", (c,), ("constant", 1.0), trainable=False, layer=name)]
        if affine:
            stats += [self.param(f"{name}.weight", (c,), ("constant", 1.0), layer=name),
                      self.param(f"{name}.bias", (c,), ("constant", 0.0), layer=name)]
        return self.add_node("batch_norm", [x, *stats], {"eps": eps, "momentum": momentum,
                                                             "training": training}, name=name, layer=name)

    # ---- pooling ------------------------------------------------------------------------------
    @_layer
    def max_pool1d(self, x, kernel_size, *args, **kw) -> Tensor:
        return self._pool("max", 1, x, kernel_size, **by_name("max_pool1d", args, kw))

    @_layer
    def max_pool2d(self, x, kernel_size, *args, **kw) -> Tensor:
        return self._pool("max", 2, x, kernel_size, **by_name("max_pool2d", args, kw))

    @_layer
    def max_pool3d(self, x, kernel_size, *args, **kw) -> Tensor:
        return self._pool("max", 3, x, kernel_size, **by_name("max_pool3d", args, kw))

    @_layer
    def avg_pool1d(self, x, kernel_size, *args, **kw) -> Tensor:
        return self._pool("avg", 1, x, kernel_size, **by_name("avg_pool1d", args, kw))

    @_layer
    def avg_pool2d(self, x, kernel_size, *args, **kw) -> Tensor:
        return self._pool("avg", 2, x, kernel_size, **by_name("avg_pool2d", args, kw))

    @_layer
    def avg_pool3d(self, x, kernel_size, *args, **kw) -> Tensor:
        return self._pool("avg", 3, x, kernel_size, **by_name("avg_pool3d", args, kw))

    @_layer
    def adaptive_avg_pool1d(self, x, output_size, name=None) -> Tensor:
        return self._adaptive("avg", 1, x, output_size, name)

    @_layer
    def adaptive_avg_pool2d(self, x, output_size, name=None) -> Tensor:
        return self._adaptive("avg", 2, x, output_size, name)

    @_layer
    def adaptive_avg_pool3d(self, x, output_size, name=None) -> Tensor:
        return self._adaptive("avg", 3, x, output_size, name)

    @_layer
    def adaptive_max_pool1d(self, x, output_size, name=None) -> Tensor:
        return self._adaptive("max", 1, x, output_size, name)

    @_layer
    def adaptive_max_pool2d(self, x, output_size, name=None) -> Tensor:
        return self._adaptive("max", 2, x, output_size, name)

    @_layer
    def adaptive_max_pool3d(self, x, output_size, name=None) -> Tensor:
        return self._adaptive("max", 3, x, output_size, name)

    @_layer
    def global_avg_pool(self, x, name=None) -> Tensor:
        """The mean over every spatial position: [N, C, *S] -> [N, C, 1, ...] (then g.flatten)."""
        x = self._tensor(x, name or "global_avg_pool", "global_avg_pool")
        if not 3 <= len(x.shape) <= 5:
            raise GraphError(f"{name or 'global_avg_pool'}: global_avg_pool expects an input [N, C, *spatial] with 1 to 3 "
                             f"spatial axes, got {fmt_shape(x.shape)}")
        return self._adaptive("avg", len(x.shape) - 2, x, 1, name)

    def _adaptive(self, mode, nd, x, output_size, name):
        """PyTorch's adaptive pooling. Where the input size is a multiple of the output size every
        window is equal: a plain pool with kernel = stride = input // output (it fuses with a conv).
        Otherwise the adaptive op, with PyTorch's windows of two sizes that may overlap."""
        layer = name or f"adaptive_{mode}_pool{nd}d"
        x = self._tensor(x, layer, f"adaptive_{mode}_pool{nd}d")
        out = (output_size,) * nd if isinstance(output_size, numbers.Integral) and not isinstance(output_size, bool) \
            else output_size
        if isinstance(out, (tuple, list)) and len(out) == nd and len(x.shape) == nd + 2 and None in out:
            kept = [sp.sympify(d) for d, o in zip(x.shape[2:], out) if o is None]     # PyTorch: None keeps the size
            if not all(d.is_Integer for d in kept):
                raise GraphError(f"{layer}: output_size {output_size!r}: None keeps the input's size, which is "
                                 f"symbolic here ({fmt_shape(x.shape[2:])}); give that size as a number")
            out = tuple(int(d) if o is None else o for d, o in zip(x.shape[2:], out))
        if not isinstance(out, (tuple, list)) or len(out) != nd or not all(
                isinstance(o, numbers.Integral) and not isinstance(o, bool) and o > 0 for o in out):
            raise GraphError(f"{layer}: output_size is a positive int or {nd} of them (None: keep that axis's size), "
                             f"got {output_size!r}")
        if len(x.shape) != nd + 2:
            raise GraphError(f"{layer}: expects an input [N, C, {', '.join('S' * nd)}], got {list(x.shape)}")
        sizes = even_windows(x.shape[2:], out)
        if sizes is None:    # windows of two sizes that may overlap, or sizes not known yet: the adaptive op
            return self.add_node(f"adaptive_{mode}_pool{nd}d", [x], {"output_size": tuple(out)},
                                 name=self._layer_name(name, "pool"))    # as the plain pool it may become
        return self._pool(mode, nd, x, sizes, name=name, stride=sizes)

    def _pool(self, mode, nd, x, kernel_size, name=None, **attrs):
        return self.add_node(f"{mode}_pool{nd}d", [x], {"kernel_size": kernel_size, **attrs},
                             name=self._layer_name(name, "pool"))

    # ---- activations and structure ------------------------------------------------------------
    @_layer
    def relu(self, x, name=None) -> Tensor:
        return self.add_node("relu", [x], {}, name=self._layer_name(name, "relu"))

    @_layer
    def leaky_relu(self, x, negative_slope=0.01, name=None) -> Tensor:
        return self.add_node("leaky_relu", [x], {"negative_slope": negative_slope},
                             name=self._layer_name(name, "lrelu"))

    @_layer
    def sigmoid(self, x, name=None) -> Tensor:
        return self.add_node("sigmoid", [x], {}, name=self._layer_name(name, "sigmoid"))

    @_layer
    def tanh(self, x, name=None) -> Tensor:
        return self.add_node("tanh", [x], {}, name=self._layer_name(name, "tanh"))

    @_layer
    def activation(self, x, fn, name=None, **params) -> Tensor:
        """A pointwise activation by name, built in or from gc.define_activation (e.g. "swish")."""
        return self.add_node(fn, [x], params, name=self._layer_name(name, fn))

    @_layer
    def flatten(self, x, start_dim=1, end_dim=-1, name=None) -> Tensor:
        return self.add_node("flatten", [x], {"start_dim": start_dim, "end_dim": end_dim},
                             name=self._layer_name(name, "flatten"))

    @_layer
    def reshape(self, x, shape, name=None) -> Tensor:
        return self.add_node("reshape", [x], {"shape": shape}, name=self._layer_name(name, "reshape"))

    @_layer
    def add(self, a, b, name=None) -> Tensor:
        """Elementwise sum of two tensors of one shape (a residual connection)."""
        return self.add_node("add", [a, b], {}, name=self._layer_name(name, "add"))

    @_layer
    def mul(self, a, b, name=None) -> Tensor:
        """Elementwise product (a gate, a learned scale): b may be a scalar [] or per channel [C]."""
        return self.add_node("mul", [a, b], {}, name=self._layer_name(name, "mul"))

    @_layer
    def sub(self, a, b, name=None) -> Tensor:
        """Elementwise difference a - b: b may be a scalar [] or per channel [C]."""
        return self.add_node("sub", [a, b], {}, name=self._layer_name(name, "sub"))

    @_layer
    def mean(self, x, dim=None, keepdim=False, name=None) -> Tensor:
        """The mean over `dim` (an int or a tuple; None: every element, a scalar), as torch.mean."""
        return self.add_node("mean", [x], {"dim": dim, "keepdim": keepdim}, name=self._layer_name(name, "mean"))

    @_layer
    def mse_loss(self, pred, target, name=None) -> Tensor:
        """mean((pred - target)^2) over every element (nn.MSELoss, reduction='mean'): a scalar loss;
        `target` is a float input of pred's shape. Three nodes of one layer: sub, mul, mean."""
        layer = self._layer_name(name, "mse_loss")
        pred, target = self._tensor(pred, layer, "mse_loss"), self._tensor(target, layer, "mse_loss")
        if len(pred.shape) != len(target.shape) or any(provably_ne(a, b) for a, b in zip(pred.shape, target.shape)):
            raise GraphError(f"{layer}: target has shape {fmt_shape(target.shape)} but the prediction "
                             f"{fmt_shape(pred.shape)}; mse_loss compares them element by element (no broadcasting)")
        diff = self.add_node("sub", [pred, target], {}, name=self.unique_name(f"{layer}.diff"), layer=layer)
        square = self.add_node("mul", [diff, diff], {}, name=self.unique_name(f"{layer}.square"), layer=layer)
        return self.add_node("mean", [square], {"dim": None, "keepdim": False}, name=layer, layer=layer)

    @_layer
    def upsample(self, x, size=None, scale_factor=None, mode="nearest", align_corners=None, name=None) -> Tensor:
        """F.interpolate of an [N, C, *S] input to `size`, or to S * scale_factor (whole numbers):
        mode nearest (1-3 spatial axes), linear (1), bilinear (2) or trilinear (3)."""
        layer = self._layer_name(name, "upsample")
        x = self._tensor(x, layer, "upsample")
        nd = len(x.shape) - 2
        if nd < 1:
            raise GraphError(f"{layer} [upsample]: upsample expects an input [N, C, *spatial], got {fmt_shape(x.shape)}")
        if (size is None) == (scale_factor is None):
            raise GraphError(f"{layer} [upsample]: give exactly one of size and scale_factor")
        if size is not None:
            out = (size,) * nd if isinstance(size, numbers.Integral) and not isinstance(size, bool) else size
            if not isinstance(out, (tuple, list)) or len(out) != nd:
                raise GraphError(f"{layer} [upsample]: size is a positive int or {nd} of them, got {size!r}")
        else:
            scales = (scale_factor,) * nd if not isinstance(scale_factor, (tuple, list)) else tuple(scale_factor)
            if len(scales) != nd or not all(isinstance(s, numbers.Real) and not isinstance(s, bool) and s >= 1
                                            and float(s).is_integer() for s in scales):
                raise GraphError(f"{layer} [upsample]: scale_factor is a whole number >= 1 or {nd} of them, got {scale_factor!r} "
                                 f"(for other ratios give the output size)")
            spatial = [sp.sympify(d) for d in x.shape[2:]]
            if not all(d.is_Integer for d in spatial):
                raise GraphError(f"{layer} [upsample]: the spatial size {fmt_shape(x.shape[2:])} is symbolic; upsampling by "
                                 f"scale_factor needs it known while the graph is built: give the input's spatial "
                                 f"sizes as numbers, or upsample to a size=")
            out = tuple(int(d) * int(s) for d, s in zip(spatial, scales))
        return self.add_node("upsample", [x], {"size": tuple(out) if isinstance(out, list) else out, "mode": mode,
                                               "align_corners": False if align_corners is None else align_corners},
                             name=layer)

    interpolate = upsample

    @_layer
    def dropout(self, x, p=0.5, training=True, seed=0, name=None) -> Tensor:
        """nn.Dropout(p): in training each element is zeroed with probability p and the rest scaled by
        1 / (1 - p); in eval mode (gc.set_training(g, False), predict) the identity. The mask is a
        hash of (seed, the layer, the step counter buffer `dropout.step`, the element): reproducible."""
        from .ops.dropout import STEP_BUFFER
        layer = self._layer_name(name, "dropout")
        if STEP_BUFFER in self:
            step = Tensor(self, STEP_BUFFER)
        else:
            step = self.param(STEP_BUFFER, (), ("constant", 0.0), trainable=False, layer="dropout")
        salt = zlib.crc32(layer.encode())
        return self.add_node("dropout", [x, step], {"p": p, "training": training, "seed": seed, "salt": salt},
                             name=layer)

    @_layer
    def softmax(self, x, dim=1, name=None) -> Tensor:
        """exp(x) / sum exp(x) along `dim` (computed from x - max: no overflow); for a model's output."""
        return self.add_node("softmax", [x], {"dim": dim}, name=self._layer_name(name, "softmax"))

    @_layer
    def log_softmax(self, x, dim=1, name=None) -> Tensor:
        """x - log(sum exp(x)) along `dim`, stable for large scores (the log of softmax, without its underflow)."""
        return self.add_node("log_softmax", [x], {"dim": dim}, name=self._layer_name(name, "log_softmax"))

    @_layer
    def concat(self, tensors, dim=1, name=None) -> Tensor:
        if isinstance(tensors, Tensor) or not isinstance(tensors, (list, tuple)):
            raise GraphError(f"{name or 'concat'}: concat takes a list of tensors, got {type(tensors).__name__}")
        return self.add_node("concat", list(tensors), {"dim": dim}, name=self._layer_name(name, "concat"))

    # ---- losses -------------------------------------------------------------------------------
    @_layer
    def cross_entropy(self, scores, target, name=None) -> Tensor:
        """Softmax cross-entropy, mean over the batch; target holds int64 class indices."""
        return self.add_node("softmax_cross_entropy", [scores, target], {}, name=self._layer_name(name, "loss"))

    @_layer
    def hinge_loss(self, scores, target, margin=1.0, name=None) -> Tensor:
        """Multiclass SVM loss sum_{j != y} max(0, s_j - s_y + margin), mean over the batch."""
        return self.add_node("hinge_loss", [scores, target], {"margin": margin},
                             name=self._layer_name(name, "loss"))

    # ---- reading ------------------------------------------------------------------------------
    def dump(self, fmt="text") -> str:
        """The graph as text (jaxpr-like), dot or json; str(graph) is the text form."""
        if fmt not in FORMATS:
            raise GraphError(f"unknown dump format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return FORMATS[fmt](self)

    def summary(self, batch=None, fmt="table") -> str:
        """The layer table (see graphconv summary)."""
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch <= 0):
            raise GraphError(f"{self.name}: summary(batch=...) takes a positive integer, got {batch!r}")
        s = summarize(self, batch)
        return format_json(s) if fmt == "json" else format_table(s)

    def __str__(self):
        return self.dump("text")

    # ---- helpers ------------------------------------------------------------------------------
    def _layer_name(self, name, prefix):
        if name is None:
            return self.fresh_name(prefix)
        if not isinstance(name, str) or not name:
            raise GraphError(f"layer names must be non-empty strings, got {name!r}")
        if not name.isprintable():          # a newline would end a generated kernel's comment
            raise GraphError(f"layer names are printable characters (no newline, tab or control character), "
                             f"got {name!r}")
        if name in self.nx:
            raise GraphError(f"{name}: the name is already used by a {self.node(name).op} node in {self.name}")
        return name

    def _tensor(self, x, layer, op) -> Tensor:
        return Tensor(self, self._operand_name(x, layer, op))

    @staticmethod
    def _reject(op, unknown, accepted):
        if unknown:
            bad = sorted(unknown)[0]
            hint = difflib.get_close_matches(bad, accepted, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise OpError(f"{op} has no attribute {bad!r}{extra}; it takes: {', '.join(accepted)}", kind=GraphError)

    @staticmethod
    def _channels(x, given, what):
        """The input's channel/feature count (dim 1), or the value the user gave."""
        have = x.shape[1]
        if given is not None:  # a mismatch is reported by the op's shape rule, with the chain
            return _positive_int(given, what)
        if not have.is_Integer:
            raise OpError(f"dim 1 of the input is symbolic ({fmt_dim(have)}); give {what}=")
        return int(have)


def _positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OpError(f"{what} must be an int, got {value!r}", kind=GraphError)
    if value <= 0:
        raise OpError(f"{what} must be positive, got {value}", kind=GraphError)
    return int(value)

