"""Using what was trained: weights from a checkpoint or a weights file into any graph of the model,
predictions (Trainer.predict, graphconv predict) that reproduce training's test accuracy, export,
and PyTorch state dicts both ways (checked against torch.nn modules where torch is installed)."""
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

import graphconv as gc
from graphconv import data
from graphconv.errors import CheckpointError, GraphConvError, InputError
from graphconv.fusion import fuse
from graphconv.models import MODELS
from graphconv.passes import set_training
from graphconv.pipeline import build
from graphconv.training import Optimizer, Trainer, batches
from torch_oracle import torch


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """LeNet-5 trained one epoch on the digits, saved as a checkpoint; its reported test accuracy."""
    graph = MODELS["lenet5"]()
    trainer = Trainer(graph, Optimizer("adam", lr=1e-3), seed=0)
    x_tr, y_tr, x_te, y_te = data.load("digits", graph.inputs[0].shape)
    for idx in batches(len(x_tr), 64, 0, 0):
        trainer.step(x_tr[idx], y_tr[idx])
    trainer.epoch = 1
    path = tmp_path_factory.mktemp("ckpt") / "lenet5.npz"
    trainer.save(path)
    return trainer, path, trainer.evaluate(x_te, y_te)[1], (x_te, y_te)


def test_a_checkpoint_loads_into_the_forward_fused_and_eval_graphs(trained):
    trainer, path, _, (x_te, _) = trained
    graph = MODELS["lenet5"]()
    params = gc.load_weights(path, graph)
    assert set(params) == {n.name for n in graph.params}          # Adam's m, v and opt.step dropped
    want = gc.compile(graph).run({"x": x_te[:8]}, params)["fc2"]
    for other in (set_training(graph, False), fuse(set_training(graph, False))):
        assert set(gc.load_weights(path, other)) == set(params)
        np.testing.assert_allclose(gc.compile(other).run({"x": x_te[:8]}, params)["fc2"], want, rtol=1e-5, atol=1e-6)


def test_predict_reproduces_the_accuracy_training_reported_on_numpy_and_host(trained):
    trainer, path, accuracy, (x_te, y_te) = trained
    assert np.mean(trainer.predict(x_te) == y_te) == accuracy
    graph = MODELS["lenet5"]()
    params = gc.load_weights(path, graph)
    for backend in ("numpy", "host"):
        predicted, scores = gc.predict(graph, params, x_te, backend=backend, batch=100)
        assert scores.shape == (len(x_te), 10) and np.mean(predicted == y_te) == accuracy, backend


def test_predict_and_export_on_the_command_line(trained, tmp_path):
    _, path, accuracy, (_, y_te) = trained
    run = lambda *a: subprocess.run([sys.executable, "-m", "graphconv.cli", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=600, cwd=tmp_path)
    done = run("predict", "lenet5", "--weights", str(path))
    assert done.returncode == 0, done.stderr
    right = round(accuracy * len(y_te))
    assert f"accuracy {accuracy:.2%} ({right} of {len(y_te)})" in done.stdout
    matrix = [line.split()[1:] for line in done.stdout.splitlines()[-10:]]
    assert sum(int(row[i]) for i, row in enumerate(matrix)) == right               # the diagonal
    assert sum(int(v) for row in matrix for v in row) == len(y_te)
    done = run("export", "lenet5", "--weights", str(path), "-o", "w.npz")
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "w.npz") as f:
        assert sorted(f.files) == sorted(n.name for n in MODELS["lenet5"]().params)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(tmp_path / "w.npz").st_mode) == 0o666 & ~mask            # not mkstemp's 0600
    np.save(tmp_path / "x.npy", data.load("digits", MODELS["lenet5"]().inputs[0].shape)[2][:5])
    done = run("predict", "lenet5", "--weights", "w.npz", "--input", "x.npy", "--backend", "host")
    assert done.returncode == 0 and "count per class" in done.stdout, done.stderr
    for args, message in ((("--input", "nope.npy"), "nope.npy: no such file"),
                          (("--dtype", "float64"), "build it in float32 (--dtype float32)")):
        done = run("predict", "lenet5", "--weights", "w.npz", *args)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


NET_WITH_BUFFERS = """
import graphconv as gc

def net():
    g = gc.Graph("bufnet")
    x = g.input("x", ("N", 1, 8, 8))
    h = g.relu(g.batch_norm2d(g.conv2d(x, 4, 3, padding=1, name="c1"), name="bn1"))
    h = g.dropout(g.flatten(g.max_pool2d(h, 2)), 0.25)
    g.output(g.linear(h, 10, name="fc"))
    return g
"""


