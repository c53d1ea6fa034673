"""Training as graphs: optimizer updates and running statistics against PyTorch, checkpoints
(atomic, no pickle, checked names and shapes), resuming, and real training on the digits."""
import os

import numpy as np
import pytest

import graphconv as gc
from graphconv import data
from graphconv.models import MODELS
from graphconv.training import Optimizer, Trainer, attach_loss, batches, build_train_step
from torch_oracle import torch

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch not installed")


def small_net():
    g = gc.Graph("small", "float64")
    x = g.input("x", ("N", 2, 6, 6))
    h = g.relu(g.batch_norm2d(g.conv2d(x, 3, 3, padding=1, name="conv"), name="bn"))
    g.output(g.linear(g.flatten(g.max_pool2d(h, 2)), 4, name="fc"))
    return g


def torch_small(params):
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(27, 4)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(params["conv.weight"]))
        net[0].bias.copy_(torch.from_numpy(params["conv.bias"]))
        net[1].weight.copy_(torch.from_numpy(params["bn.weight"]))
        net[1].bias.copy_(torch.from_numpy(params["bn.bias"]))
        net[5].weight.copy_(torch.from_numpy(params["fc.weight"].T))
        net[5].bias.copy_(torch.from_numpy(params["fc.bias"]))
    return net


@needs_torch
@pytest.mark.parametrize("opt", [Optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=1e-2),
                                 Optimizer("sgd", lr=0.05, momentum=0.0),
                                 Optimizer("adam", lr=1e-2, weight_decay=1e-3)], ids=["sgd-momentum-wd", "sgd", "adam"])
