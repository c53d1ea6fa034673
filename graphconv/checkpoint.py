"""Checkpoint and weight files: reading and checking them without knowing the graph, checking their
state against a graph, writing .npz files atomically; the finiteness checks training and loading share.
Below training.py (the Trainer) and weights.py (weights into graphs), which both use it."""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np

from .errors import CheckpointError, InputError


def all_finite(a) -> bool:
    """True when every element is finite. A sum is one fast pass; it can only overflow to inf where
    elements near the dtype's maximum are present, and then the exact check decides."""
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.sum(a)
    return bool(np.isfinite(total)) or bool(np.isfinite(a).all())


NON_NEGATIVE = {".running_var": "it is a batch norm's running variance, never negative",
                ".adam_v": "Adam's second moment is a running mean of squared gradients, never negative"}


def negative_state(name, value) -> str:
    """The complaint about a variance-like state (`.running_var`, `.adam_v`) holding negative values, or ""."""
    suffix = next((s for s in NON_NEGATIVE if name.endswith(s)), None)
    value = np.asarray(value)
    if suffix is None or not value.size or value.dtype.kind != "f" or not value.min() < 0:
        return ""
    return f"{name}: holds negative values ({value.min():g}); {NON_NEGATIVE[suffix]}"


def check_finite(name, a):
    if isinstance(a, np.ndarray) and a.dtype.kind == "f" and not all_finite(a):
        bad = int(np.size(a) - np.isfinite(a).sum())
        raise InputError(f"{name}: {bad} of {a.size} values are NaN or infinite; the step was not taken")


def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def checkpoint_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise CheckpointError(f"a checkpoint path is a non-empty string or path, got {path!r}")
    return os.fspath(path)