def test_export_keeps_parameters_and_buffers_and_drops_the_dropout_step_counter(tmp_path, capsys):
    """A weights file is for using the model: batch norm's running statistics go in, dropout's step
    counter (training's run-time state; loading starts it afresh) does not, and the message counts
    parameters as `summary` does, buffers apart."""
    from graphconv.cli import main
    from graphconv.models import load
    from graphconv.printer import to_dot
    model = f"{tmp_path / 'net.py'}:net"
    (tmp_path / "net.py").write_text(NET_WITH_BUFFERS)
    graph = load(model)
    trainer = Trainer(graph, Optimizer("adam", lr=1e-3), seed=0)
    trainer.step(np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32), np.arange(8))
    trainer.save(tmp_path / "ck.npz")
    assert main(["export", model, "--weights", str(tmp_path / "ck.npz"), "-o", str(tmp_path / "w.npz")]) == 0
    out = capsys.readouterr().out
    size = lambda role: sum(int(np.prod(p.shape)) for p in graph.params if p.role == role)  # noqa: E731
    assert size("param") == 4 * 9 + 4 + 4 + 4 + 64 * 10 + 10 and size("buffer") == 8 + 1    # + the counter
    assert "(698 parameters + 8 in buffers, float32)" in out, out
    with np.load(tmp_path / "w.npz") as f:
        assert "dropout.step" not in f.files and {"bn1.running_mean", "bn1.running_var"} <= set(f.files)
    loaded = gc.load_weights(tmp_path / "w.npz", graph)                 # the counter starts afresh
    assert loaded["dropout.step"] == 0 and np.array_equal(loaded["bn1.running_var"], trainer.params["bn1.running_var"])
    dot = to_dot(graph)
    assert "dropout.step\\nbuffer" in dot and "bn1.running_mean\\nbuffer" in dot and "c1.weight\\nparam" in dot


def test_weights_of_another_model_are_refused_by_name(trained):
    _, path, _, _ = trained
    with pytest.raises(CheckpointError, match="conv1.bias: vgg_small has no parameter or buffer of that name"):
        gc.load_weights(path, MODELS["vgg_small"]())


def test_saving_weights_refuses_what_is_not_weights(tmp_path):
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        gc.save_weights(tmp_path / "w.npz", {"a.weight": np.array([np.nan], np.float32)})
    with pytest.raises(InputError, match="weights are float arrays"):
        gc.save_weights(tmp_path / "w.npz", {"a.weight": [1.0]})
    assert not (tmp_path / "w.npz").exists()


# ---- PyTorch state dicts --------------------------------------------------------------------------
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch not installed")


def torch_lenet5():
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 20, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5, padding=2),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2450, 500), nn.ReLU(), nn.Linear(500, 10))


class TorchVGG(torch.nn.Module if torch is not None else object):
    """vgg_small with graphconv's layer names (convs without bias before batch norm)."""

    def __init__(self):
        super().__init__()
        nn, c = torch.nn, 3
        for block, width in enumerate((32, 64, 128), 1):
            for i in (1, 2):
                setattr(self, f"conv{block}_{i}", nn.Conv2d(c, width, 3, padding=1, bias=False))
                setattr(self, f"bn{block}_{i}", nn.BatchNorm2d(width))
                c = width
        self.fc1, self.fc2 = nn.Linear(128 * 16, 256), nn.Linear(256, 10)

    def forward(self, x):
        F = torch.nn.functional
        for block in (1, 2, 3):
            for i in (1, 2):
                x = F.relu(getattr(self, f"bn{block}_{i}")(getattr(self, f"conv{block}_{i}")(x)))
            x = F.max_pool2d(x, 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def randomise_statistics(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


@needs_torch
@pytest.mark.parametrize("name,make", [("lenet5", torch_lenet5), ("vgg_small", TorchVGG)])
def test_a_pytorch_state_dict_loads_and_gives_the_same_outputs_both_ways(name, make):
    torch.manual_seed(0)
    module = make().double().eval()
    randomise_statistics(module)
    graph = set_training(MODELS[name]("float64"), False)
    x = np.random.default_rng(0).standard_normal((3, *[int(d) for d in graph.inputs[0].shape[1:]]))
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    params = gc.load_state_dict(graph, module.state_dict())          # Sequential: by order; the VGG: by name
    got = gc.compile(graph).run({"x": x}, params)[graph.outputs[0]]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # and back: graphconv's own weights into a fresh module of the same architecture
    ours = gc.init_params(graph, seed=3)
    fresh = make().double().eval()
    fresh.load_state_dict(gc.state_dict(graph, ours, like=fresh), strict=False)
    with torch.no_grad():
        theirs = fresh(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, gc.compile(graph).run({"x": x}, ours)[graph.outputs[0]], rtol=1e-10, atol=1e-12)
    plain = gc.state_dict(graph, ours)
    assert plain["fc1.weight"].shape == ours["fc1.weight"].shape[::-1]       # PyTorch's [out, in]


@needs_torch
def test_a_state_dict_of_another_architecture_is_refused_naming_the_layer():
    nn = torch.nn
    graph = MODELS["vgg_small"]()
    with_bias = TorchVGG()
    with_bias.conv1_1 = nn.Conv2d(3, 32, 3, padding=1)                     # a bias graphconv's conv1_1 lacks
    with pytest.raises(GraphConvError, match="conv1_1: PyTorch's conv1_1.bias has no counterpart"):
        gc.load_state_dict(graph, with_bias.state_dict())
    with pytest.raises(GraphConvError, match="neither their names nor their count match"):
        gc.load_state_dict(graph, torch_lenet5().state_dict())
    small = torch_lenet5()
    small[7] = nn.Linear(2450, 400)
    small[9] = nn.Linear(400, 10)
    with pytest.raises(GraphConvError, match=r"fc1.weight: PyTorch's 7.weight has shape \[2450, 400\] \(transposed\)"):
        gc.load_state_dict(MODELS["lenet5"](), small.state_dict())


def test_predict_takes_scores_after_a_global_pool_and_refuses_other_outputs(trained):
    g = gc.Graph("gap")
    x = g.input("x", ("N", 1, 28, 28))
    g.output(g.avg_pool2d(g.conv2d(x, 10, 3, padding=1, name="conv"), 28))      # [N, 10, 1, 1]
    params = gc.init_params(g, seed=0)
    images = trained[3][0][:7]
    predicted, scores = gc.predict(g, params, images)
    want = gc.compile(g).run({"x": images}, params)[g.outputs[0]].reshape(7, 10)
    assert predicted.shape == (7,) and np.array_equal(predicted, want.argmax(axis=1))
    seed = MODELS["seed_conv"]()                                               # [N, 10, 32, 32]: not scores
    with pytest.raises(GraphConvError, match=r"seed_conv's first output conv is \[N, 10, 32, 32\]; predicting"):
        gc.predict(seed, gc.init_params(seed, seed=0), np.zeros((2, 3, 32, 32), np.float32))


def test_predict_refuses_non_finite_inputs_and_weights(trained):
    trainer, path, _, (x_te, _) = trained
    graph = MODELS["lenet5"]()
    params = gc.load_weights(path, graph)
    bad = x_te[:3].copy()
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="1 of 2352 input values are NaN or infinite; nothing was predicted"):
        gc.predict(graph, params, bad)
    with pytest.raises(InputError, match="conv1.weight: holds NaN or infinite values"):
        gc.predict(graph, {**params, "conv1.weight": params["conv1.weight"] * np.nan}, x_te[:3])


def test_the_api_refuses_what_is_not_a_graph_params_or_a_state_dict(trained, tmp_path):
    _, path, _, _ = trained
    graph = MODELS["lenet5"]()
    with pytest.raises(InputError, match="load_weights: takes a graph"):
        gc.load_weights(path, "lenet5")
    with pytest.raises(InputError, match="save_weights: params is a non-empty dict"):
        gc.save_weights(tmp_path / "e.npz", {})
    with pytest.raises(InputError, match="state_dict: conv1.weight: missing from params"):
        gc.state_dict(graph, {})
    with pytest.raises(InputError, match="load_state_dict: takes a state dict"):
        gc.load_state_dict(graph, 3)
    with pytest.raises(CheckpointError, match="training-step graph .* resume training with Trainer.load"):
        gc.load_weights(path, trained[0].step_graph)


@needs_torch
def test_a_pytorch_module_of_a_larger_architecture_is_refused_by_name():
    nn = torch.nn
    module = TorchVGG()
    module.extra = nn.Linear(10, 10)                  # a layer graphconv's vgg_small does not have
    with pytest.raises(GraphConvError, match="module extra has no layer of that name in vgg_small"):
        gc.load_state_dict(MODELS["vgg_small"](), module)
    sd = TorchVGG().state_dict()
    sd["bn1_1.running_var"] = sd["bn1_1.running_var"] * float("nan")
    with pytest.raises(GraphConvError, match="bn1_1.running_var: PyTorch's bn1_1.running_var holds NaN"):
        gc.load_state_dict(MODELS["vgg_small"](), sd)


@needs_torch
def test_a_module_of_another_layer_kind_is_refused_even_where_the_shapes_agree():
    """Given a module, each parameter's PyTorch layer must be of its graphconv layer's kind: a
    ConvTranspose2d(4, 4, 3) weight has a Conv2d(4, 4, 3)'s shape, and would load into a conv2d and
    give other numbers. Its state dict alone carries no types: that loads by shape, as documented."""
    g = gc.Graph("t")
    g.output(g.conv2d(g.input("x", ("N", 4, 6, 6)), 4, 3, name="c"))
    wrong = torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 4, 3))
    with pytest.raises(GraphConvError, match=r"c: PyTorch's 0.weight belongs to a ConvTranspose2d, where t's c is a "
                                             r"conv2d \(a Conv2d in PyTorch\)"):
        gc.load_state_dict(g, wrong)
    right = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3))
    np.testing.assert_array_equal(gc.load_state_dict(g, right)["c.weight"], right[0].weight.detach().numpy())
    assert set(gc.load_state_dict(g, wrong.state_dict())) == {"c.weight", "c.bias"}


