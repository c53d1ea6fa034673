"""Data sets that ship offline: scikit-learn's handwritten digits (8x8, 10 classes) and mnist1d's
generated 1-D digits (length 40). Nothing is downloaded. Each loader returns a fixed split
(x_train, y_train, x_test, y_test), shaped for the model's input: spatial size resized, channels
repeated."""
from __future__ import annotations

import numpy as np

from .errors import GraphConvError

DATASETS = ("digits", "mnist1d")


def resize_linear(images, size):
    """Bilinear (separable linear) resize of the trailing axes of `images` to `size`, aligning the
    centres of the corner pixels (align_corners=True)."""
    out = images
    for axis, new in zip(range(images.ndim - len(size), images.ndim), size):
        old = out.shape[axis]
        if old == new:
            continue
        pos = np.linspace(0, old - 1, new)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, old - 1)
        frac = (pos - lo).reshape((-1,) + (1,) * (out.ndim - axis - 1))
        out = np.take(out, lo, axis=axis) * (1 - frac) + np.take(out, hi, axis=axis) * frac
    return out


def fit_to_input(x, shape, dataset, model):
    """x: (N, *spatial) -> (N, C, *model spatial), resizing and repeating the channel."""
    want = [int(d) for d in shape[1:]]
    if len(want) != x.ndim:  # (C, *spatial) vs (N, *spatial)
        raise GraphConvError(f"data {dataset} has {x.ndim - 1}-D examples; {model} takes input [N,"
                             f"{','.join(map(str, want))}] ({len(want) - 1}-D)")
    x = resize_linear(x, want[1:])[:, None]
    return np.ascontiguousarray(np.repeat(x, want[0], axis=1))


def load(name, input_shape, model="model", dtype="float32"):
    """(x_train, y_train, x_test, y_test), inputs standardised with the training set's mean and
    standard deviation."""
    loaders = {"digits": digits, "mnist1d": mnist1d}
    if name not in loaders:
        raise GraphConvError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    x_tr, y_tr, x_te, y_te = loaders[name](input_shape, model, dtype)
    mean, std = x_tr.mean(), x_tr.std()
    return (((x_tr - mean) / std).astype(dtype), y_tr, ((x_te - mean) / std).astype(dtype), y_te)


def digits(input_shape, model="model", dtype="float32"):
    """sklearn's 1797 digits, pixel values scaled to [0, 1]; a fixed stratified split, 360 test
    images (20%, random_state=0)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover
        raise GraphConvError("the digits data set needs scikit-learn: pip install 'graphconv[data]'") from e
    d = load_digits()
    images = d.images / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(images, d.target, test_size=0.2, random_state=0, stratify=d.target)
    return (fit_to_input(x_tr, input_shape, "digits", model).astype(dtype), y_tr.astype(np.int64),
            fit_to_input(x_te, input_shape, "digits", model).astype(dtype), y_te.astype(np.int64))


def mnist1d(input_shape, model="model", dtype="float32"):
    """mnist1d's data set generated offline with its default arguments (seed 42): 4000 training and
    1000 test sequences of length 40."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover
        raise GraphConvError("the mnist1d data set needs mnist1d: pip install 'graphconv[data]'") from e
    state = np.random.get_state()  # make_dataset seeds NumPy's global generator; leave it as it was
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
    return (fit_to_input(d["x"], input_shape, "mnist1d", model).astype(dtype), d["y"].astype(np.int64),
            fit_to_input(d["x_test"], input_shape, "mnist1d", model).astype(dtype), d["y_test"].astype(np.int64))


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
        if node.dtype == "int64":  # class indices, below the class count of the loss that reads them
            classes = [int(graph.node(graph.operands(u)[0]).shape[1]) for u, _ in graph.users(node.name)
                       if graph.node(u).op in ("softmax_cross_entropy", "hinge_loss")]
            arrays[node.name] = rng.integers(0, min(classes, default=10), size=shape)
        else:
            arrays[node.name] = rng.standard_normal(shape).astype(node.dtype)
    return arrays
