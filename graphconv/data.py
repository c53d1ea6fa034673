"""Data sets that ship offline: scikit-learn's handwritten digits (8x8, 10 classes), mnist1d's
generated 1-D digits (length 40) and digits3d, volumes generated from the digits. Nothing is downloaded. Each loader returns a fixed split
(x_train, y_train, x_test, y_test), shaped for the model's input: spatial size resized, channels
repeated."""
from __future__ import annotations

import numpy as np

from .errors import GraphConvError

# name -> number of spatial dims of its examples
DATASETS = {"digits": 2, "mnist1d": 1, "digits3d": 3}


def default_dataset(input_shape) -> str:
    """The data set that fits an input: 1-D sequences for [N, C, L], images for [N, C, H, W] and for
    a flat [N, F], volumes for [N, C, D, H, W]."""
    spatial = len(input_shape) - 2
    return {1: "mnist1d", 3: "digits3d"}.get(spatial, "digits")


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
    """x: (N, *spatial) -> (N, C, *model spatial), resizing and repeating the channel; or, for a
    flat model input [N, F], the example resized to F elements (a square image, a cube) and flattened."""
    want = [int(d) for d in shape[1:]]
    k = x.ndim - 1
    if len(want) == 1:
        side = round(want[0] ** (1 / k))
        if side ** k != want[0]:
            sizes = ", ".join(f"{s ** k} = {'x'.join([str(s)] * k)}" for s in (8, 16, 28)) if k > 1 else ""
            raise GraphConvError(f"{model} takes a flat input [N,{want[0]}]; {dataset} examples are {k}-D, so a "
                                 f"flat input needs a {'square' if k == 2 else 'cube'} number of features ({sizes})")
        return np.ascontiguousarray(resize_linear(x, [side] * k).reshape(len(x), -1))
    if len(want) - 1 != k:
        better = [name for name, nd in DATASETS.items() if nd == len(want) - 1]
        hint = f"; use --data {better[0]}" if better else ""
        raise GraphConvError(f"data {dataset} has {k}-D examples; {model} takes input [N,"
                             f"{','.join(map(str, want))}] ({len(want) - 1}-D){hint}")
    x = resize_linear(x, want[1:])[:, None]
    return np.ascontiguousarray(np.repeat(x, want[0], axis=1))


def load(name, input_shape, model="model", dtype="float32"):
    """(x_train, y_train, x_test, y_test), inputs standardised with the training set's mean and
    standard deviation."""
    loaders = {"digits": digits, "mnist1d": mnist1d, "digits3d": digits3d}
    if name not in loaders:
        raise GraphConvError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    symbolic = [str(d) for d in input_shape[1:] if not getattr(d, "is_Integer", isinstance(d, int))]
    if symbolic:
        raise GraphConvError(f"{model}: input dims {', '.join(symbolic)} are symbolic; data needs their sizes: "
                             f"give them with " + " ".join(f"--dim {d}=SIZE" for d in symbolic))
    x_tr, y_tr, x_te, y_te = loaders[name](input_shape, model, dtype)
    mean, std = x_tr.mean(), x_tr.std()
    if not std > 0:      # standardising would divide by 0: every input the same value
        shape = "[N, " + ", ".join(str(d) for d in input_shape[1:]) + "]"
        raise GraphConvError(f"{model}: {name} made to fit its input {shape} is one constant value ({float(mean):g}) "
                             f"in every example, nothing to learn from (an input this small keeps only a corner "
                             f"of each image); give the model a larger input")
    return (((x_tr - mean) / std).astype(dtype), y_tr, ((x_te - mean) / std).astype(dtype), y_te)


def digit_images():
    """sklearn's 1797 digits, pixel values scaled to [0, 1], and a fixed stratified split: 360 test
    images (20%, random_state=0). Returns (x_train, x_test, y_train, y_test)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:  # pragma: no cover
        raise GraphConvError("the digits data sets need scikit-learn: pip install 'graphconv[data]'") from None
    d = load_digits()
    return train_test_split(d.images / 16.0, d.target, test_size=0.2, random_state=0, stratify=d.target)


def digits(input_shape, model="model", dtype="float32"):
    """The digits images, resized to the model's input."""
    x_tr, x_te, y_tr, y_te = digit_images()
    return (fit_to_input(x_tr, input_shape, "digits", model).astype(dtype), y_tr.astype(np.int64),
            fit_to_input(x_te, input_shape, "digits", model).astype(dtype), y_te.astype(np.int64))


def digits3d(input_shape, model="model", dtype="float32"):
    """Volumes made from the digits: each 8x8 image is extruded along a depth axis of 8 slices with a
    Gaussian profile whose centre and width are drawn per example (seed 0), plus a little noise, then
    resized to the model's input. The class is the digit; the depth profile is a nuisance the
    network must learn to ignore. Generated, nothing downloaded."""
    x_tr, x_te, y_tr, y_te = digit_images()

    def extrude(images, seed):
        rng = np.random.default_rng(seed)
        depth = np.arange(8)[None, :]
        centre = rng.uniform(2.0, 5.0, (len(images), 1))
        width = rng.uniform(0.8, 2.0, (len(images), 1))
        profile = np.exp(-0.5 * ((depth - centre) / width) ** 2)                       # N, 8
        volumes = profile[:, :, None, None] * images[:, None, :, :]                    # N, 8, 8, 8
        return volumes + 0.05 * rng.standard_normal(volumes.shape)

    return (fit_to_input(extrude(x_tr, 0), input_shape, "digits3d", model).astype(dtype), y_tr.astype(np.int64),
            fit_to_input(extrude(x_te, 1), input_shape, "digits3d", model).astype(dtype), y_te.astype(np.int64))


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
    from .memory import check_fits, smaller
    rng = np.random.default_rng(seed)
    n = graph.batch_symbol()
    bindings = {n: batch} if n is not None else {}
    shapes = {node.name: concrete(node.shape, bindings) for node in graph.inputs}
    need = sum(int(np.prod(s, dtype=np.float64)) * 8 for s in shapes.values())
    check_fits(need, f"random inputs of {graph.name} at batch {batch}", smaller(need, batch))
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