@needs_torch
def test_a_module_whose_layer_settings_differ_is_refused_naming_the_layer_and_the_setting():
    """Given a module, the settings that change a layer's result are compared, not only its kind: a
    Conv2d with padding_mode="reflect" loaded silently into a conv that pads with zeros, and the
    outputs differed. A state dict alone carries no settings: that still loads by shape."""
    nn = torch.nn

    def graph(mode="zeros", eps=1e-5):
        g = gc.Graph("pad", dtype="float64")
        h = g.conv2d(g.input("x", ("N", 2, 6, 6)), 3, 3, padding=1, padding_mode=mode, name="conv")
        g.output(g.linear(g.flatten(g.batch_norm2d(h, eps=eps, name="bn")), 4, name="fc"))
        return set_training(g, False)

    class Net(nn.Module):
        def __init__(self, mode="zeros", **bn):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode), nn.BatchNorm2d(3, **bn)
            self.fc = nn.Linear(108, 4)

        def forward(self, x):
            return self.fc(self.bn(self.conv(x)).flatten(1))

    reflect = Net("reflect").double().eval()
    with pytest.raises(GraphConvError, match=r"conv: padding_mode differs: pad's conv has padding_mode='zeros', "
                                             r"PyTorch's conv \(Conv2d\) has padding_mode='reflect'"):
        gc.load_state_dict(graph(), reflect)
    with pytest.raises(GraphConvError, match=r"conv: padding_mode differs"):             # fused: the same check
        gc.load_state_dict(build(graph(), "fused"), reflect)
    x = np.random.default_rng(0).standard_normal((2, 2, 6, 6))
    with torch.no_grad():
        want = reflect(torch.from_numpy(x)).numpy()
    matching = graph("reflect")
    got = gc.compile(matching).run({"x": x}, gc.load_state_dict(matching, reflect))[matching.outputs[0]]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(GraphConvError, match=r"bn: eps differs: pad's bn has eps=1e-05, PyTorch's bn \(BatchNorm2d\) "
                                             r"has eps=0.001"):
        gc.load_state_dict(graph(), Net(eps=1e-3).double())
    with pytest.raises(GraphConvError, match=r"bn: affine differs: pad's bn has affine=True, .* has affine=False"):
        gc.load_state_dict(graph(), Net(affine=False).double())
    with pytest.raises(GraphConvError, match=r"bn: momentum differs: pad's bn has momentum=0.1, .* momentum=None"):
        gc.load_state_dict(graph(), Net(momentum=None).double())
    strided = Net().double()
    strided.conv.stride = (2, 2)
    with pytest.raises(GraphConvError, match=r"conv: stride differs: pad's conv has stride=\(1, 1\), .* stride=\(2, 2\)"):
        gc.load_state_dict(graph(), strided)
    assert set(gc.load_state_dict(graph(), reflect.state_dict())) >= {"conv.weight", "bn.running_var"}   # by shape


def test_a_fused_linear_layer_loads_and_exports_pytorch_weights_as_a_linear_one():
    """fc1 -> relu fuses into one fused_linear node: its weight is still PyTorch's transposed
    ([out, in] there, [in, out] here), loading and exporting alike."""
    torch = pytest.importorskip("torch")
    from graphconv.pipeline import build
    m = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).double().eval()
    g = gc.Graph("mlp", "float64")
    g.output(g.linear(g.relu(g.linear(g.input("x", ("N", 8)), 6, name="0")), 3, name="2"))
    fused = build(g, "fused")
    assert fused.node(fused.operands(fused.outputs[0])[0]).op == "fused_linear"
    params = gc.load_state_dict(fused, m)
    x = np.random.default_rng(0).standard_normal((4, 8))
    with torch.no_grad():
        want = m(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(gc.compile(fused).run({"x": x}, params)[fused.outputs[0]], want, rtol=1e-12)
    exported = gc.state_dict(fused, params, like=m)
    assert tuple(exported["0.weight"].shape) == (6, 8)
    m.load_state_dict({k: torch.as_tensor(v) for k, v in exported.items()})