def write_file(path, data):
    """Text or bytes to a file the user named; a path that cannot be written is one line."""
    try:
        with open(path, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be written ({e.strerror})") from None


def target_of(path) -> str:
    """The file a save replaces: a symbolic link's target (the link stays a link), else the path."""
    return os.path.realpath(path) if os.path.islink(path) else path


def check_writable(path):
    """Refuse, before any work, a checkpoint path that cannot be written."""
    given = checkpoint_path(path)
    path = target_of(given)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CheckpointError(f"{given}: is a directory; give a file path such as {os.path.join(given, 'model.npz')}")
    if os.path.exists(path) and not os.path.isfile(path):     # a save replaces the file: never a device or a pipe
        raise CheckpointError(f"{given}: is not a regular file (a device, a pipe or a socket), which a save would "
                              f"replace; give a file path")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CheckpointError(f"{given}: {folder} is a file, not a folder; choose another path")
    if not os.path.isdir(folder):
        raise CheckpointError(f"{given}: the folder {folder} does not exist; create it first or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CheckpointError(f"{path}: the folder {folder} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise CheckpointError(f"{path}: the file exists and is not writable")
    try:                     # os.access says yes to root everywhere: try what the save will do
        longest = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    if len(os.fsencode(os.path.basename(path))) > longest:
        raise CheckpointError(f"{path}: the file name is longer than the {longest} bytes {folder} allows")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write in {folder} ({e.strerror})") from None
    os.close(fd)
    os.unlink(tmp)


@dataclass
class Checkpoint:
    state: dict
    epoch: int
    optimizer: dict       # the settings it was trained with ({} for checkpoints that predate them)
    input_shape: tuple = ()   # the model input it was trained on, "N" for the batch (() if not recorded)


NPZ_MAGIC = b"PK\x03\x04"


def read_checkpoint(path, plain_ok=False) -> Checkpoint:
    """Read and check a checkpoint file without knowing the graph: a readable .npz of numeric
    arrays under state/, a non-negative integer meta/epoch, finite values. With plain_ok, a plain
    weights file (names as keys, no state/ or meta/) reads as a checkpoint at epoch 0."""
    path = checkpoint_path(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not os.path.isfile(path):        # a FIFO or a device: opening it would wait for a writer forever
        raise CheckpointError(f"{path}: is not a regular file (a pipe or a device?); give a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    if not head:
        raise CheckpointError(f"{path}: the file is empty (an interrupted copy?); it is not a checkpoint")
    if head != NPZ_MAGIC:
        raise CheckpointError(f"{path}: not an .npz file; a checkpoint is written by `graphconv train --save` "
                              f"or Trainer.save")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as e:
        if "pickle" not in str(e):
            raise CheckpointError(f"{path}: damaged .npz file, cannot be read (ValueError: {e})") from None
        raise CheckpointError(f"{path}: holds Python objects (pickled data), which graphconv never loads; a "
                              f"checkpoint holds numeric arrays only") from None
    except Exception as e:  # a damaged zip raises BadZipFile, zlib.error, EOFError, ...
        raise CheckpointError(f"{path}: damaged .npz file, cannot be read ({type(e).__name__}: {e})") from None
    plain = plain_ok and not any(k.startswith(("state/", "meta/")) for k in arrays)
    if plain:
        arrays = {f"state/{k}": v for k, v in arrays.items()}
        arrays["meta/epoch"] = np.array(0)
    unknown = sorted(k for k in arrays if not k.startswith("state/") and k not in ("meta/epoch", "meta/optimizer",
                                                                                "meta/input"))
    if unknown:
        raise CheckpointError(f"{path}: {unknown[0]}: not part of a graphconv checkpoint (a weights file? it holds "
                              f"{', '.join(sorted(arrays)[:4])}{', ...' if len(arrays) > 4 else ''})")
    if "meta/epoch" not in arrays:
        raise CheckpointError(f"{path}: meta/epoch is missing, so the run's epoch count is unknown; "
                              f"not a complete checkpoint")
    epoch = arrays["meta/epoch"]
    if not isinstance(epoch, np.ndarray) or epoch.shape != () or epoch.dtype.kind not in "iu" or int(epoch) < 0:
        raise CheckpointError(f"{path}: meta/epoch must be a non-negative integer, got {epoch!r}")
    optimizer = {}
    if "meta/optimizer" in arrays:
        try:
            optimizer = json.loads(str(arrays["meta/optimizer"]))
            assert isinstance(optimizer, dict)
        except (ValueError, AssertionError):
            raise CheckpointError(f"{path}: meta/optimizer is not the optimizer record graphconv writes") from None
    input_shape = ()
    if "meta/input" in arrays:
        try:
            input_shape = tuple(json.loads(str(arrays["meta/input"])))
            assert all(isinstance(d, (int, str)) for d in input_shape)
        except (ValueError, TypeError, AssertionError):
            raise CheckpointError(f"{path}: meta/input is not the input record graphconv writes") from None
    state = {}
    for key, value in arrays.items():
        if not key.startswith("state/"):
            continue
        name = key[len("state/"):]
        if not isinstance(value, np.ndarray):   # a zip member without the .npy suffix: raw bytes
            raise CheckpointError(f"{path}: {name}: not a stored array; not a graphconv checkpoint")
        if value.dtype.kind != "f":
            raise CheckpointError(f"{path}: {name}: holds {value.dtype} values; parameters are floats")
        if not all_finite(value):
            raise CheckpointError(f"{path}: {name}: holds NaN or infinite values; this checkpoint cannot be "
                                  f"trained from (an earlier run diverged?)")
        if name == "opt.step" and (value.size and (value.min() < 0 or not np.all(value == np.round(value)))):
            raise CheckpointError(f"{path}: opt.step: holds {value.ravel()[0]:g}; Adam's step count is a whole "
                                  f"number >= 0 (the file was altered?)")
        if negative_state(name, value):
            raise CheckpointError(f"{path}: {negative_state(name, value)} (the file was altered?)")
        state[name] = value
    return Checkpoint(state, int(epoch), optimizer, input_shape)


def check_state(path, state, graph, optimizer_kind=None):
    """The checkpoint's state, checked name by name against the graph's parameters and buffers."""
    wanted = {n.name: n for n in graph.params}
    for name in state:
        if name not in wanted:
            hint = ""
            if name == "opt.step" or name.endswith((".adam_m", ".adam_v")):
                hint = "; it was written by adam training: resume with --optimizer adam"
            elif name.endswith(".velocity"):
                hint = "; it was written by sgd training: resume with --optimizer sgd"
            raise CheckpointError(f"{path}: {name}: {graph.name} has no parameter or buffer of that name{hint}")
    for name, node in wanted.items():
        if name not in state:
            raise CheckpointError(f"{path}: {name}: missing from the checkpoint")
        shape = tuple(int(d) for d in node.shape)
        if state[name].shape != shape:
            raise CheckpointError(f"{path}: {name}: shape {list(state[name].shape)} in the checkpoint, "
                                  f"{list(shape)} in {graph.name}")
        if str(state[name].dtype) != node.dtype:
            raise CheckpointError(f"{path}: {name}: {state[name].dtype} in the checkpoint, {node.dtype} in "
                                  f"{graph.name}")
    return dict(state)


def load_checkpoint(path, graph):
    """(state, epoch) of a checkpoint, checked against `graph`."""
    ckpt = read_checkpoint(path)
    return check_state(path, ckpt.state, graph), ckpt.epoch




def write_npz(path, arrays: dict):
    """Write arrays to an .npz atomically (a temporary file in the same folder, renamed over the
    target when complete), with the ordinary file mode the user's umask gives."""
    path = checkpoint_path(path)
    check_writable(path)
    path = target_of(path)          # through a symbolic link to its file
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
        os.fchmod(fd, 0o666 & ~umask())   # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            # np.savez(f, **arrays) as it writes, without its keyword arguments: an array named
            # "allow_pickle" was taken as that flag (and left out), one named "file" a TypeError
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                for name, value in arrays.items():
                    with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise CheckpointError(f"{path}: not written ({e.strerror or e})") from None
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise
