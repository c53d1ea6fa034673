"""Every case of the bad-input trial (issue "Every failure a GraphConvError"): each gets a
GraphConvError with a message that names what was wrong and what to do, and the CLI prints it as
one line and exits 2. The two wrong results of the foundation have regression tests here too."""
import json
import os
import re
import stat
import sys
import zipfile

import numpy as np
import pytest

import graphconv as gc
from graphconv.models import MODELS
from graphconv.cli import main
from graphconv.training import Optimizer, Trainer, attach_loss, read_checkpoint

from torch_oracle import torch

TINY = """import graphconv as gc
def build():
    g = gc.Graph("tiny")
    x = g.input("{input}", ("N", 1, 8, 8))
    h = g.max_pool2d(g.relu(g.conv2d(x, 4, 3, padding=1, name="conv")), 2)
    g.output(g.linear(g.flatten(h), 10, name="fc"))
    return g
"""


def tiny(input_name="x"):
    g = gc.Graph("tiny")
    x = g.input(input_name, ("N", 1, 8, 8))
    h = g.max_pool2d(g.relu(g.conv2d(x, 4, 3, padding=1, name="conv")), 2)
    g.output(g.linear(g.flatten(h), 10, name="fc"))
    return g


@pytest.fixture
def tiny_file(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY.format(input="x"))
    return f"{path}:build"