def test_training_steps_match_pytorch(opt):
    rng = np.random.default_rng(0)
    trainer = Trainer(small_net(), opt, seed=3)
    net = torch_small(trainer.params)
    if opt.kind == "sgd":
        topt = torch.optim.SGD(net.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    else:
        topt = torch.optim.Adam(net.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
    for _ in range(4):
        x, y = rng.standard_normal((5, 2, 6, 6)), rng.integers(0, 4, 5)
        loss, _ = trainer.step(x, y)
        topt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
        tloss.backward()
        topt.step()
        assert loss == pytest.approx(tloss.item(), rel=1e-10)
    s = trainer.state
    np.testing.assert_allclose(s["conv.weight"], net[0].weight.detach().numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s["fc.weight"], net[5].weight.detach().numpy().T, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s["bn.running_mean"], net[1].running_mean.numpy(), rtol=1e-10)
    np.testing.assert_allclose(s["bn.running_var"], net[1].running_var.numpy(), rtol=1e-10)


@needs_torch
@pytest.mark.parametrize("opt", [Optimizer("sgd", lr=0.1, momentum=0.9, schedule="step", step_size=2, gamma=0.5),
                                 Optimizer("adam", lr=1e-2, schedule="cosine", epochs=4)], ids=["sgd-step", "adam-cosine"])
def test_learning_rate_schedules_match_pytorch(opt):
    """Three steps an epoch for five epochs against torch.optim with StepLR / CosineAnnealingLR; the
    learning rate is the graph's scalar buffer opt.lr, set by the Trainer before each step."""
    rng = np.random.default_rng(1)
    trainer = Trainer(small_net(), opt, seed=3)
    net = torch_small(trainer.params)
    if opt.kind == "sgd":
        topt = torch.optim.SGD(net.parameters(), lr=opt.lr, momentum=opt.momentum)
        sched = torch.optim.lr_scheduler.StepLR(topt, step_size=opt.step_size, gamma=opt.gamma)
    else:
        topt = torch.optim.Adam(net.parameters(), lr=opt.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=opt.epochs)
    for epoch in range(5):
        for _ in range(3):
            x, y = rng.standard_normal((5, 2, 6, 6)), rng.integers(0, 4, 5)
            trainer.step(x, y)
            topt.zero_grad()
            torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
            topt.step()
        assert float(trainer.state["opt.lr"]) == pytest.approx(topt.param_groups[0]["lr"], rel=1e-12)
        trainer.epoch += 1
        sched.step()
    np.testing.assert_allclose(trainer.state["conv.weight"], net[0].weight.detach().numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(trainer.state["fc.weight"], net[5].weight.detach().numpy().T, rtol=1e-9, atol=1e-12)


def test_a_captured_step_on_the_host_follows_the_schedule():
    """The kernels read the learning rate from opt.lr, so the bound (captured) step of the host
    backend follows a schedule as the numpy backend does."""
    opt = Optimizer("sgd", lr=0.1, momentum=0.0, schedule="step", step_size=1, gamma=0.1)
    graph = gc.cast(small_net(), "float32")
    runs = {}
    for backend in ("numpy", "host"):
        trainer = Trainer(graph, opt, backend=backend, seed=3)
        rng = np.random.default_rng(2)
        for epoch in range(3):
            for _ in range(2):
                trainer.step(rng.standard_normal((5, 2, 6, 6)).astype(np.float32), rng.integers(0, 4, 5))
            trainer.epoch += 1
        runs[backend] = trainer.state
    np.testing.assert_allclose(runs["host"]["fc.weight"], runs["numpy"]["fc.weight"], rtol=1e-4, atol=1e-6)
    frozen = Trainer(graph, Optimizer("sgd", lr=0.1, momentum=0.0), backend="host", seed=3)
    rng = np.random.default_rng(2)
    for epoch in range(3):
        for _ in range(2):
            frozen.step(rng.standard_normal((5, 2, 6, 6)).astype(np.float32), rng.integers(0, 4, 5))
        frozen.epoch += 1
    assert np.abs(frozen.state["fc.weight"] - runs["host"]["fc.weight"]).max() > 1e-3    # the schedule mattered


def test_train_step_graph_records_updates():
    g = build_train_step(attach_loss(MODELS["resnet8"]()), Optimizer("adam"))
    updates = g.meta["updates"]
    assert updates["fc.weight"] == "fc.weight.next" and updates["stem.weight"] == "stem.weight.next"
    assert updates["stem_bn.running_var"] == "stem_bn.running_var.next"
    assert updates["opt.step"] == "opt.step.next"
    assert g.node("fc.weight.next").op == "adam_param"
    assert g.operands("fc.weight.next") == ["fc.weight", "fc.weight.adam_m.next", "fc.weight.adam_v.next", "opt.step.next", "opt.lr"]
    assert set(g.outputs[2:]) == set(updates.values())


def test_checkpoints_roundtrip_atomically_and_are_checked(tmp_path, monkeypatch):
    trainer = Trainer(small_net(), Optimizer("sgd", lr=0.1))
    rng = np.random.default_rng(1)
    trainer.step(rng.standard_normal((4, 2, 6, 6)), rng.integers(0, 4, 4))
    trainer.epoch = 1
    path = tmp_path / "ck.npz"
    trainer.save(path)
    other = Trainer(small_net(), Optimizer("sgd", lr=0.1), seed=9)
    other.load(path)
    assert other.epoch == 1 and all(np.array_equal(other.state[k], v) for k, v in trainer.state.items())

    # an interrupted save leaves the previous checkpoint intact and no temporary file
    before = path.read_bytes()
    def broken(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(np.lib.format, "write_array", broken)       # in the middle of writing the arrays
    with pytest.raises(KeyboardInterrupt):
        trainer.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ck.npz"]

    # names, shapes and optimizers that do not match are refused, naming the parameter
    adam = Trainer(small_net(), Optimizer("adam"))
    with pytest.raises(gc.GraphConvError, match=r"ck.npz: written by sgd training; resume it with --optimizer sgd"):
        adam.load(path)
    state = dict(np.load(path))
    del state["meta/optimizer"]    # a checkpoint without the optimizer record: named by its buffers
    np.savez(tmp_path / "old.npz", **state)
    with pytest.raises(gc.GraphConvError, match=r"conv.weight.velocity: .* has no parameter or buffer of that name; "
                                                r"it was written by sgd training"):
        adam.load(tmp_path / "old.npz")
    state["state/fc.weight"] = state["state/fc.weight"][:, :2]
    np.savez(tmp_path / "bad.npz", **state)
    with pytest.raises(gc.GraphConvError, match=r"fc.weight: shape \[27, 2\] in the checkpoint, \[27, 4\]"):
        other.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "pickled.npz", **{"state/conv.weight": np.array([object()], dtype=object)})
    with pytest.raises(gc.GraphConvError, match="holds Python objects"):
        other.load(tmp_path / "pickled.npz")
    with pytest.raises(gc.GraphConvError, match="no such checkpoint"):
        other.load(tmp_path / "missing.npz")
    # another model's checkpoint is named as such before its optimizer is compared
    lenet = Trainer(MODELS["lenet5"](), Optimizer("adam"))
    with pytest.raises(gc.GraphConvError, match=r"ck.npz: conv.weight: lenet5 has no parameter or buffer of that "
                                                r"name \(a checkpoint of another model\?\)"):
        lenet.load(path)


def run_epochs(trainer, x, y, epochs):
    for _ in range(epochs):
        for idx in batches(len(x), 64, 0, trainer.epoch):
            trainer.step(x[idx], y[idx])
        trainer.epoch += 1


def test_resuming_continues_exactly(tmp_path):
    x, y, _, _ = data.load("mnist1d", MODELS["conv1d_net"]().inputs[0].shape)
    x, y = x[:256], y[:256]

    def run(trainer, epochs):
        run_epochs(trainer, x, y, epochs)

    straight = Trainer(MODELS["conv1d_net"](), Optimizer("adam"))
    run(straight, 2)
    first = Trainer(MODELS["conv1d_net"](), Optimizer("adam"))
    run(first, 1)
    first.save(tmp_path / "c.npz")
    resumed = Trainer(MODELS["conv1d_net"](), Optimizer("adam"), seed=5)
    resumed.load(tmp_path / "c.npz")
    run(resumed, 1)
    for k, v in straight.state.items():
        np.testing.assert_array_equal(resumed.state[k], v, err_msg=k)


def test_data_sets_are_offline_fixed_and_shaped_for_the_model():
    x_tr, y_tr, x_te, y_te = data.load("digits", ("N", 1, 28, 28))
    assert x_tr.shape == (1437, 1, 28, 28) and x_te.shape == (360, 1, 28, 28) and x_tr.dtype == np.float32
    assert abs(float(x_tr.mean())) < 1e-5 and abs(float(x_tr.std()) - 1) < 1e-4
    again = data.load("digits", ("N", 1, 28, 28))
    assert np.array_equal(again[3], y_te)
    x3 = data.load("digits", ("N", 3, 32, 32))[0]
    assert x3.shape == (1437, 3, 32, 32) and np.array_equal(x3[:, 0], x3[:, 2])
    m = data.load("mnist1d", ("N", 1, 40))
    assert m[0].shape == (4000, 1, 40) and m[2].shape == (1000, 1, 40) and set(np.unique(m[1])) == set(range(10))
    with pytest.raises(gc.GraphConvError, match="conv3d_net takes input"):
        data.load("digits", ("N", 1, 16, 16, 16), "conv3d_net")
    # the resize is linear interpolation: corners kept, a linear ramp stays a linear ramp
    ramp = np.arange(8.0)[None, None, :].repeat(8, axis=1)
    big = data.resize_linear(ramp, (28, 28))
    np.testing.assert_allclose(big[0, 0], np.linspace(0, 7, 28))


def test_lenet5_reaches_97_percent_on_digits():
    """The acceptance run, kept short for CI: 6 epochs of Adam on the numpy backend."""
    graph = MODELS["lenet5"]()
    x_tr, y_tr, x_te, y_te = data.load("digits", graph.inputs[0].shape)
    trainer = Trainer(graph, Optimizer("adam", lr=1e-3), seed=0)
    accuracy = []
    for epoch in range(6):
        for idx in batches(len(x_tr), 64, 0, epoch):
            trainer.step(x_tr[idx], y_tr[idx])
        accuracy.append(trainer.evaluate(x_te, y_te)[1])
    assert max(accuracy[-2:]) >= 0.97, accuracy


def test_conv1d_net_learns_mnist1d():
    graph = MODELS["conv1d_net"]()
    x_tr, y_tr, x_te, y_te = data.load("mnist1d", graph.inputs[0].shape)
    trainer = Trainer(graph, Optimizer("adam", lr=3e-3), seed=0)
    before = trainer.evaluate(x_te, y_te)
    for epoch in range(3):
        for idx in batches(len(x_tr), 64, 0, epoch):
            trainer.step(x_tr[idx], y_tr[idx])
    after = trainer.evaluate(x_te, y_te)
    assert after[0] < before[0] - 0.3 and after[1] > 0.4, (before, after)


def test_batches_cover_every_example_once_and_never_leave_one_alone():
    for n, batch in ((1437, 64), (129, 64), (10, 3), (5, 5)):
        parts = batches(n, batch, 0, 0)
        assert sorted(np.concatenate(parts).tolist()) == list(range(n))
        assert min(len(p) for p in parts) > 1 and max(len(p) for p in parts) <= batch + 1
    assert [p.tolist() for p in batches(10, 4, 1, 2)] == [p.tolist() for p in batches(10, 4, 1, 2)]
    assert [p.tolist() for p in batches(10, 4, 1, 2)] != [p.tolist() for p in batches(10, 4, 1, 3)]


def test_a_loss_needs_class_scores():
    with pytest.raises(gc.GraphError, match=r"seed_conv: a loss needs class scores \[N, classes\], but the output "
                                            r"conv is \[N,10,32,32\]"):
        attach_loss(MODELS["seed_conv"]())
    g = gc.Graph("gap")
    h = g.avg_pool2d(g.conv2d(g.input("x", ("N", 1, 4, 4)), 10, 1), 4)     # [N, 10, 1, 1] is fine
    g.output(h)
    assert attach_loss(g).node("scores").shape[1] == 10


@pytest.mark.parametrize("backend", ["numpy", "host"])
def test_a_graph_with_its_own_loss_trains_through_its_step_program(backend):
    """The README's regression recipe: an MSE graph (two float inputs) is not a Trainer's classifier;
    its step program, fed its own updates, recovers a known linear map on either backend."""
    g = gc.Graph("reg", "float32")
    x, t = g.input("x", ("N", 4)), g.input("t", ("N", 2))
    g.output(g.mse_loss(g.linear(x, 2, name="fc"), t, name="mse"))
    with pytest.raises(gc.GraphError, match=r"reg carries its own loss \(mse is a scalar\): Trainer and `graphconv "
                                            r"train` fit classifiers .* run its training step instead"):
        Trainer(g)
    both = gc.Graph("reg2", "float32")
    xb, tb = both.input("x", ("N", 4)), both.input("t", ("N", 2))
    scores = both.linear(xb, 2, name="fc")
    both.output(scores, both.mse_loss(scores, tb, name="mse"))      # the loss not first: still told
    with pytest.raises(gc.GraphError, match=r"reg2 carries its own loss \(mse is a scalar\).*; the step takes the "
                                            r"first output as the loss: list mse first"):
        Trainer(both)
    step = build_train_step(g, Optimizer("sgd", lr=0.1))
    run = gc.compile(step, backend=backend)
    state = gc.init_params(step, seed=0)
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((4, 2)).astype(np.float32), np.float32([0.5, -1])
    losses = []
    for _ in range(200):
        xs = rng.standard_normal((32, 4)).astype(np.float32)
        out = run.run({"x": xs, "t": xs @ w + b}, state)
        state.update({name: out[node] for name, node in step.meta["updates"].items()})
        losses.append(float(out["mse"]))
    assert losses[0] > 0.5 and losses[-1] < 1e-6
    np.testing.assert_allclose(state["fc.weight"], w, atol=1e-3)
    np.testing.assert_allclose(state["fc.bias"], b, atol=1e-3)


def dropout_net():
    g = gc.Graph("drnet", "float32")
    x = g.input("x", ("N", 1, 8, 8))
    h = g.max_pool2d(g.relu(g.conv2d(x, 8, 3, padding=1, name="c")), 2)
    h = g.dropout(g.flatten(h), p=0.25, name="drop1")
    h = g.dropout(g.relu(g.linear(h, 64, name="fc1")), p=0.5, name="drop2")
    g.output(g.linear(h, 10, name="fc2"))
    return g


def test_dropout_training_is_reproducible_resumable_and_the_same_on_the_host(tmp_path):
    """Each step draws new masks (the counter is state, incremented by the step), two runs with one
    seed are bitwise equal, a checkpoint resumes the mask sequence, the host backend's kernels follow
    the numpy backend, and predict (eval mode) drops nothing."""
    x, y, _, _ = data.load("digits", ("N", 1, 8, 8))
    x, y = x[:192], y[:192]

    def run(trainer, epochs):
        run_epochs(trainer, x, y, epochs)

    a, b = Trainer(dropout_net(), Optimizer("adam", lr=3e-3)), Trainer(dropout_net(), Optimizer("adam", lr=3e-3))
    run(a, 2), run(b, 2)
    assert float(a.state["dropout.step"]) == 6
    for k, v in a.state.items():
        np.testing.assert_array_equal(b.state[k], v, err_msg=k)
    first = Trainer(dropout_net(), Optimizer("adam", lr=3e-3))
    run(first, 1)
    first.save(tmp_path / "d.npz")
    resumed = Trainer(dropout_net(), Optimizer("adam", lr=3e-3), seed=5)
    resumed.load(tmp_path / "d.npz")
    run(resumed, 1)
    for k, v in a.state.items():
        np.testing.assert_array_equal(resumed.state[k], v, err_msg=k)
    host = Trainer(dropout_net(), Optimizer("adam", lr=3e-3), backend="host")
    run(host, 2)
    for k, v in a.state.items():
        np.testing.assert_allclose(host.state[k], v, rtol=1e-4, atol=1e-5, err_msg=k)
    # eval: the same scores as the graph without dropout layers (identity), on the trained weights
    plain = gc.Graph("plain", "float32")
    h = plain.max_pool2d(plain.relu(plain.conv2d(plain.input("x", ("N", 1, 8, 8)), 8, 3, padding=1, name="c")), 2)
    plain.output(plain.linear(plain.relu(plain.linear(plain.flatten(h), 64, name="fc1")), 10, name="fc2"))
    weights = {k: v for k, v in a.params.items() if k != "dropout.step"}
    np.testing.assert_array_equal(a.predict(x), gc.predict(plain, weights, x)[0])


def test_kernel_backend_training_state_stays_in_the_bound_steps_buffers(monkeypatch):
    """On the kernel backends the parameters and optimizer state live in the bound step's static
    buffers between steps (on cuda: on the GPU): a step copies in only the batch and the learning
    rate, commits its updates device-side, and gives the same numbers as the numpy backend, step by
    step; a refused step leaves the resident state as it was and a later step goes on from there.
    (SGD with momentum: Adam would blow conv.bias's zero gradient, BN cancels it, up to random signs.)"""
    opt = Optimizer("sgd", lr=0.1, momentum=0.9)
    graph = gc.cast(small_net(), "float32")
    numpy_run, host = Trainer(graph, opt, seed=4), Trainer(graph, opt, backend="host", seed=4)
    rng = np.random.default_rng(5)
    batch = lambda n: (rng.standard_normal((n, 2, 6, 6)).astype(np.float32), rng.integers(0, 4, n))  # noqa: E731
    x, y = batch(5)
    numpy_run.step(x, y)
    host.step(x, y)
    bound = host._bound[5]
    updates = host.step_graph.meta["updates"]
    # the commit flipped the step to its second phase: each state now in the buffer its update was
    # written to (no copy), the first phase's state buffers free for the next update
    assert updates and bound.phase == 1 and all(host.state[s] is bound.static[s] for s in updates)
    assert all(np.shares_memory(host.state[s], bound.arrays[0](node)) for s, node in updates.items())

    copied, phase = {"in": [], "commit": []}, ["in"]
    runtime = host.step_program.runtime
    real_copy, real_commit = runtime.copy_into, bound.commit
    monkeypatch.setattr(runtime, "copy_into", lambda dst, src: (copied[phase[0]].append(dst), real_copy(dst, src))[1])
    monkeypatch.setattr(bound, "commit", lambda u: (phase.__setitem__(0, "commit"), real_commit(u))[1])
    x, y = batch(5)
    numpy_loss, numpy_scores = numpy_run.step(x, y)
    loss, scores = host.step(x, y)
    named = lambda arrays: {n for n, a in bound.static.items() if any(a is d for d in arrays)}  # noqa: E731
    assert named(copied["in"]) == {host.input_name, "y", "opt.lr"}      # opt.lr: set from the schedule
    assert copied["commit"] == [] and set(bound.swap) == set(updates) | set(updates.values())
    assert bound.phase == 0 and all(host.state[s] is bound.static[s] for s in updates)   # two steps: back to 0
    assert isinstance(scores, np.ndarray) and not np.shares_memory(scores, bound.static[host.input_name])
    np.testing.assert_allclose(loss, numpy_loss, rtol=1e-5)
    np.testing.assert_allclose(scores, numpy_scores, rtol=1e-4, atol=1e-5)
    for k, v in numpy_run.state.items():
        np.testing.assert_allclose(host.state[k], v, rtol=1e-4, atol=1e-6, err_msg=k)

    before = {k: np.array(v, copy=True) for k, v in host.state.items()}
    x, y = batch(5)
    with pytest.raises(gc.TrainingError, match="non-finite|the loss is"):
        host.step(x * np.float32(1e25), y)     # finite, but its squares overflow in float32
    assert bound.phase == 0                    # not committed: the same phase, its state untouched
    for k, v in before.items():
        np.testing.assert_array_equal(host.state[k], v, err_msg=k)
    numpy_run.step(x, y)
    host.step(x, y)
    for k, v in numpy_run.state.items():
        np.testing.assert_allclose(host.state[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
    assert all(isinstance(v, np.ndarray) for v in host.numpy_state().values())
    snapshot, params = host.numpy_state(), host.params                  # copies: later steps leave them
    kept = {k: v.copy() for k, v in snapshot.items()}
    host.step(*batch(5))
    assert all(np.array_equal(snapshot[k], v) for k, v in kept.items())
    assert all(np.array_equal(params[k], kept[k]) for k in params)
    assert not np.array_equal(host.state["fc.weight"], kept["fc.weight"])