def cli(capsys, *argv):
    """Run the CLI in-process; an error must be exactly one line on stderr."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    if code == 2:
        assert err.startswith("graphconv: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return code, out, err


def data_batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, n)


# ---- the two wrong results ---------------------------------------------------------------------

def test_a_parameter_the_loss_does_not_reach_trains_with_a_zero_gradient():
    g = gc.Graph("u")
    x = g.input("x", ("N", 4))
    g.linear(x, 2, name="unused")
    g.output(g.linear(x, 3, name="fc"))
    trainer = Trainer(g, Optimizer("adam", lr=0.1))
    before = {k: v.copy() for k, v in trainer.state.items()}
    rng = np.random.default_rng(0)
    trainer.step(rng.standard_normal((5, 4)).astype(np.float32), rng.integers(0, 3, 5))
    # Adam with a zero gradient leaves the parameter where it was; the reached one moves
    assert np.array_equal(trainer.state["unused.weight"], before["unused.weight"])
    assert not np.array_equal(trainer.state["fc.weight"], before["fc.weight"])
    grads = trainer.step_graph.meta["grads"]
    zero = trainer.step_graph.node(grads["unused.weight"])
    assert zero.op == "constant" and zero.attrs["value"] == 0.0


def test_a_second_output_does_not_break_training():
    g = gc.Graph("two")
    x = g.input("x", ("N", 4))
    g.output(g.linear(x, 3, name="fc"), g.linear(x, 2, name="aux"))
    trainer = Trainer(g, Optimizer("sgd", lr=0.1, momentum=0.0, weight_decay=0.5))
    w = trainer.state["aux.weight"].copy()
    rng = np.random.default_rng(0)
    trainer.step(rng.standard_normal((5, 4)).astype(np.float32), rng.integers(0, 3, 5))
    # zero gradient plus weight decay: SGD shrinks it, as torch.optim.SGD does a zero-gradient tensor
    np.testing.assert_allclose(trainer.state["aux.weight"], w - 0.1 * 0.5 * w, rtol=1e-6)


def test_summary_totals_stay_symbolic_when_a_row_is():
    g = gc.Graph("s")
    x = g.input("x", ("N", 3, "H", "W"))
    g.output(g.conv2d(x, 8, 3, padding=1, name="conv"))
    s = json.loads(g.summary(fmt="json"))
    assert s["layers"][1]["macs"] == "216*H*W"
    assert s["total_macs"] == "216*H*W" and s["total_params"] == 224 and s["total_activation_bytes"] == "44*H*W"
    table = g.summary()
    assert table.splitlines()[-1].split("|")[6].strip() == "216*H*W"
    assert "44*H*W B" in table.splitlines()[-1]


def test_training_summary_of_a_symbolic_model(capsys, tmp_path):
    path = tmp_path / "sym.py"
    path.write_text("import graphconv as gc\ndef build():\n    g = gc.Graph('sym')\n"
                    "    x = g.input('x', ('N', 1, 'H', 'W'))\n"
                    "    h = g.relu(g.conv2d(x, 10, 3, padding=1, name='conv'))\n"
                    "    g.output(g.flatten(g.avg_pool2d(h, (8, 8)), name='scores_flat'))\n    return g\n")
    code, out, _ = cli(capsys, "summary", f"{path}:build", "--stage", "train")
    assert code == 0 and "total MACs" in out and "H*W" in out
    code, out, _ = cli(capsys, "summary", f"{path}:build", "--stage", "train", "--dim", "H=8", "--dim", "W=8")
    assert code == 0 and "H*W" not in out


# ---- checkpoints ------------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    trainer = Trainer(tiny(), Optimizer("adam"))
    trainer.step(*data_batch())
    trainer.epoch = 2
    path = tmp_path / "ck.npz"
    trainer.save(path)
    return trainer, path


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:len(b) // 2], "damaged .npz file"),
    (lambda b: b[:200] + bytes([b[200] ^ 0xFF]) + b[201:], "damaged .npz file"),
    (lambda b: b"", "the file is empty"),
    (lambda b: b"epoch 3: weights follow\n", "not an .npz file"),
])
def test_corrupt_checkpoints_are_refused_by_trainer_load_and_resume(checkpoint, tmp_path, capsys, damage, message,
                                                                     tiny_file):
    trainer, path = checkpoint
    bad = tmp_path / "bad.npz"
    bad.write_bytes(damage(path.read_bytes()))
    with pytest.raises(gc.GraphConvError, match=message):
        Trainer(tiny()).load(bad)
    code, _, err = cli(capsys, "train", tiny_file, "--resume", bad, "--save", tmp_path / "new.npz")
    assert code == 2 and message in err and "bad.npz" in err


def test_a_byte_flipped_member_fails_its_crc(checkpoint, tmp_path):
    _, path = checkpoint
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("state/fc.weight.npy")
    data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF     # inside the stored array
    bad = tmp_path / "flipped.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(gc.GraphConvError, match="damaged .npz file.*CRC"):
        Trainer(tiny()).load(bad)


def rewrite(path, out, **changes):
    arrays = dict(np.load(path))
    for key, value in changes.items():
        key = key.replace("__", "/").replace("_dot_", ".")
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    np.savez(out, **arrays)
    return out


def test_checkpoint_contents_are_checked(checkpoint, tmp_path):
    _, path = checkpoint
    t = Trainer(tiny())
    with pytest.raises(gc.GraphConvError, match="meta/epoch is missing"):
        t.load(rewrite(path, tmp_path / "a.npz", meta__epoch=None))
    with pytest.raises(gc.GraphConvError, match="meta/epoch must be a non-negative integer"):
        t.load(rewrite(path, tmp_path / "b.npz", meta__epoch=np.array(-3)))
    nan = np.load(path)["state/fc.weight"].copy()
    nan[0, 0] = np.nan
    with pytest.raises(gc.GraphConvError, match="fc.weight: holds NaN or infinite values"):
        t.load(rewrite(path, tmp_path / "c.npz", state__fc_dot_weight=nan))
    with pytest.raises(gc.GraphConvError, match="extra: not part of a graphconv checkpoint"):
        t.load(rewrite(path, tmp_path / "d.npz", extra=np.zeros(2)))
    with pytest.raises(gc.GraphConvError, match="written by adam training; resume it with --optimizer adam"):
        Trainer(tiny(), Optimizer("sgd")).load(path)
    # altered optimizer state: named for what it is, not diagnosed later as a learning-rate problem
    v = np.load(path)["state/fc.weight.adam_v"].copy()
    v[0, 0] = -1e-3
    with pytest.raises(gc.GraphConvError, match="fc.weight.adam_v: holds negative values .*never negative"):
        t.load(rewrite(path, tmp_path / "e.npz", state__fc_dot_weight_dot_adam_v=v))
    for step in (-1.0, 2.5):
        with pytest.raises(gc.GraphConvError, match="opt.step: holds .*a whole number >= 0"):
            t.load(rewrite(path, tmp_path / "f.npz", state__opt_dot_step=np.array(step, np.float32)))
    record = json.dumps({**read_checkpoint(path).optimizer, "kind": "rmsprop"})
    with pytest.raises(gc.GraphConvError, match="names the optimizer 'rmsprop', which graphconv never writes") as e:
        t.load(rewrite(path, tmp_path / "g.npz", meta__optimizer=np.array(record)))
    assert "--optimizer rmsprop" not in str(e.value)


def test_checkpoints_get_the_usual_file_mode(checkpoint):
    _, path = checkpoint
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def test_resume_with_another_learning_rate_says_so(checkpoint, capsys, tmp_path, tiny_file):
    _, path = checkpoint
    code, out, _ = cli(capsys, "train", tiny_file, "--data", "digits", "--resume", path, "--save", path,
                       "--lr", "0.01", "--epochs", "1", "--progress", "off")
    assert code == 0
    assert "note: resuming with a different setting: lr is 0.01 now, 0.001 in ck.npz" in out
    assert "epochs is" not in out        # --epochs counts from the resumed epoch: no setting changed
    assert read_checkpoint(path).epoch == 3 and read_checkpoint(path).optimizer["lr"] == 0.01


def test_adam_checkpoint_resumed_with_sgd_names_the_optimizer(checkpoint, capsys, tiny_file, tmp_path):
    _, path = checkpoint
    code, _, err = cli(capsys, "train", tiny_file, "--optimizer", "sgd", "--resume", path,
                       "--save", tmp_path / "x.npz")
    assert code == 2 and "written by adam training; resume it with --optimizer adam" in err


# ---- where checkpoints go -----------------------------------------------------------------------

@pytest.mark.parametrize("where, message", [
    ("missing/dir/w.npz", "does not exist; create it first"),
    (".", "is a directory"),
    ("pipe", "is not a regular file (a device, a pipe or a socket)"),
    ("plain.txt/w.npz", "plain.txt is a file, not a folder"),
])
def test_bad_save_paths_are_refused_before_any_work(capsys, tmp_path, monkeypatch, where, message, tiny_file):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "plain.txt").write_text("mine")
    monkeypatch.setattr(Trainer, "step", lambda *a: pytest.fail("trained before checking --save"))
    code, _, err = cli(capsys, "train", tiny_file, "--save", tmp_path / where, "--force")
    assert code == 2 and message in err
    assert stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)        # a save replaces its file: never a pipe


def test_a_save_through_a_symbolic_link_writes_its_target_and_keeps_the_link(checkpoint, tmp_path):
    trainer, _ = checkpoint
    (tmp_path / "runs").mkdir()
    os.symlink(tmp_path / "runs" / "real.npz", tmp_path / "latest.npz")
    trainer.save(tmp_path / "latest.npz")
    assert os.path.islink(tmp_path / "latest.npz") and read_checkpoint(tmp_path / "runs" / "real.npz").epoch == 2
    os.mkfifo(tmp_path / "fifo.npz")           # as a device: the save would have replaced it by a file
    with pytest.raises(gc.GraphConvError, match="fifo.npz: is not a regular file"):
        gc.save_weights(tmp_path / "fifo.npz", trainer.params)
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo.npz").st_mode)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_folder_is_refused(capsys, tmp_path, tiny_file):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    code, _, err = cli(capsys, "train", tiny_file, "--save", folder / "w.npz")
    assert code == 2 and "is not writable" in err


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="the host backend needs g++")
@pytest.mark.parametrize("where", ["a-file", "a-file/under/it"])
def test_a_bad_graphconv_cache_is_one_clear_error(capsys, tmp_path, monkeypatch, where):
    """GRAPHCONV_CACHE naming a file (or a folder under one) was a raw NotADirectoryError from pathlib."""
    from codegen.cache import cache_dir
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("GRAPHCONV_CACHE", str(tmp_path / where))
    message = (f"GRAPHCONV_CACHE={tmp_path / where}: cannot create or write the cache folder "
               f"{tmp_path / where / 'host'} (Not a directory); set GRAPHCONV_CACHE to a writable folder")
    with pytest.raises(gc.BackendError, match=re.escape(message)):
        cache_dir("host")
    with pytest.raises(gc.BackendError, match=re.escape(message)):
        gc.compile(tiny(), backend="host")
    code, _, err = cli(capsys, "run", "seed_conv", "--backend", "host", "--batch", "1")
    assert code == 2 and err.strip() == f"graphconv: error: {message}"


def test_a_longer_run_is_not_overwritten_silently(checkpoint, capsys, tiny_file, tmp_path):
    _, path = checkpoint                                      # a run after 2 epochs
    before = path.read_bytes()
    code, _, err = cli(capsys, "train", tiny_file, "--save", path, "--epochs", "1")
    assert code == 2 and "holds a longer run (2 epochs; this one ends after 1)" in err and "--force" in err
    assert path.read_bytes() == before
    other = tmp_path / "notes.npz"
    other.write_text("my notes")
    code, _, err = cli(capsys, "train", tiny_file, "--save", other)
    assert code == 2 and "exists and is not a graphconv checkpoint" in err and other.read_text() == "my notes"
    code, out, _ = cli(capsys, "train", tiny_file, "--save", path, "--epochs", "2", "--progress", "off")
    assert code == 0 and "will be overwritten" in out and read_checkpoint(path).epoch == 2
    code, out, _ = cli(capsys, "train", tiny_file, "--save", path, "--epochs", "1", "--force", "--progress", "off")
    assert code == 0 and read_checkpoint(path).epoch == 1


# ---- seeds, optimizer settings, the Python API ---------------------------------------------------

def test_negative_seeds_are_refused_everywhere(capsys, tiny_file):
    with pytest.raises(gc.GraphConvError, match="seed must be a non-negative integer, got -1"):
        gc.init_params(tiny(), seed=-1)
    with pytest.raises(gc.GraphConvError, match="seed must be a non-negative integer"):
        Trainer(tiny(), seed=-2)
    for command in ("train", "run", "gradcheck"):
        with pytest.raises(SystemExit) as e:
            main([command, tiny_file, "--seed", "-1"])
        assert e.value.code == 2
        assert "--seed: must be a non-negative integer, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": "0.1"}, "optimizer lr must be a number, got '0.1'"),
    ({"lr": -1.0}, "optimizer lr must be finite and positive"),
    ({"lr": float("nan")}, "optimizer lr must be finite and positive"),
    ({"momentum": -0.5}, "optimizer momentum must be finite and in [0, 1)"),
    ({"momentum": 1.0}, "optimizer momentum must be finite and in [0, 1)"),
    ({"weight_decay": -1e-4}, "optimizer weight_decay must be finite and >= 0"),
    ({"beta1": 1.0}, "optimizer beta1 must be finite and in [0, 1)"),
    ({"eps": 0}, "optimizer eps must be finite and positive"),
    ({"kind": "adagrad"}, "unknown optimizer 'adagrad'"),
])
def test_optimizer_settings_are_checked(kwargs, message):
    kind = kwargs.pop("kind", "sgd")
    with pytest.raises(gc.GraphConvError, match=message.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        Optimizer(kind, **kwargs)


def test_cli_optimizer_options(capsys, tiny_file):
    code, _, err = cli(capsys, "train", tiny_file, "--momentum", "0.5")
    assert code == 2 and "--momentum is an sgd setting; adam has none" in err
    for option, value in (("--momentum", "-1"), ("--weight-decay", "-0.1"), ("--lr", "0"), ("--lr", "nan")):
        with pytest.raises(SystemExit):
            main(["train", tiny_file, "--optimizer", "sgd", option, value])
        assert f"argument {option}: must be a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("expr, message", [
    ("not an expr", "is not a sympy expression"),
    ("x**", "is not a sympy expression"),
    ("x*y", "has several variables"),
    (3, "does not depend on its input"),
    ("f(x)", "f(x) uses f, which has no NumPy form here"),
    ("floor(x)", "sympy cannot differentiate"),
    # complex: NumPy dropped the imaginary part (a ComplexWarning), g++ said 'I' was not declared
    ("I*x + x", "activation 'bad_act': x + I*x is complex for real x (imaginary part x); an activation must "
                "give a real value"),
    ("exp(I*x)", "exp(I*x) is complex for real x (imaginary part sin(x))"),
    # lambdified to math.gamma: "only 0-dimensional arrays can be converted to Python scalars"
    ("gamma(x)", "activation 'bad_act': gamma(x) uses gamma, which has no NumPy form here; write it with "
                 "functions NumPy has (exp, log, tanh, erf, sigmoid, softplus, ...)"),
    ("fresnels(x)", "fresnels(x) uses fresnels, which has no NumPy form here"),    # was a raw sympy error
    ("Heaviside(x)", "Heaviside(x) (derivative DiracDelta(x)) uses DiracDelta, which has no NumPy form here"),
])
def test_define_activation_refuses_what_it_cannot_use(expr, message):
    with pytest.raises(gc.GraphError, match=re.escape(message)):
        gc.define_activation("bad_act", expr)
    from graphconv.ops import OPS
    assert "bad_act" not in OPS


def test_an_activation_without_a_c_form_names_its_node_on_the_kernel_backends():
    """sympy's arg has a NumPy form but no C one: numpy runs it, the kernel backends say which node
    and function (was sympy's PrintMethodNotImplementedError); a complex factor that cancels is fine."""
    from codegen.program import Program
    assert str(gc.define_activation("x2_plus_1", "(x + I)*(x - I)").expr) == "x**2 + 1"
    gc.define_activation("arg_plus_t", "arg(x) + x")
    g = gc.Graph("t")
    g.output(g.relu(g.apply("arg_plus_t", g.input("x", ("N", 4)), name="act"), name="r"))
    np.testing.assert_allclose(gc.compile(g)(np.array([[-1, 2, 3, 4]], np.float32), params={}),
                               [[np.pi - 1, 2, 3, 4]], rtol=1e-6)
    with pytest.raises(gc.CompileError, match=re.escape(
            "act [arg_plus_t]: arg_plus_t is x + arg(x): it uses arg, which has no C form: the host and cuda "
            "kernels cannot compute it; run this graph with backend='numpy'")):
        Program(g)


def test_define_activation_registers_its_gradient_at_once():
    from graphconv.ops import OPS
    gc.define_activation("softsign_t", "x / (1 + Abs(x))")
    assert "softsign_t_grad" in OPS
    g = gc.Graph("d")
    x, dy = g.input("x", (3,)), g.input("dy", (3,))
    g.output(g.apply("softsign_t_grad", x, dy))
    v = np.array([-2.0, 0.5, 3.0], np.float32)
    np.testing.assert_allclose(gc.compile(g)(v, np.ones(3, np.float32)), 1 / (1 + np.abs(v)) ** 2, rtol=1e-6)


def test_a_fresh_process_can_apply_gradient_ops():
    import subprocess
    import sys
    code = ("import graphconv as gc; g = gc.Graph('t'); x = g.input('x', (2,)); d = g.input('d', (2,)); "
            "g.output(g.apply('relu_grad', x, d), g.apply('swish_grad', x, d)); print('ok')")
    out = subprocess.run([sys.executable, "-c", "import graphconv.models; " + code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


# ---- models with symbolic dims, targets, input names, reserved names ---------------------------------

SYMBOLIC = """import graphconv as gc
def build():
    g = gc.Graph("sym")
    x = g.input("x", ("N", 1, "H", "W"))
    h = g.max_pool2d(g.relu(g.conv2d(x, 4, 3, padding=1, name="conv")), 2)
    g.output(g.linear(g.flatten(h), 10, in_features=64, name="fc"))
    return g
"""


def test_symbolic_spatial_dims_need_sizes_and_dim_gives_them(capsys, tmp_path):
    path = tmp_path / "sym.py"
    path.write_text(SYMBOLIC)
    for command in ("run", "train", "gradcheck"):
        code, _, err = cli(capsys, command, f"{path}:build", "--save" if command == "train" else "--batch",
                           tmp_path / "s.npz" if command == "train" else "2")
        assert code == 2 and "input dims H, W are symbolic" in err and "--dim H=SIZE --dim W=SIZE" in err
    code, out, _ = cli(capsys, "run", f"{path}:build", "--dim", "H=8", "--dim", "W=8")
    assert code == 0 and "fc: f32[N,10] -> float32[8, 10]" in out
    code, _, err = cli(capsys, "run", f"{path}:build", "--dim", "H=10", "--dim", "W=10")
    assert code == 2 and "fc [linear]: input has 100 features, weight expects 64" in err
    code, _, err = cli(capsys, "run", f"{path}:build", "--dim", "C=3")
    assert code == 2 and "sym has no dim named 'C' (its inputs' symbolic dims: H, N, W)" in err
    code, _, err = cli(capsys, "run", f"{path}:build", "--dim", "H=8", "--dim", "W=8", "--dim", "H=16")
    assert code == 2 and "--dim H is given twice (H=8 and H=16); give it once" in err
    code, _, err = cli(capsys, "run", f"{path}:build", "--dim", "H=8")
    assert code == 2 and "its input dim W is symbolic and this command needs sizes; give it with --dim W=SIZE (the " \
                         "batch dim N comes from --batch)" in err
    code, _, err = cli(capsys, "emit", f"{path}:build", "-o", tmp_path / "k")     # emit has no --batch
    assert code == 2 and err.rstrip().endswith("give them with --dim H=SIZE --dim W=SIZE")
    code, _, _ = cli(capsys, "train", f"{path}:build", "--dim", "H=8", "--dim", "W=8", "--epochs", "1",
                     "--save", tmp_path / "s8.npz", "--progress", "off")
    np.save(tmp_path / "x.npy", np.zeros((3, 1, 8, 8), np.float32))
    code, out, _ = cli(capsys, "predict", f"{path}:build", "--weights", tmp_path / "s8.npz", "--input",
                       tmp_path / "x.npy")                                 # H and W from the array
    assert code == 0 and "on " + str(tmp_path / "x.npy") + " (3 examples)" in out
    code, out, _ = cli(capsys, "predict", f"{path}:build", "--weights", tmp_path / "s8.npz")
    assert code == 0 and "accuracy" in out                        # the sizes the checkpoint was trained at
    code, _, _ = cli(capsys, "export", f"{path}:build", "--weights", tmp_path / "s8.npz", "--dim", "H=8", "--dim",
                     "W=8", "-o", tmp_path / "plain.npz")
    code, _, err = cli(capsys, "predict", f"{path}:build", "--weights", tmp_path / "plain.npz")    # no record
    assert code == 2 and "(the batch dim N is the number of examples)" in err
    gap = tmp_path / "gap.py"
    gap.write_text("import graphconv as gc\ndef build():\n    g = gc.Graph('gap')\n"
                   "    h = g.relu(g.conv2d(g.input('x', ('N', 1, 'H', 'W')), 4, 3, padding=1, name='c'))\n"
                   "    g.output(g.linear(g.flatten(g.global_avg_pool(h)), 10, name='fc'))\n    return g\n")
    cli(capsys, "train", f"{gap}:build", "--dim", "H=12", "--dim", "W=10", "--epochs", "1", "--save",
        tmp_path / "g.npz", "--progress", "off")
    code, out, _ = cli(capsys, "predict", f"{gap}:build", "--weights", tmp_path / "g.npz", "--dim", "H=16", "--dim",
                       "W=16")
    assert code == 0 and out.startswith(f"note: {tmp_path / 'g.npz'} was trained on inputs [1, 12, 10]; these are "
                                        f"[1, 16, 16]")
    code, out, _ = cli(capsys, "train", f"{gap}:build", "--resume", tmp_path / "g.npz", "--epochs", "1", "--save",
                       tmp_path / "g2.npz", "--progress", "off")                  # the sizes it was trained at
    assert code == 0 and out.startswith(f"resumed from {tmp_path / 'g.npz'} after epoch 1"), out
    assert gc.checkpoint.read_checkpoint(tmp_path / "g2.npz").input_shape[1:] == (1, 12, 10)
    code, out, _ = cli(capsys, "train", f"{gap}:build", "--resume", tmp_path / "g.npz", "--dim", "H=16", "--dim",
                       "W=16", "--epochs", "1", "--save", tmp_path / "g3.npz", "--progress", "off")
    assert code == 0 and out.startswith(f"note: {tmp_path / 'g.npz'} was trained on inputs [1, 12, 10]; these are "
                                        f"[1, 16, 16]"), out
    for command, option in (("train", "--resume"), ("predict", "--weights")):      # the file's fault comes first
        code, _, err = cli(capsys, command, f"{gap}:build", option, tmp_path / "nope.npz")
        assert code == 2 and "nope.npz: no such checkpoint" in err, err
    with pytest.raises(SystemExit):
        main(["run", f"{path}:build", "--dim", "H:8"])
    assert "expected NAME=SIZE such as H=32" in capsys.readouterr().err


def test_a_target_with_its_own_batch_symbol_is_refused_at_build_time():
    for loss in ("cross_entropy", "hinge_loss"):
        g = gc.Graph("l")
        s = g.input("s", ("N", 10))
        y = g.input("y", ("M",), dtype="int64")
        with pytest.raises(gc.ShapeError, match=r"target has M entries but scores have N rows; give the target "
                                                r"the scores' batch dim \[N\]"):
            getattr(g, loss)(s, y)


def test_any_single_image_input_name_trains(capsys, tmp_path):
    trainer = Trainer(tiny("images"))
    loss, _ = trainer.step(*data_batch())
    assert np.isfinite(loss) and trainer.input_name == "images"
    path = tmp_path / "named.py"
    path.write_text(TINY.format(input="images"))
    code, out, _ = cli(capsys, "train", f"{path}:build", "--epochs", "1", "--save", tmp_path / "n.npz",
                       "--progress", "off")
    assert code == 0 and "epoch   1" in out
    g = gc.Graph("two")
    a, b = g.input("a", ("N", 4)), g.input("b", ("N", 4))
    g.output(g.linear(g.add(a, b), 3))
    with pytest.raises(gc.GraphConvError, match="training needs exactly one float input .* found a, b"):
        Trainer(g)


@pytest.mark.parametrize("name, what", [("y", "the class-index input 'y'"), ("loss", "the node 'loss'"),
                                        ("opt.step", "the adam optimizer's state")])
def test_reserved_names_say_they_are_reserved(name, what):
    g = gc.Graph("r")
    x = g.input("x", ("N", 4))
    h = g.relu(g.linear(x, 4, name="fc1"), name=name)
    g.output(g.linear(h, 3, name="fc2"))
    with pytest.raises(gc.GraphConvError, match=f"{name}: this name is reserved for .*{what}"):
        Trainer(g)


def test_derive_backward_without_outputs_says_what_to_do():
    from graphconv.autodiff import derive_backward
    g = gc.Graph("none")
    g.input("x", ("N", 4))
    with pytest.raises(gc.GraphConvError, match="none has no outputs; mark the scalar loss with g.output"):
        derive_backward(g)


def test_a_concat_along_the_batch_dim_runs_forward_and_refuses_its_gradient_naming_the_layer():
    """Its gradient was refused deep inside: "dfa [slice]: slice stop must be a concrete integer, got N"."""
    from graphconv.pipeline import build

    def net(dim):
        g = gc.Graph("cat")
        x = g.input("x", ("N", 4))
        h = g.concat([g.linear(x, 4, name="fa"), g.linear(x, 4, name="fb")], dim=dim, name="cat")
        g.output(g.linear(h, 3, name="fc"))
        return g
    g = net(0)
    y = gc.compile(g)(np.ones((2, 4), np.float32), params=gc.init_params(g, seed=0))
    assert y.shape == (4, 3)
    with pytest.raises(gc.GraphError, match=re.escape(
            "cat [concat]: a concat along dim 0, the batch dim, of symbolic sizes (N, N) has no gradient: input "
            "0's part of it would start at 0 and stop at N, and slices take integer bounds; it runs forward only "
            "(concatenate along a dim of fixed size to train through it) (input 0 [N,4] from fa <- x)")):
        build(g, "train")
    build(net(1), "train")                                   # along the features: its gradient is two slices
    g = gc.Graph("inputs")                                   # inputs need no gradient: nothing to slice
    h = g.concat([g.input("a", ("N", 4)), g.input("b", ("N", 4))], dim=0, name="cat")
    g.output(g.linear(h, 3, name="fc"))
    build(g, "train")


# ---- data sets and models ---------------------------------------------------------------------

def test_data_set_follows_the_model_and_a_mismatch_suggests_the_right_one(capsys, tmp_path):
    from graphconv import data
    from graphconv.models import MODELS
    assert data.default_dataset(MODELS["conv1d_net"]().inputs[0].shape) == "mnist1d"
    assert data.default_dataset(MODELS["conv3d_net"]().inputs[0].shape) == "digits3d"
    assert data.default_dataset(MODELS["lenet5"]().inputs[0].shape) == "digits"
    code, _, err = cli(capsys, "train", "conv1d_net", "--data", "digits", "--save", tmp_path / "c.npz")
    assert code == 2 and "data digits has 2-D examples; conv1d_net takes input [N,1,40] (1-D); use --data mnist1d" in err


def test_flat_inputs_take_square_images():
    from graphconv import data
    x = data.load("digits", ("N", 784), "mlp")[0]
    assert x.shape == (1437, 784)
    with pytest.raises(gc.GraphConvError, match=r"mlp takes a flat input \[N,700\]; digits examples are 2-D, so a "
                                                r"flat input needs a square number of features"):
        data.load("digits", ("N", 700), "mlp")


def test_conv3d_net_trains_from_the_cli_on_generated_volumes(capsys, tmp_path):
    code, out, _ = cli(capsys, "train", "conv3d_net", "--epochs", "1", "--save", tmp_path / "c3.npz",
                       "--progress", "off")
    assert code == 0 and "training conv3d_net on digits3d (1437 train / 360 test)" in out
    acc = float(out.split("test acc")[1].split("%")[0])
    assert acc > 50.0                                  # ten classes: chance is 10%


@pytest.mark.parametrize("source, message", [
    ("import graphconv as gc\ndef helper():\n    return 1 / 0\ndef build():\n    return helper()\n",
     "m.py:build failed: ZeroDivisionError: division by zero (at m.py:3 in helper: return 1 / 0 <- m.py:5 in build: "
     "return helper())"),
    ("def build(:\n    pass\n", "line 1: SyntaxError: invalid syntax"),
    ("def build(width):\n    pass\n", "m.py:build: a model function is called with no arguments, but build needs width "
                                      "(give it a default)"),
    ("import no_such_module_here\n", "failed to import: ModuleNotFoundError: No module named 'no_such_module_here' "
                                     "(at m.py:1 in <module>"),
    ("def build():\n    return 3\n", "returned int, not a graphconv Graph"),
    ("def other():\n    pass\n", "has no function 'build' (it defines: other)"),
    ("def deeper(n):\n    return deeper(n + 1)\ndef build():\n    return deeper(0)\n",
     "m.py:build failed: RecursionError: maximum recursion depth exceeded (at m.py:2 in deeper: return deeper(n + 1) "
     "(x9"),
    ("import sys\ndef build():\n    sys.exit(3)\n", "m.py:build failed: it called sys.exit(3) (at m.py:3 in build"),
    ("import sys\nsys.exit('no')\n", "failed to import: it called sys.exit('no') (at m.py:2 in <module>"),
    ("import graphconv\n\ndef build():\x00\n", "m.py line 3: SyntaxError: the file holds a NUL byte"),
])
def test_a_failing_model_file_names_the_function_and_only_user_frames(capsys, tmp_path, source, message):
    path = tmp_path / "m.py"
    path.write_text(source)
    code, _, err = cli(capsys, "summary", f"{path}:build")
    assert code == 2 and message in err and "graphconv/models.py" not in err


def test_a_pipe_as_model_file_is_refused_by_name_not_called_missing(capsys, tmp_path):
    os.mkfifo(tmp_path / "pipe.py")
    code, _, err = cli(capsys, "summary", f"{tmp_path / 'pipe.py'}:build")
    assert code == 2 and "is not a regular file (a pipe or a device)" in err and "does not exist" not in err


@pytest.mark.parametrize("name, stem", [("a/b", "a_b"), ("..", "model"), ("net v2", "net_v2"), ("réseau", "réseau")])
def test_default_output_files_named_after_the_graph_stay_in_the_current_folder(capsys, tmp_path, monkeypatch,
                                                                                 name, stem):
    """train --save, report -o and filters -o default to files named after the graph: a name with a
    slash or dots only would point into another folder (or nowhere), so it is made a plain file name."""
    (tmp_path / "m.py").write_text(f"import graphconv as gc\ndef build():\n    g = gc.Graph({name!r})\n"
                                   "    x = g.input('x', ('N', 1, 8, 8))\n"
                                   "    g.output(g.linear(g.flatten(g.conv2d(x, 2, 3, name='c')), 10, name='fc'))\n"
                                   "    return g\n")
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    assert cli(capsys, "report", "../m.py:build")[0] == 0
    assert cli(capsys, "train", "../m.py:build", "--epochs", "1", "--progress", "off")[0] == 0
    assert cli(capsys, "filters", "../m.py:build", "--weights", f"{stem}.npz")[0] == 0
    assert sorted(os.listdir(".")) == sorted([f"{stem}-report.html", f"{stem}.npz", f"{stem}-c-filters.png"])
    assert sorted(os.listdir(tmp_path)) == ["m.py", "run"]


def test_a_model_file_imports_its_neighbours_and_may_name_a_graph(capsys, tmp_path):
    (tmp_path / "layers_of_mine.py").write_text(
        "import graphconv as gc\ndef make():\n    g = gc.Graph('tiny')\n    x = g.input('x', ('N', 4))\n"
        "    g.output(g.linear(x, 3, name='fc'))\n    return g\n")
    net = tmp_path / "net.py"
    net.write_text("import layers_of_mine\ng = layers_of_mine.make()\ndef build():\n    return layers_of_mine.make()\n")
    from graphconv.models import load
    assert load(f"{net}:build").outputs == ["fc"] and load(f"{net}:g").outputs == ["fc"]
    assert str(tmp_path) not in sys.path                     # the folder is on the path only while loading
    for spec, message in [(f"{net}:", f"{net}:: give the function after the colon, path/to/file.py:function "
                                      f"(it defines: build, g)"),
                          (str(net), f"{net}: name the function that builds the graph, {net}:function"),
                          (f"{tmp_path}:build", f"model file '{tmp_path}' is a folder; give path/to/file.py:function"),
                          (str(tmp_path), f"'{tmp_path}' is a folder; give path/to/file.py:function")]:
        code, _, err = cli(capsys, "summary", spec)
        assert code == 2 and message in err, err
    assert len(err.splitlines()) == 1


def test_each_model_file_imports_its_own_neighbours(capsys, tmp_path):
    """Two folders, each a helper.py of its own: each model gets its own (the first one's module is
    not reused); a package beside the file and a dataclass in it work; a neighbour named like
    graphconv's own packages is refused rather than standing in for them."""
    from graphconv.models import load
    for width in (10, 20, 30):
        (tmp_path / f"m{width}").mkdir()
        (tmp_path / f"m{width}" / "helper.py").write_text(f"WIDTH = {width}\n")
        (tmp_path / f"m{width}" / "net.py").write_text(
            "import graphconv as gc\nimport helper\ndef build():\n    g = gc.Graph('n')\n"
            "    g.output(g.linear(g.input('x', ('N', 4)), helper.WIDTH, name='fc'))\n    return g\n")
    widths = [int(load(f"{tmp_path}/m{w}/net.py:build").node("fc").shape[1]) for w in (10, 20, 10, 30)]
    assert widths == [10, 20, 10, 30] and "helper" not in sys.modules
    (tmp_path / "m20" / "blocks").mkdir()                             # a package beside it, and a dataclass
    (tmp_path / "m20" / "blocks" / "__init__.py").write_text("WIDTH = 7\n")
    (tmp_path / "m20" / "dc.py").write_text(
        "from __future__ import annotations\nimport dataclasses\nimport graphconv as gc\nfrom blocks import WIDTH\n"
        "@dataclasses.dataclass\nclass Spec:\n    width: int = WIDTH\n"
        "def build():\n    g = gc.Graph('d')\n    g.output(g.linear(g.input('x', ('N', 4)), Spec().width, name='fc'))\n"
        "    return g\n")
    assert int(load(f"{tmp_path}/m20/dc.py:build").node("fc").shape[1]) == 7 and "blocks" not in sys.modules
    (tmp_path / "m30" / "codegen.py").write_text("")
    code, _, err = cli(capsys, "summary", f"{tmp_path}/m30/net.py:build")
    assert code == 2 and "m30/net.py: its folder holds codegen.py, which has the name of graphconv's own 'codegen' " \
                         "package and would stand in for it; rename it" in err


# ---- memory ----------------------------------------------------------------------------------

def test_runs_that_cannot_fit_are_refused_with_the_figure(capsys, monkeypatch):
    code, _, err = cli(capsys, "run", "lenet5", "--batch", "200000")
    assert code == 2 and "lenet5 at N=200000 (peak at conv2 [conv2d]): about" in err and "use a smaller batch" in err
    g = gc.Graph("huge")
    x = g.input("x", ("N", 100_000))
    g.output(g.linear(x, 1_000_000, name="fc"))
    with pytest.raises(gc.GraphConvError, match=r"the parameters of huge: about 372.5 GiB of memory needed"):
        gc.init_params(g)


def test_the_peak_estimate_bounds_what_a_run_holds():
    """The estimate (live tensors plus im2col scratch) is at least what tracemalloc sees NumPy take."""
    import tracemalloc
    from graphconv.models import lenet5
    g = lenet5()
    program = gc.compile(g)
    params = gc.init_params(g)
    x = np.zeros((16, 1, 28, 28), np.float32)
    peak, _ = program.peak_bytes(program.shapes({g.batch_symbol(): 16}))
    tracemalloc.start()
    program.run({"x": x}, params)
    _, measured = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = sum(v.nbytes for v in params.values()) + x.nbytes
    assert measured <= peak and peak < 4 * (measured + held)


# ---- non-finite numbers -------------------------------------------------------------------------

def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_saves_nothing_non_finite(capsys, tmp_path,
                                                                                         tiny_file):
    save = tmp_path / "d.npz"
    code, out, err = cli(capsys, "train", tiny_file, "--optimizer", "sgd", "--lr", "1e6", "--epochs", "3",
                         "--save", save, "--progress", "off")
    assert code == 2 and "the step was not applied" in err and "a lower learning rate may help" in err
    if save.exists():       # the epochs before the divergence were saved, finite
        ckpt = read_checkpoint(save)                         # refuses non-finite values itself
        assert f"the last checkpoint is {save} (after epoch {ckpt.epoch})" in err
    else:
        assert "no checkpoint was written" in err


def test_non_finite_inputs_and_states_never_reach_the_weights(tmp_path):
    trainer = Trainer(tiny())
    before = {k: v.copy() for k, v in trainer.state.items()}
    x, y = data_batch()
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(gc.InputError, match="x: 1 of 512 values are NaN or infinite; the step was not taken"):
        trainer.step(x, y)
    assert all(np.array_equal(before[k], trainer.state[k]) for k in before)
    trainer.state["fc.weight"] = trainer.state["fc.weight"] * np.float32(np.inf)
    with pytest.raises(gc.TrainingError, match="not saved"):
        trainer.save(tmp_path / "inf.npz")
    assert not (tmp_path / "inf.npz").exists()


def test_a_nan_checkpoint_does_not_resume(checkpoint, tmp_path, capsys, tiny_file):
    _, path = checkpoint
    arrays = dict(np.load(path))
    arrays["state/conv.weight"] = arrays["state/conv.weight"] * np.nan
    np.savez(tmp_path / "nan.npz", **arrays)
    code, _, err = cli(capsys, "train", tiny_file, "--resume", tmp_path / "nan.npz", "--save", tmp_path / "o.npz")
    assert code == 2 and "conv.weight: holds NaN or infinite values" in err


def test_ctrl_c_names_the_checkpoint_to_resume_from(capsys, tmp_path, monkeypatch, tiny_file):
    save = tmp_path / "k.npz"
    calls = {"n": 0}
    real = Trainer.step

    def interrupted(self, x, y):
        calls["n"] += 1
        if calls["n"] > 25:          # in the second epoch (23 steps an epoch at batch 64)
            raise KeyboardInterrupt
        return real(self, x, y)

    monkeypatch.setattr(Trainer, "step", interrupted)
    code, _, err = cli(capsys, "train", tiny_file, "--epochs", "3", "--save", save, "--progress", "off")
    assert code == 130
    assert f"interrupted in epoch 2; the last checkpoint is {save} (after epoch 1): continue with --resume {save}" in err


# ---- help -------------------------------------------------------------------------------------

def test_every_option_has_help_and_shows_its_default(capsys):
    import argparse
    from graphconv.cli import parser
    p = parser()
    subparsers = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        assert sub.description, name
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "examples per training step (default: 64)" in text and "(default: 3)" in text
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "batch size of the random inputs (default: 8)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["models", "--help"])
    assert "List the bundled models." in capsys.readouterr().out


@pytest.mark.skipif(torch is None, reason="PyTorch not installed")
def test_the_cpu_benchmark_pins_threads_reports_a_ratio_and_writes_only_with_save():
    import subprocess
    import sys
    root = os.path.join(os.path.dirname(__file__), "..")
    results = os.path.join(root, "benchmarks", "results")
    files = [f for f in os.listdir(results) if os.path.isfile(os.path.join(results, f))]
    before = {f: open(os.path.join(results, f), "rb").read() for f in files}
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_cpu.py"), "--quick", "--cases",
                           "lenet5:16", "--phases", "forward", "--rounds", "2", "--torch-threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    from graphconv import reference
    assert f"threads: numpy backend BLAS {reference.BLAS_THREADS} " in done.stdout and "PyTorch intra-op 1;" in done.stdout
    assert re.search(r"lenet5 +batch +16 forward: numpy +[\d.]+ ms +torch +[\d.]+ ms +ratio [\d.]+x \(spread \d+%\)",
                     done.stdout), done.stdout
    assert "(not saved: pass --save" in done.stdout
    after = {f: open(os.path.join(results, f), "rb").read() for f in files}
    assert before == after


def _output_twice():
    g = gc.Graph("twice")
    x = g.input("x", ("N", 3))
    g.output(g.relu(x))
    g.output(g.relu(x))


@pytest.mark.parametrize("call,message", [
    (lambda: gc.define_activation("b", "not an expr"), "'not an expr' is not a sympy expression"),
    (lambda: gc.init_params(MODELS["lenet5"](), seed=-1), "seed must be a non-negative integer, got -1"),
    (lambda: Optimizer("sgd", lr="0.1"), "optimizer lr must be a number, got '0.1'"),
    (lambda: Optimizer("sgd", momentum=1.5), r"optimizer momentum must be finite and in \[0, 1\), got 1.5"),
    (lambda: MODELS["lenet5"]().summary(batch=-3), r"summary\(batch=...\) takes a positive integer, got -3"),
    (_output_twice, r"output\(\) again would drop the outputs already marked \(relu1\)"),
    (lambda: gc.Graph("names").input("x y%", ("N", 3)), "input names are identifiers .* got 'x y%'"),
])
def test_the_python_apis_bad_input_is_one_graphconv_error(call, message):
    with pytest.raises(gc.GraphConvError, match=message):
        call()


@pytest.mark.parametrize("layer, op", [
    (lambda g, x: g.conv2d(x, 4, 3, name="c1"), "c1 [conv2d]"),
    (lambda g, x: g.max_pool2d(x, 2, name="p1"), "p1 [max_pool2d]"),
    (lambda g, x: g.batch_norm2d(x, name="bn"), "bn [batch_norm]"),   # its sums were silently wrong
])
def test_the_batch_size_as_a_spatial_dim_is_refused_by_the_kernel_backends(layer, op):
    """("N", 3, 8, "N"): numpy runs it; the kernels bake every dim but the first in, so a conv or pool
    crashed deep in the GEMM lowering (`Cannot convert symbols to int`) and a batch norm's sums were
    wrong; elementwise kernels take any dim at run time and still run it."""
    from codegen.program import Program
    g = gc.Graph("t")
    x = g.input("x", ("N", 3, 8, "N"))
    g.output(layer(g, x))
    message = (f"{op}: operand x is [N, 3, 8, N]: the batch size N is its dim 3; {op.split('[')[1][:-1]} kernels "
               f"take the batch size only as dim 0 (every other size is baked into it): give that dim a fixed "
               f"size, or run this graph with backend='numpy'")
    with pytest.raises(gc.CompileError, match=re.escape(message)):
        Program(g)
    xs = np.random.default_rng(0).random((4, 3, 8, 4), dtype=np.float32)
    assert gc.compile(g)(xs, params=gc.init_params(g, seed=0)).shape[0] == 4
    g = gc.Graph("t")
    g.output(g.relu(g.input("x", ("N", 3, 8, "N"))))
    Program(g)


def test_the_kernel_backends_refuse_what_numpy_refuses(tmp_path):
    """Found by a sweep of the kernel backends' options (session 8): an empty batch killed the host
    process (a division by zero in a kernel's launch), a class index past the scores trained on NaN,
    and tf32="False" ran TF32; each is now the numpy backend's error, or a GraphError."""
    from codegen import host
    from codegen.emit import emit
    g, p = tiny(), gc.init_params(tiny(), seed=0)
    program = gc.compile(g, backend="host")
    with pytest.raises(gc.InputError, match="dim N is 0"):
        program(np.zeros((0, 1, 8, 8), np.float32), params=p)
    for bad in (0, -1, None, True, 2.5):
        with pytest.raises(gc.InputError, match="bind.batch. takes a positive integer"):
            program.bind(bad)
    trainer = Trainer(g, Optimizer("adam", lr=1e-3), backend="host")
    x = np.zeros((3, 1, 8, 8), np.float32)
    with pytest.raises(gc.InputError, match=r"target holds class 10, outside 0..9"):
        trainer.step(x, np.array([10, 0, 1]))
    with pytest.raises(gc.InputError, match=r"target holds class -1, outside 0..9"):
        trainer.evaluate(x, np.array([0, -1, 1]))
    assert trainer.steps == 0
    with pytest.raises(gc.InputError, match="evaluate: no examples"):
        trainer.evaluate(x[:0], np.zeros(0, np.int64))
    for kw in ({"tf32": "False"}, {"winograd": 1}, {"winograd": None}):
        with pytest.raises(gc.GraphError, match="must be True or False"):
            gc.compile(g, backend="host", **kw)
    with pytest.raises(gc.GraphError, match="must be True or False"):
        Trainer(g, backend="host", winograd="no")
    assert gc.compile(g, dtype=np.float64).graph.dtype == "float64"      # a NumPy type names a dtype too
    assert gc.Graph("t", np.dtype("float64")).dtype == "float64"
    assert gc.Graph("t").input("x", (2,), dtype=np.int64).node.attrs["dtype"] == "int64"
    for bad in ("float16", np.float16, 32, None, "float", "double", "f4", float):
        with pytest.raises(gc.GraphError, match=r"dtype must be float32 or float64, got"):
            gc.compile(g, dtype=bad) if bad is not None else gc.Graph("t", bad)
    with pytest.raises(gc.BackendError, match="the host schedules are"):
        with host.schedule(None):
            pass
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub", ""):
        with pytest.raises(gc.GraphConvError, match="emit: "):
            emit(g, out, check_nvrtc=False)
    with pytest.raises(gc.GraphError, match="choose one"):
        emit(g, tmp_path / "k", check_nvrtc=False, tf32=True, winograd=True)
    with pytest.raises(gc.GraphError, match="needs a float32 graph"):
        emit(gc.cast(g, "float64"), tmp_path / "k", check_nvrtc=False, winograd=True)


def test_the_cli_refuses_a_batch_dim_given_twice(capsys):
    code, _, err = cli(capsys, "run", "lenet5", "--dim", "N=3", "--batch", "1")
    assert code == 2 and "N is lenet5's batch dim; give its size with --batch" in err


def test_filters_and_report_take_a_weights_file_as_predict_does(tmp_path, capsys):
    """`graphconv export` writes a plain weights file; filters and report refused it ("not part of a
    graphconv checkpoint") where predict and gc.load_weights take it."""
    weights = tmp_path / "w.npz"
    gc.save_weights(weights, gc.init_params(MODELS["lenet5"](), seed=3))
    code, out, _ = cli(capsys, "filters", "lenet5", "--weights", weights, "-o", tmp_path / "f.png")
    assert code == 0 and f"from {weights}" in out and (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = cli(capsys, "filters", "lenet5", "--weights", weights, "-o", tmp_path / "f.jpg")
    assert code == 2 and "the picture is a PNG; name the file with .png" in err and not (tmp_path / "f.jpg").exists()
    code, out, _ = cli(capsys, "report", "lenet5", "--weights", weights, "-o", tmp_path / "r.html")
    assert code == 0 and (tmp_path / "r.html").stat().st_size > 1000


def test_a_tensor_of_another_graph_of_the_same_name_says_so():
    a, b = gc.Graph("u"), gc.Graph("u")
    x = a.input("x", ("N", 3))
    with pytest.raises(gc.GraphError, match="operand x belongs to another graph also named u"):
        b.relu(x)
    with pytest.raises(gc.GraphError, match="operand x belongs to graph u, not v"):
        gc.Graph("v").relu(x)


def test_emit_into_awkward_folders_says_what_is_wrong(capsys, tmp_path):
    """A folder holding a .cu file of the user's in another encoding (kept, not read as UTF-8), a
    folder named like a kernel where its file goes, a folder that cannot be made: one line each."""
    mine = tmp_path / "d" / "mine.cu"
    mine.parent.mkdir()
    mine.write_bytes(b"// caf\xe9\n")
    code, _, _ = cli(capsys, "emit", "seed_conv", "-o", tmp_path / "d", "--no-nvrtc")
    assert code == 0 and mine.read_bytes() == b"// caf\xe9\n"
    (tmp_path / "d2" / "sub.cu").mkdir(parents=True)                       # a folder named *.cu: left alone
    assert cli(capsys, "emit", "seed_conv", "-o", tmp_path / "d2", "--no-nvrtc")[0] == 0
    kernel = next((tmp_path / "d").glob("conv2d*.cu")).name
    (tmp_path / "d3" / kernel).mkdir(parents=True)
    code, _, err = cli(capsys, "emit", "seed_conv", "-o", tmp_path / "d3", "--no-nvrtc")
    assert code == 2 and f"{kernel} exists and is not a regular file; emit writes only over" in err
    (tmp_path / "file").write_text("x")
    code, _, err = cli(capsys, "emit", "seed_conv", "-o", tmp_path / "file" / "sub", "--no-nvrtc")
    assert code == 2 and "is a file (or lies under one)" in err


def test_export_never_overwrites_its_checkpoint_or_a_file_not_its_own(capsys, tmp_path):
    """export -o over the --weights checkpoint lost its optimizer state and epochs without a word,
    and over any file; now: a weights file is rewritten, the rest needs --force, never --weights."""
    graph = gc.models.MODELS["lenet5"]()
    trainer = gc.Trainer(graph, gc.Optimizer("adam"), seed=0)
    trainer.epoch = 1
    trainer.save(tmp_path / "ck.npz")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "ck2.npz").write_bytes((tmp_path / "ck.npz").read_bytes())
    for target, message in (("ck.npz", "is the --weights file itself"), ("notes.txt", "is not a graphconv weights file"),
                            ("ck2.npz", "is a checkpoint (after 1 epoch, with its optimizer state)")):
        code, _, err = cli(capsys, "export", "lenet5", "--weights", tmp_path / "ck.npz", "-o", tmp_path / target)
        assert code == 2 and message in err, err
    assert (tmp_path / "notes.txt").read_text() == "mine" and gc.checkpoint.read_checkpoint(tmp_path / "ck.npz").epoch == 1
    for extra in ((), (), ("--force",)):          # a new weights file, written again, then over the checkpoint copy
        target = "ck2.npz" if extra else "w.npz"
        assert cli(capsys, "export", "lenet5", "--weights", tmp_path / "ck.npz", "-o", tmp_path / target, *extra)[0] == 0
    code, _, err = cli(capsys, "export", "lenet5", "--weights", tmp_path / "ck.npz", "-o", tmp_path / "ck.npz", "--force")
    assert code == 2 and "is the --weights file itself" in err


def test_a_report_with_weights_of_a_model_without_2d_convolutions_is_written(capsys, tmp_path):
    """report --weights drew the first 2-D conv's filters and refused the whole page without one (a
    Conv1d net); the page now says there is nothing to draw."""
    graph = gc.models.MODELS["conv1d_net"]()
    gc.save_weights(tmp_path / "w.npz", gc.init_params(graph, seed=0))
    code, _, _ = cli(capsys, "report", "conv1d_net", "--weights", tmp_path / "w.npz", "-o", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert code == 0 and "conv1d_net has no 2-D convolution whose filters could be drawn" in page
    code, _, err = cli(capsys, "filters", "conv1d_net", "--weights", tmp_path / "w.npz", "-o", tmp_path / "f.png")
    assert code == 2 and "no 2-D convolution" in err


def test_flags_given_as_strings_and_a_nan_margin_are_refused_naming_the_layer():
    """bias="False" and affine="no" were read by their truth (a bias and an affine batch norm made
    anyway); a NaN hinge margin gave a NaN loss."""
    g = gc.Graph("v")
    x = g.input("x", ("N", 3, 8, 8))
    y = g.input("y", ("N",), dtype="int64")
    for call, message in ((lambda: g.conv2d(x, 4, 3, bias="False", name="c"), "c [conv2d]: bias must be True or False"),
                          (lambda: g.linear(g.flatten(x), 3, bias="no", name="fc"), "fc [linear]: bias must be"),
                          (lambda: g.batch_norm2d(x, affine="no", name="bn"), "bn [batch_norm2d]: affine must be"),
                          (lambda: g.conv_transpose2d(x, 2, 3, bias=None, name="t"), "t [conv_transpose2d]: bias"),
                          (lambda: g.hinge_loss(g.linear(g.flatten(x), 3, name="s"), y, margin=float("nan")),
                           "margin must be a finite number"),
                          (lambda: g.hinge_loss(g.linear(g.flatten(x), 3, name="s2"), y, margin="1"),
                           "margin must be a number")):
        with pytest.raises(gc.GraphError, match=re.escape(message)):
            call()
    assert "c.bias" not in g and "bn.weight" not in g
    g.conv2d(x, 4, 3, bias=False, name="plain")
    assert "plain.bias" not in g


def test_names_with_a_newline_are_refused_before_they_reach_a_kernel():
    """A layer named "fc\n#error injected" put a preprocessor line into its kernel's header comment
    (g++: #error injected)."""
    g = gc.Graph("v")
    x = g.input("x", ("N", 6))
    with pytest.raises(gc.GraphError, match=r"layer names are printable characters .*'fc\\n#error injected'"):
        g.linear(x, 3, name="fc\n#error injected")
    with pytest.raises(gc.GraphError, match="node names are printable"):
        g.apply("relu", x, name="r\tx")
    with pytest.raises(gc.GraphError, match="a graph's name is a non-empty string of printable characters"):
        gc.Graph("a\nb")
    g.linear(x, 3, name="fc é")                      # printable, if not ASCII: fine


def test_run_of_a_fixed_batch_model_says_the_batch_it_ran(capsys, tmp_path):
    """A model whose input is (4, 1, 8, 8) ran 4 examples under a header saying batch 8 (or the
    --batch given, which it ignored)."""
    (tmp_path / "fixed.py").write_text(
        "import graphconv as gc\n\ndef build():\n    g = gc.Graph('fixed')\n    x = g.input('x', (4, 1, 8, 8))\n"
        "    g.output(g.linear(g.flatten(g.relu(g.conv2d(x, 2, 3, name='c'))), 3, name='fc'))\n    return g\n")
    code, out, _ = cli(capsys, "run", f"{tmp_path / 'fixed.py'}:build", "--backend", "host")
    assert code == 0 and "batch 4," in out and "-> float32[4, 3]" in out
    code, _, err = cli(capsys, "run", f"{tmp_path / 'fixed.py'}:build", "--batch", "3")
    assert code == 2 and "--batch 3: fixed's input x has a fixed first dim of 4" in err
    code, out, _ = cli(capsys, "run", "lenet5", "--batch", "2")
    assert code == 0 and "batch 2," in out


def test_what_a_python_user_gets_wrong_first_is_refused_in_one_line():
    """A model's name where a graph goes, an optimizer given by its kind (accepted) or as something
    else, -x and x / 2 on a tensor (not ops: the message says what to write instead), and a loss asked
    of a graph that already ends in its own."""
    for call in (lambda: gc.compile("lenet5"), lambda: Trainer("lenet5")):
        with pytest.raises(gc.InputError, match=r"takes a graph \(gc.Graph, or MODELS\[name\]\(\)\), got str 'lenet5'"):
            call()
    assert Trainer(MODELS["lenet5"](), "sgd").optimizer.kind == "sgd"
    from graphconv.pipeline import build
    assert any(n.op == "sgd_param" for n in build(MODELS["lenet5"](), "train", optimizer="sgd").topo())
    with pytest.raises(gc.GraphError, match=r"optimizer must be an Optimizer .* or its kind \('adam', 'sgd'\), got int 3"):
        Trainer(MODELS["lenet5"](), 3)
    g = gc.Graph("ops")
    x = g.input("x", ("N", 3))
    for call, what in ((lambda: -x, r"-x \(negation\)"), (lambda: x / 2, r"x / y \(division\)"),
                       (lambda: 2 / x, r"y / x \(division\)")):
        with pytest.raises(gc.GraphError, match=rf"x: {what} of a tensor is not a graphconv op; scale by a tensor "
                                                r"with g.mul\(x, s\).*gc.define_activation"):
            call()
    with_loss = attach_loss(MODELS["lenet5"]())
    assert attach_loss(with_loss).outputs == with_loss.outputs            # its own loss: as it is
    with pytest.raises(gc.GraphError, match=r"lenet5 already ends in its own loss \(loss \[softmax_cross_entropy\] "
                                            r"is a scalar\), so the loss 'hinge' would not be used"):
        attach_loss(with_loss, "hinge")


def test_the_gradient_of_a_mean_to_a_scalar_keeps_its_shape_on_numpy():
    """mean_grad of a 0-d mean (an MSE loss of a scalar): a 0-d gradient, not [1]; the value is
    d/dx (mean(x) - t)^2 = 2 (mean(x) - t) / n on numpy and host alike."""
    from graphconv.autodiff import derive_backward
    g = gc.Graph("s")
    x, t = g.input("x", (3,)), g.input("t", ())
    g.output(g.mse_loss(g.mean(x), t))
    step = derive_backward(g, wrt=["x"])
    feed = {"x": np.array([1.0, 2.0, 4.5], np.float32), "t": np.array(2, np.float32)}
    for backend in ("numpy", "host"):
        out = gc.compile(step, backend=backend).run(feed, {})
        np.testing.assert_allclose(out["dx"], np.full(3, 2 * (2.5 - 2) / 3), rtol=1e-6, err_msg=backend)


@pytest.mark.skipif(torch is None, reason="needs PyTorch")
def test_a_bfloat16_state_dict_loads_cast_to_the_graphs_dtype():
    """NumPy has no bfloat16: such tensors are widened to float32 (exactly) and cast like float16 ones."""
    g = gc.Graph("lin")
    g.output(g.linear(g.flatten(g.input("x", ("N", 4))), 3, name="fc"))
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    sd = {k: v.bfloat16() for k, v in module.state_dict().items()}
    params = gc.load_state_dict(g, sd)
    assert params["fc.weight"].dtype == np.float32
    np.testing.assert_array_equal(params["fc.weight"], sd["1.weight"].float().numpy().T)


def test_the_batch_dim_goes_to_batch_wherever_a_command_has_it(capsys, tmp_path):
    """--dim N=3 names the batch: every command with --batch refuses it (summary printed "per example"
    over batch-3 rows); emit, which has no --batch, bakes it and its buffer plan says batch 3."""
    for argv in (["summary", "lenet5"], ["run", "lenet5"], ["dump", "lenet5"]):
        code, _, err = cli(capsys, *argv, "--dim", "N=3")
        assert code == 2 and "N is lenet5's batch dim; give its size with --batch" in err, argv
    code, out, _ = cli(capsys, "emit", "lenet5", "--dim", "N=3", "--no-nvrtc", "-o", str(tmp_path / "k"))
    assert code == 0 and "buffer plan at batch 3:" in out and "linear_relu_f32_in2450_out500" in out
    conv1 = (tmp_path / "k" / "conv2d_direct_relu_max_pool2d_f32_c1_k20_r5x5_s1x1_p2x2_i28x28.cu").read_text()
    assert "//   launch:    grid (12, 1, 1) x block" in conv1            # 4 tiles x 3 images, baked


# ---- session 14's review of the CLI and the public API -------------------------------------------------
def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_refuses_scores_that_overflowed_instead_of_calling_them_class_0():
    from graphconv.weights import predict
    g = MODELS["lenet5"]()
    params = gc.init_params(g, seed=0)
    x = np.full((3, 1, 28, 28), 3e38, np.float32)
    with pytest.raises(gc.InputError, match="lenet5 gave NaN or infinite scores for 3 of 3 examples"):
        predict(g, params, x)


@pytest.mark.parametrize("dtype, lr", [("float32", 1e-46), ("float32", 1e-39), ("float64", 1e-320)])
def test_a_learning_rate_the_graphs_dtype_cannot_hold_is_refused(dtype, lr):
    with pytest.raises(gc.GraphError, match=f"optimizer lr {lr:g} is below the smallest normal {dtype}"):
        Trainer(MODELS["conv1d_net"](dtype), Optimizer("sgd", lr=lr))


@pytest.mark.skipif(torch is None, reason="PyTorch not installed")
def test_a_state_dict_value_too_large_for_float32_is_refused_not_made_inf():
    from graphconv.weights import load_state_dict
    g = MODELS["lenet5"]()
    sd = {k: torch.from_numpy(np.asarray(v, np.float64).T.copy() if k.startswith("fc") and v.ndim == 2 else
                              np.asarray(v, np.float64))
          for k, v in gc.init_params(g).items()}
    sd["conv1.weight"][0, 0, 0, 0] = 1e300
    with pytest.raises(gc.GraphConvError, match="conv1.weight: PyTorch's conv1.weight holds values too large for float32"):
        load_state_dict(g, sd)


def test_emit_of_a_graph_without_kernels_says_so(capsys, tmp_path):
    (tmp_path / "m.py").write_text("import graphconv as gc\n\ndef build():\n    g = gc.Graph('views')\n"
                                   "    g.output(g.flatten(g.input('x', ('N', 2, 3))))\n    return g\n")
    code, _, err = run(capsys, "emit", f"{tmp_path / 'm.py'}:build", "--stage", "forward", "-o", str(tmp_path / "k"))
    assert code != 0 and "views computes nothing on a device" in err and "Traceback" not in err
    assert not (tmp_path / "k" / "manifest.json").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_a_save_path_that_cannot_be_written_is_refused_before_training(capsys, tmp_path):
    code, _, err = run(capsys, "train", "conv1d_net", "--epochs", "1", "--save", "/proc/x.npz")
    assert code != 0 and "/proc/x.npz: cannot write in /proc" in err and "Traceback" not in err
    long = str(tmp_path / ("w" * 300 + ".npz"))
    code, _, err = run(capsys, "train", "conv1d_net", "--epochs", "1", "--save", long)
    assert code != 0 and "the file name is longer than the 255 bytes" in err


def test_weights_named_like_numpys_savez_keywords_are_written_and_read_back(tmp_path):
    """np.savez(f, **arrays) took an array named allow_pickle as its flag (and left it out) and one
    named file as a second file argument."""
    from graphconv.checkpoint import write_npz
    arrays = {"allow_pickle": np.arange(3.0), "file": np.ones((2, 2)), "conv1.weight": np.zeros(4, np.float32)}
    write_npz(tmp_path / "w.npz", arrays)
    with np.load(tmp_path / "w.npz") as back:
        assert sorted(back.files) == sorted(arrays)
        for name, value in arrays.items():
            np.testing.assert_array_equal(back[name], value)
            assert back[name].dtype == value.dtype


def test_public_api_mistakes_are_one_line_errors():
    from graphconv.passes import bind_dims
    import sympy as sp
    with pytest.raises(gc.InputError, match="init_params: takes a graph"):
        gc.init_params(None)
    with pytest.raises(gc.InputError, match="init_params: takes a graph"):
        gc.init_params("lenet5")
    g = gc.Graph("fcn")
    g.output(g.relu(g.conv2d(g.input("x", ("N", 3, "H", "W")), 4, 3, name="c")))
    with pytest.raises(gc.GraphError, match="bind_dims takes a dict of dim name -> size"):
        bind_dims(g, [("H", 8)])
    bound = bind_dims(g, {sp.Symbol("H"): np.int64(8), "W": np.int32(6)})     # NumPy ints, a sympy symbol
    assert [int(d) for d in bound.node("c").shape[2:]] == [6, 4]


def test_a_failed_resumed_run_names_the_checkpoint_it_resumed_not_a_file_it_never_wrote(capsys, tmp_path, monkeypatch):
    first = tmp_path / "l.npz"
    assert run(capsys, "train", "conv1d_net", "--epochs", "1", "--save", str(first), "--progress", "off")[0] == 0
    other = tmp_path / "other.npz"
    assert run(capsys, "train", "conv1d_net", "--epochs", "1", "--save", str(other), "--progress", "off",
               "--seed", "3")[0] == 0

    def fail(self, x, y):
        raise gc.TrainingError("step failed")
    monkeypatch.setattr(Trainer, "step", fail)
    code, _, err = run(capsys, "train", "conv1d_net", "--epochs", "2", "--resume", str(first), "--save", str(other),
                       "--force", "--progress", "off")
    assert code != 0 and f"the last checkpoint is {first} (after epoch 1): continue with --resume {first}" in err, err


def test_training_a_model_with_a_fixed_batch_says_why_it_cannot(capsys, tmp_path):
    (tmp_path / "m.py").write_text("import graphconv as gc\n\ndef build():\n    g = gc.Graph('fb')\n"
                                   "    g.output(g.linear(g.flatten(g.input('x', (4, 1, 8, 8))), 10, name='fc'))\n"
                                   "    return g\n")
    code, _, err = run(capsys, "train", f"{tmp_path / 'm.py'}:build", "--batch", "4", "--epochs", "1")
    assert code != 0 and "fb's input x has a fixed first dim of 4 (no batch dim)" in err, err


@pytest.mark.skipif(torch is None, reason="PyTorch not installed")
def test_a_state_dict_with_meta_or_sparse_tensors(capsys):
    """A meta-device tensor has no values: refused by name (it was a NotImplementedError from torch);
    a sparse one loads its dense values (it was a TypeError)."""
    from graphconv.weights import load_state_dict
    g = MODELS["lenet5"]()
    sd = {k: torch.from_numpy(np.ascontiguousarray(v.T) if k.startswith("fc") and v.ndim == 2 else v)
          for k, v in gc.init_params(g).items()}
    meta = dict(sd, **{"conv1.bias": torch.empty(20, device="meta")})
    with pytest.raises(gc.InputError, match="conv1.bias: a tensor on the meta device holds no values"):
        load_state_dict(g, meta)
    sparse = dict(sd, **{"fc2.weight": sd["fc2.weight"].to_sparse()})
    np.testing.assert_array_equal(load_state_dict(g, sparse)["fc2.weight"], gc.init_params(g)["fc2.weight"])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_given_as_weights_or_input_is_refused_instead_of_waiting_forever(capsys, tmp_path):
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    code, _, err = run(capsys, "predict", "lenet5", "--weights", str(fifo))
    assert code != 0 and "fifo.npz: is not a regular file (a pipe or a device?)" in err, err
    gc.save_weights(tmp_path / "w.npz", gc.init_params(MODELS["lenet5"]()))
    code, _, err = run(capsys, "predict", "lenet5", "--weights", str(tmp_path / "w.npz"), "--input", str(fifo))
    assert code != 0 and "fifo.npz: is not a regular file (a pipe or a device?); give a .npy file" in err, err


@pytest.mark.parametrize("kind, kwargs, given", [("adam", {"momentum": 0.5}, "momentum"),
                                                 ("sgd", {"beta1": 0.8, "eps": 1e-6}, "beta1, eps")])
def test_a_setting_of_the_other_optimizer_is_refused_not_ignored(kind, kwargs, given):
    with pytest.raises(gc.GraphError, match=f"optimizer {given}: an {'sgd' if kind == 'adam' else 'adam'} setting, "
                                            f"which {kind} does not use"):
        Optimizer(kind, **kwargs)


def test_a_parameter_init_is_checked_when_the_graph_is_built():
    """A negative uniform bound, a non-finite or non-numeric constant and a symbolic parameter shape
    are refused by name at g.param (they crashed in NumPy at run time, or trained to NaN blamed on
    the learning rate)."""
    g = gc.Graph("inits")
    for shape, init, message in [((4,), ("uniform", -1.0), "takes a bound >= 0"),
                                 ((4,), ("constant", float("inf")), "takes a finite number, got inf"),
                                 ((4,), ("constant", "one"), "takes a number, got 'one'"),
                                 (("C",), ("constant", 1.0), "shape is known when the graph is built.*symbol C"),
                                 ((4,), ("constant", 1e39), "value 1e\\+39 is past the largest float32")]:
        with pytest.raises(gc.GraphError, match=f"scale \\[param\\]: .*{message}"):
            g.param("scale", shape, init)
    assert g.param("scale", (4,), ("uniform", 0.0)) is not None


def test_a_negative_running_variance_is_refused_wherever_weights_come_in(tmp_path):
    g = gc.Graph("bnnet")
    g.output(g.linear(g.flatten(g.batch_norm2d(g.input("x", ("N", 2, 3, 3)), name="bn")), 3, name="fc"))
    params = gc.init_params(g, seed=0)
    params["bn.running_var"] = np.array([1.0, -0.5], np.float32)
    x = np.ones((2, 2, 3, 3), np.float32)
    with pytest.raises(gc.GraphConvError, match="bn.running_var: holds negative values \\(-0.5\\); it is a batch "
                                                "norm's running variance"):
        gc.predict(g, params, x)
    np.savez(tmp_path / "w.npz", **params)
    with pytest.raises(gc.GraphConvError, match="bn.running_var: holds negative values"):
        gc.load_weights(tmp_path / "w.npz", g)


@pytest.mark.parametrize("where, message", [
    ("", "demo -o: give a folder"),
    ("afile", "afile: is a file; the demo writes a folder"),
    ("missing/deeper/../../afile/x", "cannot create the folder"),
    ("d1", "d1/report.html is a folder, where the demo writes its report.html file"),
])
def test_demo_refuses_an_output_folder_it_cannot_fill_before_any_work(capsys, tmp_path, monkeypatch, where, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "d1" / "report.html").mkdir(parents=True)
    monkeypatch.setattr("graphconv.models.lenet5", lambda *a: pytest.fail("started before checking -o"))
    code, _, err = cli(capsys, "demo", "-o", where)
    assert code == 2 and message in err and "Traceback" not in err


def test_work_too_large_for_memory_names_the_batch_or_the_input_sizes(capsys, tmp_path):
    """A batch that does not fit is told to shrink; where one example alone does not fit (huge --dim
    sizes), the advice is smaller input sizes, not a smaller batch."""
    from graphconv.memory import smaller
    assert smaller(80, 8, available=20) == "use a smaller batch"
    assert smaller(800, 8, available=20).startswith("one example alone needs about 100 B: use smaller input sizes")
    path = tmp_path / "sym.py"
    path.write_text("import graphconv as gc\ndef build():\n    g = gc.Graph('sym')\n"
                    "    x = g.input('x', ('N', 3, 'H', 'W'))\n    g.output(g.global_avg_pool(x, name='gap'))\n"
                    "    return g\n")
    code, _, err = cli(capsys, "run", f"{path}:build", "--dim", "H=200000", "--dim", "W=200000")
    assert code == 2 and "one example alone needs about" in err and "smaller batch" not in err


@pytest.mark.parametrize("setting, message", [
    ({"lr": 1e39}, "optimizer lr 1e\\+39 is above the largest float32"),
    ({"weight_decay": 1e39}, "optimizer weight_decay 1e\\+39 is above the largest float32"),
    ({"eps": 1e-50}, "optimizer eps 1e-50 is below the smallest normal float32"),
])
def test_optimizer_settings_outside_the_graphs_dtype_are_refused_by_name(setting, message):
    """1e39 is inf in float32 and 1e-50 is 0: every step was refused as non-finite and blamed on the
    learning rate (found by review); float64 takes them."""
    with pytest.raises(gc.GraphError, match=message):
        Trainer(tiny(), Optimizer("adam", **setting))
    Trainer(gc.cast(tiny(), "float64"), Optimizer("adam", **setting))


def test_a_diverging_step_with_a_large_weight_decay_names_it(capsys, tiny_file, tmp_path):
    code, _, err = cli(capsys, "train", tiny_file, "--weight-decay", "1e30", "--epochs", "1", "--save",
                       tmp_path / "w.npz", "--progress", "off")
    assert code != 0 and "a lower learning rate or weight decay may help" in err


def test_layers_take_pytorchs_positional_arguments():
    """g.conv2d(x, 4, 3, 2, 1), g.max_pool2d(h, 2, 2), g.avg_pool2d(h, 2, 2, 0, True), g.batch_norm2d(h, 4)
    as in PyTorch (a raw TypeError before, found by review); more of them than PyTorch's order has
    here, or one given both ways, is refused naming the layer."""
    g = gc.Graph("positional")
    x = g.input("x", ("N", 3, 16, 16))
    h = g.conv2d(x, 4, 3, 2, 1, name="c")
    assert g.node("c").attrs["stride"] == (2, 2) and g.node("c").attrs["padding"] == ((1, 1), (1, 1))
    g.max_pool2d(h, 2, 2, name="mp")
    g.avg_pool2d(h, 2, 2, 0, True, name="ap")
    g.batch_norm2d(h, 4, 1e-3, name="bn")
    g.conv_transpose2d(h, 2, 3, 2, 1, 1, name="ct")
    assert g.node("mp").attrs["stride"] == (2, 2) and g.node("ap").attrs["ceil_mode"] is True
    assert g.node("bn").attrs["eps"] == 1e-3 and g.node("ct").attrs["output_padding"] == (1, 1)
    assert g.node("mp").shape[2:] == (4, 4) and g.node("ct").shape[2:] == (16, 16)
    with pytest.raises(gc.GraphError, match=r"c2 \[conv2d\]: stride given both by position and by name"):
        g.conv2d(x, 4, 3, 2, stride=2, name="c2")
    with pytest.raises(gc.GraphError, match=r"mp2 \[max_pool2d\]: takes at most 3 positional arguments"):
        g.max_pool2d(h, 2, 2, 0, 1, True, name="mp2")


def test_a_data_set_made_constant_by_a_tiny_input_is_refused_not_divided_by_zero(capsys, tmp_path):
    """An input of one value takes the digits' corner pixel, 0 in every image: standardising divided
    by a zero deviation (a NumPy warning, then NaN inputs blamed on the input; found by review)."""
    path = tmp_path / "px.py"
    path.write_text("import graphconv as gc\ndef build():\n    g = gc.Graph('px')\n"
                    "    g.output(g.linear(g.flatten(g.input('x', ('N', 1, 1, 1))), 10, name='fc'))\n    return g\n")
    code, _, err = cli(capsys, "train", f"{path}:build", "--epochs", "1", "--save", tmp_path / "w.npz")
    assert code == 2 and "is one constant value (0) in every example" in err and "Warning" not in err


def test_names_that_would_read_as_checkpoint_sections_are_refused():
    """A layer named state/c saved by save_weights read back as a broken checkpoint (found by review)."""
    g = gc.Graph("sections")
    x = g.input("x", ("N", 3, 8, 8))
    for name in ("state/c", "meta/epoch"):
        with pytest.raises(gc.GraphError, match="names beginning with state/ or meta/ are reserved"):
            g.conv2d(x, 4, 3, name=name)
    assert g.conv2d(x, 4, 3, name="my/state/c") is not None


def test_input_dims_given_as_expressions_of_the_users_own_symbols():
    """sp.Symbol("H") of the user's is graphconv's dim H: -H is refused when the input is declared,
    2*H bound by another input's H works, and 2*H with no input giving H says so (it printed
    "dim 2 is 5, but 2*H = 2*H"; found by review)."""
    import sympy as sp
    H = sp.Symbol("H")
    with pytest.raises(gc.GraphConvError, match="dim 1 must be positive, got -H"):
        gc.Graph("neg").input("x", ("N", -H, 8))
    with pytest.raises(gc.GraphConvError, match="the symbol 'x y' is not a valid symbol name"):
        gc.Graph("odd").input("x", ("N", sp.Symbol("x y")))
    g = gc.Graph("twice")
    g.input("h", ("N", 3, "H"))
    g.output(g.relu(g.input("y", ("N", 3, 2 * H)), name="r"))
    assert gc.compile(g)(np.zeros((1, 3, 5), np.float32), np.ones((1, 3, 10), np.float32)).shape == (1, 3, 10)
    alone = gc.Graph("alone")
    alone.output(alone.relu(alone.input("x", ("N", 3, 2 * H, "W")), name="r"))
    with pytest.raises(gc.InputError, match=r"x: dim 2 is 2\*H, and no input has H as a dim of its own"):
        gc.compile(alone)(np.zeros((1, 3, 10, 4), np.float32))


def test_dump_report_and_emit_never_overwrite_what_they_did_not_write(capsys, tmp_path, monkeypatch):
    """dump/report -o over the model file, the --weights checkpoint or an .npz/.npy/.py replaced it;
    emit -o wrote over a manifest.json of the user's, through a symlinked one, and crashed on a
    non-UTF-8 one; dump --format svg -o pic.png wrote SVG into a .png (all found by review)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.py").write_text("import graphconv as gc\ndef build():\n    g = gc.Graph('m')\n"
                                   "    g.output(g.linear(g.flatten(g.input('x', ('N', 1, 4, 4))), 3, name='fc'))\n"
                                   "    return g\n")
    source = (tmp_path / "m.py").read_text()
    np.savez(tmp_path / "w.npz", a=np.zeros(2))
    for argv, message in [(["dump", "m.py:build", "-o", "m.py"], "own input (the model file)"),
                          (["dump", "m.py:build", "-o", "w.npz"], "is a .npz file, which this command never writes"),
                          (["dump", "m.py:build", "--format", "svg", "-o", "pic.png"], "name the file with .svg")]:
        code, _, err = cli(capsys, *argv)
        assert code == 2 and message in err, err
    assert (tmp_path / "m.py").read_text() == source and np.load(tmp_path / "w.npz")["a"].shape == (2,)
    assert cli(capsys, "dump", "m.py:build", "-o", "out.txt")[0] == 0
    assert cli(capsys, "dump", "m.py:build", "-o", "out.txt")[0] == 0          # its own earlier output: fine
    for folder, make in [("theirs", lambda p: p.write_text('{"name": "mine"}')),
                         ("binary", lambda p: p.write_bytes(b"\xff\xfe\x00bin")),
                         ("linked", lambda p: os.symlink(tmp_path / "target.txt", p))]:
        (tmp_path / folder).mkdir()
        (tmp_path / "target.txt").write_text("keep")
        make(tmp_path / folder / "manifest.json")
        code, _, err = cli(capsys, "emit", "m.py:build", "-o", folder, "--no-nvrtc")
        assert code == 2 and "emit writes only over the kernels and manifest it wrote" in err, err
    assert (tmp_path / "target.txt").read_text() == "keep"
    assert cli(capsys, "emit", "m.py:build", "-o", "kernels", "--no-nvrtc")[0] == 0
    assert cli(capsys, "emit", "m.py:build", "-o", "kernels", "--no-nvrtc")[0] == 0     # over its own: fine


def test_gradcheck_of_a_model_without_parameters_says_there_is_nothing_to_check(capsys, tmp_path):
    (tmp_path / "m.py").write_text("import graphconv as gc\ndef build():\n    g = gc.Graph('plain')\n"
                                   "    g.output(g.relu(g.input('x', ('N', 10)), name='r'))\n    return g\n")
    code, _, err = cli(capsys, "gradcheck", f"{tmp_path / 'm.py'}:build", "--batch", "2")
    assert code == 2 and "plain has no trainable parameters" in err


def test_bind_dims_takes_a_sympy_integer_and_dot_labels_keep_ampersands():
    import sympy as sp
    from graphconv.passes import bind_dims
    from graphconv.printer import FORMATS
    g = gc.Graph("s")
    g.output(g.relu(g.input("x", ("N", 3, "H", "W")), name="a&amp;b"))
    assert tuple(bind_dims(g, {"H": sp.Integer(8), "W": 8}).inputs[0].shape[2:]) == (8, 8)
    with pytest.raises(gc.GraphError, match=r"dim H must be a positive integer, got 8.0 \(float\)"):
        bind_dims(g, {"H": 8.0})
    assert '"a&amp;amp;b"' in FORMATS["dot"](g)          # graphviz shows a&amp;b, not a&b
