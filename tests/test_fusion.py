"""Fusion: every fused graph computes what its unfused original computes (float64, the same random
data), the guards refuse what they must, and the ledger's byte counts match counts made by hand."""
import numpy as np
import pytest

import graphconv as gc
from graphconv.cli import main
from graphconv.data import random_inputs
from graphconv.fusion import fuse_conv_chains, report
from graphconv.models import MODELS, lenet5
from graphconv.pipeline import build, build_unfused
from graphconv.training import Optimizer


def run_both(model, stage, batch=3, seed=0, opt=None):
    unfused = build_unfused(model, stage, optimizer=opt)
    fused = build(model, stage, optimizer=opt)
    params = gc.init_params(unfused, seed=seed)
    rng = np.random.default_rng(seed)
    for name, value in params.items():           # running statistics away from 0 / 1, so eval mode matters
        if name.endswith(("running_var", ".weight")) and value.ndim == 1:
            params[name] = rng.uniform(0.5, 2.0, value.shape).astype(value.dtype)
        elif name.endswith(("running_mean", ".bias")) and value.ndim == 1:
            params[name] = rng.uniform(-0.5, 0.5, value.shape).astype(value.dtype)
    inputs = random_inputs(unfused, batch, seed)
    want = gc.compile(unfused).run(inputs, params)
    got = gc.compile(fused).run(inputs, {n.name: params[n.name] for n in fused.params})
    return unfused, fused, want, got


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("stage", ["fused", "fused-train"])
def test_fused_graphs_equal_their_unfused_originals(name, stage):
    if stage == "fused-train" and name == "seed_conv":
        pytest.skip("seed_conv has no class scores to train on")
    _, fused, want, got = run_both(MODELS[name]("float64"), stage)
    assert set(want) == set(got)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-12, err_msg=f"{name} {stage} {key}")
    fused.verify()


def test_lenet5_fused_has_both_conv_relu_pool_chains_as_single_nodes():
    fused = build(lenet5(), "fused")
    nodes = {n.name: n for n in fused.topo()}
    for conv, relu, pool in (("conv1", "relu1", "pool1"), ("conv2", "relu2", "pool2")):
        assert conv not in nodes and relu not in nodes
        node = nodes[pool]
        assert node.op == "fused_conv" and [r[0] for r in node.replaces] == [conv, relu, pool]
        assert [r[1] for r in node.replaces] == ["conv2d", "relu", "max_pool2d"]
        assert node.attrs["epilogue"] == (("relu", (), (-1,)),) and node.attrs["pool"][0] == "max_pool2d"
    assert fused.operands("pool2") == ["pool1", "conv2.weight", "conv2.bias"]
    assert "%pool1:f32[N,20,14,14] = fused_conv[" in str(fused)


def test_ledger_bytes_for_lenet5_match_a_count_by_hand():
    """Each kernel reads its inputs once and writes its output once; float32, batch 64."""
    n, f = 64, 4
    x, c1, p1 = n * 1 * 28 * 28 * f, n * 20 * 28 * 28 * f, n * 20 * 14 * 14 * f
    c2, p2 = n * 50 * 14 * 14 * f, n * 50 * 7 * 7 * f
    w1, b1, w2, b2 = 20 * 25 * f, 20 * f, 50 * 20 * 25 * f, 50 * f
    conv1_chain = (x + w1 + b1 + c1) + (c1 + c1) + (c1 + p1)            # conv1, relu1, pool1 unfused
    conv2_chain = (p1 + w2 + b2 + c2) + (c2 + c2) + (c2 + p2)
    flat, w3, b3, h3 = n * 2450 * f, 2450 * 500 * f, 500 * f, n * 500 * f
    fc1_chain = (flat + w3 + b3 + h3) + (h3 + h3)                        # fc1, relu3 unfused
    r = report(lenet5(), build(lenet5(), "fused"), batch=64)
    one, two, three, last = r["groups"]
    assert not last["fired"] and last["reason"] == "fc2 is a graph output"
    assert one["bytes_before"] == conv1_chain and one["bytes_after"] == x + w1 + b1 + p1
    assert two["bytes_before"] == conv2_chain and two["bytes_after"] == p1 + w2 + b2 + p2
    assert three["bytes_before"] == fc1_chain and three["bytes_after"] == flat + w3 + b3 + h3
    assert r["total_bytes_before"] - r["total_bytes_after"] == (conv1_chain - (x + w1 + b1 + p1)) + \
        (conv2_chain - (p1 + w2 + b2 + p2)) + (fc1_chain - (flat + w3 + b3 + h3))
    assert (r["kernels_before"], r["kernels_after"]) == (10, 5)


def net(build_tail):
    g = gc.Graph("g", "float64")
    x = g.input("x", ("N", 3, 8, 8))
    outs = build_tail(g, x)
    g.output(*outs)
    return g


def test_an_activation_with_two_users_is_not_fused_and_the_ledger_says_why():
    def tail(g, x):
        r = g.relu(g.conv2d(x, 4, 3, padding=1, name="conv1"), name="relu1")
        return [g.add(g.max_pool2d(r, 2, name="pool1"), g.avg_pool2d(r, 2, name="pool2"), name="add3")]
    g = net(tail)
    fused = fuse_conv_chains(g)
    decision = fused.meta["fusion"][0]
    assert decision.reason == "relu1 has 2 users (pool1, pool2): the chain from conv1 stops there"
    assert decision.fired and decision.nodes == ["conv1", "relu1"]   # conv + relu still fuse
    assert fused.node("relu1").op == "fused_conv" and fused.node("pool1").op == "max_pool2d"


def test_a_pool_input_that_is_a_graph_output_stays():
    def tail(g, x):
        r = g.relu(g.conv2d(x, 4, 3, padding=1, name="conv1"), name="relu1")
        return [g.max_pool2d(r, 2, name="pool1"), r]
    fused = fuse_conv_chains(net(tail))
    decision = fused.meta["fusion"][0]
    assert decision.reason == "relu1 is a graph output" and fused.node("pool1").op == "max_pool2d"
    assert fused.node("relu1").op == "fused_conv" and fused.outputs == ["pool1", "relu1"]


def test_lenet5_fused_train_saves_no_full_size_pre_pool_activation():
    from graphconv.autodiff import saved_bytes, saved_tensors
    unfused, fused = build_unfused(lenet5(), "fused-train"), build(lenet5(), "fused-train")
    before = [n.name for n in saved_tensors(unfused)]
    after = {n.name: n for n in saved_tensors(fused)}
    assert {"conv1", "relu1", "conv2", "relu2"} <= set(before)
    assert set(after) == {"x", "pool1", "pool1.argmax", "pool2", "pool2.argmax", "flatten1", "relu3", "fc2", "y"}
    assert after["pool1.argmax"].dtype == "uint8" and after["pool1.argmax"].shape == after["pool1"].shape
    # batch 64, float32: x, conv1, relu1 (20x28x28), pool1, conv2, relu2 (50x14x14), flatten1, fc1, relu3, fc2, y
    n = 64
    unfused_bytes = n * 4 * (784 + 2 * 15680 + 3920 + 2 * 9800 + 2450 + 500 + 500 + 10) + n * 8
    fused_bytes = n * 4 * (784 + 3920 + 2450 + 2450 + 500 + 10) + n * (3920 + 2450) + n * 8    # fc1 not saved: relu3 is
    assert saved_bytes(unfused, 64) == unfused_bytes == 15_136_256
    assert saved_bytes(fused, 64) == fused_bytes == 2_997_376
    nodes = {x.name: x for x in fused.topo()}
    assert nodes["pool1.fused"].op == "fused_conv" and nodes["pool1.fused"].attrs["save"] == "argmax"
    assert nodes["dconv1"].op == "pool_act_backward" and fused.operands("dconv1") == ["dpool1", "pool1.argmax", "pool1"]
    assert [r[0] for r in nodes["dconv1"].replaces] == ["drelu1", "dconv1"]


def test_activations_whose_derivative_needs_the_input_save_the_pre_activation_at_the_argmax():
    fused = build(MODELS["lenet5_swish"](), "fused-train")
    assert fused.node("pool1.fused").attrs["save"] == "argmax_preact"
    assert fused.operands("dconv1") == ["dpool1", "pool1.argmax", "pool1.preact"]


@pytest.mark.parametrize("slope, save", [(0.0, "argmax"), (0.2, "argmax"), (-0.5, "argmax_preact")])
def test_leaky_relu_reads_its_derivative_off_its_output_unless_its_slope_is_negative(slope, save):
    """leaky_relu at slope >= 0 (0 included: its negative side is relu's 0) is positive exactly where
    its input is, so the fused training chain saves only the pooled output and codes, and the linear
    chain reroutes its gradient; a negative slope saves the pre-activation. Same numbers as unfused."""
    def tail(g, x):
        h = g.max_pool2d(g.leaky_relu(g.conv2d(x, 4, 3, padding=1, name="conv1"), slope, name="act1"), 2, name="pool1")
        return [g.linear(g.leaky_relu(g.linear(g.flatten(h), 5, name="fc1"), slope, name="act2"), 3, name="fc2")]
    _, fused, want, got = run_both(net(tail), "fused-train")
    assert fused.node("pool1.fused").attrs["save"] == save
    assert (fused.node("act2").op == "fused_linear") == (slope >= 0)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-12, err_msg=key)


def test_training_patterns_refuse_what_they_cannot_cover():
    def tail(g, x):
        h = g.avg_pool2d(g.relu(g.conv2d(x, 4, 3, padding=1, name="conv1"), name="relu1"), 2, name="pool1")
        return [g.linear(g.flatten(h), 3, name="fc")]
    fused = build(net(tail), "fused-train")             # relu's gradient reads relu1: conv1 -> relu1 still fuses
    assert [d.reason for d in fused.meta["fusion"] if d.rule.startswith("conv")] == [
        "dconv1 reads relu1 (relu's derivative is read off its output), so conv1 is not saved; relu1 has 2 users "
        "(pool1, dconv1): the chain from conv1 stops there"]

    def tail(g, x):
        h = g.avg_pool2d(g.tanh(g.conv2d(x, 4, 3, padding=1, name="conv1"), name="tanh1"), 2, name="pool1")
        return [g.linear(g.flatten(h), 3, name="fc")]
    fused = build(net(tail), "fused-train")
    assert [d.reason for d in fused.meta["fusion"] if d.rule.startswith("conv")] == [
        "pool1 is an average pool: the gradient of tanh1 needs conv1 at every position, not only at each window's "
        "maximum, so conv1 stays saved"]
    vgg = build(MODELS["vgg_small"](), "fused-train")
    chains = [d for d in vgg.meta["fusion"] if d.rule == "conv_chain"]
    assert chains[0].reason.startswith("conv1_1 has 5 users (bn1_1, dconv1_1, dbn1_1.weight")


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_epilogues_with_residuals_per_channel_operands_and_sympy_activations(nd):
    import sympy as sp
    from graphconv.ops import OPS, register
    from graphconv.ops.pointwise import Pointwise
    if "scale_shift_t" not in OPS:
        x, s = sp.symbols("x s", real=True)
        register(Pointwise("scale_shift_t", x * s + 1, ("x", "s")))
    gc.define_activation("swish", lambda v: v * gc.sigmoid(v))
    g = gc.Graph("epi", "float64")
    x = g.input("x", ("N", 4) + (6,) * nd)
    scale = g.input("scale", (4,))
    h = getattr(g, f"conv{nd}d")(x, 4, 3, padding=1, dilation=1, padding_mode="reflect", name="conv")
    h = g.add(h, x, name="res")                                  # a residual: extra operand
    h = g.apply("scale_shift_t", h, scale, name="affine")      # a per-channel extra operand
    h = g.leaky_relu(h, 0.2, name="lrelu")
    h = g.activation(h, "swish", name="sw")
    g.output(getattr(g, f"avg_pool{nd}d")(h, 2, ceil_mode=True, name="pool"))
    fused = fuse_conv_chains(g)
    node = fused.node("pool")
    assert node.op == "fused_conv" and [r[0] for r in node.replaces] == ["conv", "res", "affine", "lrelu", "sw", "pool"]
    assert fused.operands("pool") == ["x", "conv.weight", "conv.bias", "x", "scale"]   # x twice: input, residual
    rng = np.random.default_rng(nd)
    feed = {"x": rng.standard_normal((2, 4) + (6,) * nd), "scale": rng.standard_normal(4)}
    params = gc.init_params(g, seed=1)
    np.testing.assert_allclose(gc.compile(fused).run(feed, params)["pool"], gc.compile(g).run(feed, params)["pool"],
                               rtol=1e-12)


def test_fused_dumps_are_deterministic(tmp_path):
    import subprocess
    import sys
    code = "from graphconv.pipeline import build; from graphconv.models import resnet8, lenet5; " \
           "print(build(lenet5(), 'fused')); print(build(resnet8(), 'fused-train').dump('json'))"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2)]
    assert runs[0] == runs[1] and "fused_conv" in runs[0]


def test_cli_fuse_and_check(capsys, monkeypatch):
    assert main(["fuse", "lenet5", "--batch", "64"]) == 0
    out = capsys.readouterr().out
    assert "fused    conv1 -> relu1 -> pool1  =>  pool1   16.5 MiB -> 1.2 MiB   [conv_chain]" in out
    assert main(["check", "lenet5", "--stage", "fused"]) == 0
    assert "fc2" in capsys.readouterr().out
    from graphconv.ops.fused import FusedConv
    real = FusedConv.reference
    monkeypatch.setattr(FusedConv, "reference", lambda self, xs, attrs: real(self, xs, attrs) * (1 + 1e-6))
    assert main(["check", "lenet5", "--stage", "fused"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_check_explains_adam_updates_of_near_zero_gradients_and_still_catches_a_wrong_one():
    """`check` in float32: an Adam update past rtol is reported "ok*" only when it is Adam's step of
    the moments the checked graph computed and those moments match the reference's (Adam divides a
    gradient by its own size, so rounding in gradients near zero moves the step by up to lr); a
    wrong update, or moments that differ, stay mismatches."""
    import numpy as np
    from graphconv.cli import adam_step_of_its_moments
    from graphconv.ops import OPS
    from graphconv.pipeline import build_unfused
    from graphconv.training import Optimizer
    graph = build_unfused(gc.models.MODELS["lenet5"](), "fused-train", "cross_entropy", Optimizer("adam"))
    name = "fc2.bias.next"
    p_, m_, v_, t_, lr_ = graph.operands(name)
    rng = np.random.default_rng(0)
    params = {p_: (0.02 * rng.normal(size=10)).astype(np.float32), lr_: np.float32(1e-3)}   # small weights, as fc1's
    g = np.array([1e-9, -2e-9, 0.3, -0.2, 3e-9, 0.1, 0.5, -0.4, 2e-5, 0.05], dtype=np.float32)
    g2 = g.copy()
    g2[[0, 1, 4, 8]] *= np.float32(1.7)                       # rounding-sized changes of near-zero gradients

    def run(grad):
        m, v = (0.1 * grad).astype(np.float32), (0.001 * grad * grad).astype(np.float32)
        out = {m_: m, v_: v, t_: np.float32(1)}
        out[name] = OPS["adam_param"].reference([params[p_], m, v, np.float32(1), params[lr_]],
                                                graph.node(name).attrs).astype(np.float32)
        return out
    want, got = run(g), run(g2)
    assert not np.allclose(got[name], want[name], rtol=1e-4, atol=1e-4 * np.abs(want[name]).max())
    assert adam_step_of_its_moments(graph, name, params, want, got, 1e-4)
    wrong = dict(got, **{name: got[name] + np.float32(1e-3)})        # an update that is not Adam's step
    assert not adam_step_of_its_moments(graph, name, params, want, wrong, 1e-4)
    far = run(g * np.float32(1.5))                                   # moments that do not match
    assert not adam_step_of_its_moments(graph, name, params, want, far, 1e-4)
    g3 = g.copy()
    g3[8] = np.float32(-2e-5)        # a small gradient of the wrong sign: within the moments' atol, past rounding
    assert not adam_step_of_its_moments(graph, name, params, want, run(g3), 1e-4)
    assert not adam_step_of_its_moments(graph, "fc2.bias.adam_m.next", params, want, got, 1e-4)


def test_check_judges_the_moments_of_a_zero_gradient_against_their_kind(tmp_path, capsys):
    """A conv's bias before a training-mode batch norm has a gradient that is zero in exact
    arithmetic: its Adam moments are rounding noise (100% apart between two correct backends) and
    were reported MISMATCH. They are judged against the largest moment over every parameter ("ok+"),
    their update by the ok* rule; a moment wrong on that scale is still a mismatch."""
    from graphconv.cli import kind_scale
    (tmp_path / "bnb.py").write_text(
        "import graphconv as gc\n\ndef build():\n    g = gc.Graph('bnb')\n"
        "    h = g.relu(g.batch_norm2d(g.conv2d(g.input('x', ('N', 1, 8, 8)), 4, 3, padding=1, name='conv1'), name='bn1'))\n"
        "    g.output(g.linear(g.flatten(g.max_pool2d(h, 2)), 10, name='fc'))\n    return g\n")
    code = main(["check", f"{tmp_path / 'bnb.py'}:build", "--stage", "fused-train", "--backend", "host",
                 "--dtype", "float32"])
    out = capsys.readouterr().out
    assert code == 0 and "MISMATCH" not in out, out
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.startswith("  conv1.bias")}
    assert rows["conv1.bias.adam_m.next"] in ("ok", "ok+") and rows["conv1.bias.next"] in ("ok", "ok*"), rows
    want = {"a.weight.adam_m.next": np.array([0.07, -0.01]), "a.bias.adam_m.next": np.array([3e-9, -1e-9]),
            "a.weight.next": np.array([5.0])}
    assert kind_scale("a.bias.adam_m.next", want) == 0.07 and kind_scale("a.weight.next", want) == 0.0
    from graphconv.cli import close
    noise = np.array([-2e-9, 2e-9])
    assert not close(noise, want["a.bias.adam_m.next"], 1e-4)                 # against itself: 100% apart
    assert close(noise, want["a.bias.adam_m.next"], 1e-4, kind_scale("a.bias.adam_m.next", want))
    assert not close(np.array([1e-5, 0]), want["a.bias.adam_m.next"], 1e-4, 0.07)   # wrong at the network's scale


MID_BN = ("import graphconv as gc\n\ndef mid_bn():\n    g = gc.Graph('mid_bn')\n"
          "    h = g.input('x', ('N', 1, 1, 1))\n    for i in range(12):\n"
          "        h = g.relu(g.batch_norm2d(g.conv2d(h, 2, 1, bias=False)))\n"
          "    g.output(g.linear(g.flatten(h), 10))\n    return g\n")


def test_check_explains_sgd_updates_that_carry_their_velocitys_rounding_noise(tmp_path, capsys):
    """12 x (1x1 conv without bias -> batch norm -> relu): a batch norm's bias gradient cancels in
    exact arithmetic, its SGD velocity is rounding noise (ok+), and the bias (0 before the step) moved
    by lr times that noise differed by 100% and was reported MISMATCH. It is "ok~" now, explained
    under the table."""
    (tmp_path / "mid_bn.py").write_text(MID_BN)
    code = main(["check", f"{tmp_path / 'mid_bn.py'}:mid_bn", "--stage", "fused-train", "--backend", "host",
                 "--optimizer", "sgd", "--seed", "0"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.startswith("  bn")}
    assert rows["bn8.bias.velocity.next"] == "ok+" and rows["bn8.bias.next"] == "ok~", rows   # reproduced
    assert code == 0 and "MISMATCH" not in out, out
    assert "SGD updates past rtol: p' = p - lr * v'" in out


def test_an_sgd_update_is_excused_only_by_its_accepted_velocitys_difference(tmp_path):
    from graphconv.cli import sgd_step_of_its_velocity
    from graphconv.models import load
    (tmp_path / "mid_bn.py").write_text(MID_BN)
    graph = build_unfused(load(f"{tmp_path / 'mid_bn.py'}:mid_bn", "float64"), "fused-train", None,
                          Optimizer("sgd"))
    name = "bn8.bias.next"
    p_, v_, lr_ = graph.operands(name)
    params = {p_: np.zeros(2), lr_: np.float64(1e-3)}
    noise_want, noise_got = np.array([3e-15, -1e-15]), np.array([-2e-15, 2e-15])     # a cancelled gradient

    def step(v, **extra):
        return {v_: v, name: params[p_] - params[lr_] * v, "conv1.weight.velocity.next": np.array([[0.2, -0.1]]),
                **extra}
    want, got = step(noise_want), step(noise_got)
    assert sgd_step_of_its_velocity(graph, name, params, want, got, 1e-9)
    wrong = dict(got, **{name: got[name] + 1e-12})                   # not p - lr * v' of the accepted velocity
    assert not sgd_step_of_its_velocity(graph, name, params, want, wrong, 1e-9)
    far = step(np.array([1e-5, 0.0]))                                  # a velocity wrong at the network's scale
    assert not sgd_step_of_its_velocity(graph, name, params, want, far, 1e-9)
    assert not sgd_step_of_its_velocity(graph, v_, params, want, got, 1e-9)   # only parameter updates


def test_dump_after_a_pass_and_unknown_passes(capsys):
    assert main(["dump", "lenet5", "--stage", "fused", "--after", "set_training"]) == 0
    assert "fused_conv" not in capsys.readouterr().out
    assert main(["dump", "lenet5", "--stage", "fused", "--after", "nope"]) == 2
    assert "stage fused has no pass 'nope'; its passes are: set_training, drop_eval_dropout, fold_batch_norm, fuse_conv_chains" in \
        capsys.readouterr().err


def test_a_few_training_steps_on_the_fused_training_graph_reproduce_the_unfused_ones():
    from graphconv.training import Trainer
    model = MODELS["conv1d_net"]("float64")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 1, 40)), rng.integers(0, 10, 8)
    unfused_step = build_unfused(model, "fused-train", optimizer=Optimizer("adam", lr=1e-2))
    fused_step = build(model, "fused-train", optimizer=Optimizer("adam", lr=1e-2))
    state = gc.init_params(unfused_step, seed=0)
    states = []
    for step_graph in (unfused_step, fused_step):
        s = dict(state)
        program = gc.compile(step_graph)
        for _ in range(3):
            out = program.run({"x": x, "y": y}, {n.name: s[n.name] for n in step_graph.params})
            for k, v in step_graph.meta["updates"].items():
                s[k] = out[v]
        states.append(s)
    for k in state:
        np.testing.assert_allclose(states[1][k], states[0][k], rtol=1e-12, err_msg=k)
    assert Trainer  # the Trainer runs the same step graphs


@pytest.mark.parametrize("bias, affine, groups", [(True, True, 1), (False, False, 2), (True, False, 4)])
def test_batch_norm_folding_equals_the_unfolded_eval_graph(bias, affine, groups):
    from graphconv.fusion import fold_batch_norm
    g = gc.Graph("bn", "float64")
    x = g.input("x", ("N", 4, 7, 7))
    h = g.conv2d(x, 8, 3, padding=1, bias=bias, groups=groups, name="conv")
    g.output(g.batch_norm2d(h, affine=affine, training=False, eps=1e-3, name="bn"))
    folded = fold_batch_norm(g)
    node = folded.node("bn")
    assert node.op == "conv2d" and [r[0] for r in node.replaces] == ["conv", "bn"]
    assert folded.operands("bn") == ["x", "bn.fold.weight", "bn.fold.bias"]
    rng = np.random.default_rng(3)
    params = gc.init_params(g, seed=2)
    params["bn.running_mean"] = rng.standard_normal(8)
    params["bn.running_var"] = rng.uniform(0.2, 3.0, 8)
    if affine:
        params["bn.weight"], params["bn.bias"] = rng.standard_normal(8), rng.standard_normal(8)
    feed = {"x": rng.standard_normal((3, 4, 7, 7))}
    np.testing.assert_allclose(gc.compile(folded).run(feed, params)["bn"], gc.compile(g).run(feed, params)["bn"],
                               rtol=1e-11, atol=1e-12)


def test_a_folded_conv_is_named_by_both_layers_in_the_ledger_and_the_dump():
    """A conv with its batch norm folded in takes the batch norm's node name; what a later fusion
    records, and what the ledger says of it, names the conv too (`stem+stem_bn`, not `stem_bn`)."""
    from graphconv.printer import to_text
    fused = build(MODELS["resnet8"](), "fused")
    relu1 = fused.node("relu1")
    assert [r[0] for r in relu1.replaces] == ["stem", "stem_bn", "relu1"]
    assert [r[1] for r in relu1.replaces] == ["conv2d", "batch_norm", "relu"]
    assert "# replaces=stem+stem_bn+relu1" in to_text(fused)
    reasons = {d.into: d.reason for d in fused.meta["fusion"] if d.rule == "conv_chain"}
    assert reasons["relu1"] == ("relu1 has 2 users (block1.conv1+block1.bn1, block1.add): the chain "
                                "from stem stops there")
    assert reasons["block1.relu1"] == "block1.conv2+block1.bn2 [conv2d] is neither elementwise nor a pool"


def test_batch_norm_is_not_folded_in_training_mode_or_when_the_conv_has_other_users():
    from graphconv.fusion import fold_batch_norm
    g = gc.Graph("bn")
    x = g.input("x", ("N", 4, 7, 7))
    h = g.conv2d(x, 8, 3, name="conv")
    c2 = g.conv2d(x, 8, 3, name="c2")
    g.output(g.batch_norm2d(h, name="bn"), g.batch_norm2d(c2, training=False, name="bn2"), g.relu(c2, name="r2"))
    ledger = fold_batch_norm(g).meta["fusion"]
    assert [d.reason for d in ledger] == [
        "bn not folded into conv: it uses batch statistics (training mode): they change with every batch",
        "bn2 not folded into c2: c2 has 2 users (bn2, r2)"]


def test_pointwise_chains_become_one_node_with_the_composed_expression():
    from graphconv.fusion import fuse_pointwise_chains
    from graphconv.gradcheck import check_rule
    g = gc.Graph("pw", "float64")
    a, b = g.input("a", ("N", 3, 4)), g.input("b", ("N", 3, 4))
    h = g.leaky_relu(g.add(g.tanh(a, name="t"), b, name="s"), 0.1, name="l")
    g.output(g.activation(h, "sigmoid", name="out"), g.relu(b, name="rb"))
    fused = fuse_pointwise_chains(g)
    node = fused.node("out")
    assert node.op == "fused_pointwise" and [r[0] for r in node.replaces] == ["t", "s", "l", "out"]
    assert fused.operands("out") == ["a", "b"] and "tanh(a0)" in node.attrs["expr"]
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal((2, 3, 4)), "b": rng.standard_normal((2, 3, 4))}
    want, got = gc.compile(g).run(feed), gc.compile(fused).run(feed)
    np.testing.assert_allclose(got["out"], want["out"], rtol=1e-13)
    checks = check_rule("fused_pointwise", [feed["a"], feed["b"]], node.attrs, rng)
    assert len(checks) == 2 and all(c.ok for c in checks), checks


def test_the_fused_conv_node_has_a_gradient_rule():
    """Rematerialising the replaced ops and running their rules backwards: checked by finite
    differences, and the backward graph of a fused forward graph equals the unfused one's."""
    from graphconv.autodiff import derive_backward
    from graphconv.gradcheck import check_rule
    from graphconv.training import attach_loss
    g = gc.Graph("epi", "float64")
    x = g.input("x", ("N", 4, 6, 6))
    h = g.add(g.conv2d(x, 4, 3, padding=1, name="conv"), x, name="res")
    h = g.tanh(g.leaky_relu(h, 0.2, name="lrelu"), name="t")
    g.output(g.linear(g.flatten(g.max_pool2d(h, 2, name="pool")), 3, name="fc"))
    fused = fuse_conv_chains(g)
    rng = np.random.default_rng(0)
    values = [rng.standard_normal((2, 4, 6, 6)), rng.standard_normal((4, 4, 3, 3)), rng.standard_normal(4),
              rng.standard_normal((2, 4, 6, 6))]
    checks = check_rule("fused_conv", values, fused.node("pool").attrs, rng)
    assert len(checks) == 4 and all(c.ok for c in checks), checks
    unfused_bwd, fused_bwd = (derive_backward(attach_loss(h), wrt=["x"]) for h in (g, fused))
    params = gc.init_params(g, seed=1)
    feed = {"x": values[0], "y": np.array([0, 2])}
    a, b = gc.compile(unfused_bwd).run(feed, params), gc.compile(fused_bwd).run(feed, params)
    for target, grad in unfused_bwd.meta["grads"].items():
        np.testing.assert_allclose(b[fused_bwd.meta["grads"][target]], a[grad], rtol=1e-12, err_msg=target)


@pytest.mark.parametrize("first, second", [
    (dict(kernel_size=3), dict(kernel_size=3)),
    (dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect"), dict(kernel_size=2, dilation=2)),
    (dict(kernel_size=5, dilation=2, padding=2, padding_mode="circular"), dict(kernel_size=3, stride=2)),
    (dict(kernel_size=2, stride=3), dict(kernel_size=2, stride=2, dilation=3)),
])
def test_collapse_convs_equals_the_two_convolutions_where_it_applies(first, second):
    from graphconv.fusion import collapse_convs
    g = gc.Graph("cc", "float64")
    x = g.input("x", ("N", 3, 17, 19))
    g.output(g.conv2d(g.conv2d(x, 5, name="c1", **first), 4, name="c2", **second))
    collapsed = collapse_convs(g)
    assert [n.op for n in collapsed.topo() if n.op.startswith("conv")] == ["conv2d"]
    decision = collapsed.meta["fusion"][0]
    assert decision.fired and decision.macs_before != decision.macs_after
    params = gc.init_params(g, seed=0)
    feed = {"x": np.random.default_rng(0).standard_normal((2, 3, 17, 19))}
    np.testing.assert_allclose(gc.compile(collapsed).run(feed, params)["c2"], gc.compile(g).run(feed, params)["c2"],
                               rtol=1e-11, atol=1e-12)


def test_collapse_convs_refuses_what_is_not_exact():
    from graphconv.fusion import collapse_convs
    g = gc.Graph("cc")
    x = g.input("x", ("N", 4, 9, 9))
    a = g.conv2d(g.conv2d(x, 4, 3, name="c1"), 4, 3, padding=1, name="c2")
    b = g.conv2d(g.conv2d(x, 4, 3, groups=2, name="g1"), 4, 3, name="g2")
    g.output(a, b)
    reasons = [d.reason for d in collapse_convs(g).meta["fusion"]]
    assert reasons == ["not collapsed: c2 pads its input (((1, 1), (1, 1))): those zeros are not c1's output, so no "
                       "single convolution equals the two",
                       "not collapsed: grouped convolutions are not collapsed"]


def test_collapse_is_opt_in_on_the_command_line(capsys, tmp_path):
    path = tmp_path / "two.py"
    path.write_text("import graphconv as gc\ndef build():\n    g = gc.Graph('two')\n"
                    "    x = g.input('x', ('N', 1, 12, 12))\n"
                    "    h = g.relu(g.conv2d(g.conv2d(x, 4, 3, name='c1'), 6, 3, name='c2'), name='r')\n"
                    "    g.output(g.linear(g.flatten(h), 10, name='fc'))\n    return g\n")
    assert main(["fuse", f"{path}:build"]) == 0
    assert "collapse_convs" not in capsys.readouterr().out
    assert main(["fuse", f"{path}:build", "--collapse-convs"]) == 0
    out = capsys.readouterr().out
    assert "c1 -> c2  =>  c2" in out and "multiply-adds 17,424 -> 9,600" in out   # 4x1x3x3 then 6x4x3x3 -> 6x1x5x5
    assert main(["check", f"{path}:build", "--collapse-convs"]) == 0


@pytest.mark.parametrize("name", ["lenet5", "vgg_small", "resnet8", "conv3d_net"])
def test_the_layer_table_of_a_fused_graph_keeps_receptive_fields_and_counts(name):
    import json
    from graphconv.summary import summarize
    model = MODELS[name]()
    plain = {r["name"]: r for r in summarize(model)["layers"]}
    fused = summarize(build(model, "fused"))
    for row in fused["layers"]:
        if row["name"] in plain:
            assert row["receptive_field"] == plain[row["name"]]["receptive_field"], row["name"]
            assert row["output_shape"] == plain[row["name"]]["output_shape"]
    assert fused["total_macs"] <= summarize(model)["total_macs"]
    if name == "lenet5":        # no batch norm to fold: the same parameters and multiply-adds
        assert (fused["total_params"], fused["total_macs"]) == (1_256_080, 6_522_000)
    assert json.dumps(fused)


def test_a_pool_of_sizes_not_known_yet_is_named_as_such_in_the_fusion_ledger():
    """An adaptive pool on symbolic H, W stops a conv chain (it becomes a plain pool, and fuses, only
    once the sizes are bound): the ledger says so, and names the conv once."""
    from graphconv.fusion import format_report
    from graphconv.passes import bind_dims

    def ledger(graph, stage):
        return format_report(report(build_unfused(graph, stage), build(graph, stage)))

    g = gc.Graph("fcn")
    h = g.relu(g.conv2d(g.input("x", ("N", 3, "H", "W")), 4, 3, padding=1, name="c1"))
    g.output(g.flatten(g.adaptive_max_pool2d(h, 1, name="pool")))
    for stage, words in (("fused", "(the chain stops: pool [adaptive_max_pool2d] pools sizes not known yet (--dim, or "
                                    "bind_dims, makes it a plain pool where they divide))"),
                         ("fused-train", "fused    c1 -> relu1  =>  relu1")):
        text = ledger(g, stage)
        assert words in text and "c1: c1:" not in text, text
    assert "[conv_act_maxpool_train]" in ledger(bind_dims(g, {"H": 8, "W": 6}), "fused-train")
    u = gc.Graph("uneven")
    h = u.relu(u.conv2d(u.input("x", ("N", 3, 7, 7)), 4, 3, padding=1, name="c1"))
    u.output(u.flatten(u.adaptive_max_pool2d(h, 3, name="pool")))
    assert "pool [adaptive_max_pool2d] has windows of two sizes (its input is not a multiple of its output)" \
        in ledger(u, "fused")


def test_a_chain_that_would_cancel_an_operand_is_not_fused():
    """(x - c) - x composes to -c: fused, an inf or NaN in x would become a number where the unfused
    graph gives NaN. The chain stays unfused (the ledger says why) and both backends give NaN there;
    a chain that cancels nothing still fuses."""
    from graphconv.fusion import format_report
    g = gc.Graph("c")
    x, c = g.input("x", ("N", 4)), g.param("c", (4,), ("uniform", 1.0))
    g.output(g.sub(g.sub(x, c, name="a"), x, name="b"), g.relu(g.mul(g.sub(x, c, name="d"), c, name="e"), name="r"))
    fused = build(g, "fused")
    assert [n.op for n in fused.topo() if n.role == "op"].count("fused_pointwise") == 1     # d -> e -> r only
    text = format_report(report(build_unfused(g, "fused"), fused))
    assert "refused  a: composed, a -> b would cancel x algebraically (-a1), and an inf or NaN there would no " \
           "longer come through" in text
    xv, params = np.array([[np.inf, np.nan, 1, -2]], np.float32), gc.init_params(g)
    want = gc.compile(g).run({"x": xv}, params)["b"]
    assert np.isnan(want[0, :2]).all()
    for backend in ("numpy", "host"):
        got = gc.compile(fused, backend=backend).run({"x": xv}, params)["b"]
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


@pytest.mark.parametrize("layer", ["conv", "linear", "matmul"])
def test_a_conv_or_linear_chain_stops_before_an_epilogue_step_that_would_cancel_an_operand(layer):
    """conv -> + s -> - s -> relu: composed, the epilogue is relu(z) and s is gone, so an inf in s gave
    the kernel a number where the unfused graph gives NaN, and a huge s (1e30, whose rounding zeroes
    z in float32) gave z. The chain stops before `minus` (the ledger says why), the rest fuses as a
    pointwise chain, and numpy and host give the unfused graph's values bit for bit where they are
    not finite; a fused node built by hand with such an epilogue is refused by name."""
    from graphconv.fusion import format_report
    g = gc.Graph("cancel")
    shape = {"conv": ("N", 2, 5, 5), "linear": ("N", 6), "matmul": ("N", 6)}[layer]
    x = g.input("x", shape)
    if layer == "conv":
        h = g.conv2d(x, 4, 3, padding=1, name="c")
    elif layer == "linear":
        h = g.linear(x, 4, name="c")
    else:
        h = g.apply("matmul", x, g.param("w", (6, 4), ("uniform", 1.0)), name="c")
    s = g.input("s", h.shape)
    g.output(g.relu(g.sub(g.add(h, s, name="plus"), s, name="minus"), name="r"))
    fused = build(g, "fused")
    text = format_report(report(build_unfused(g, "fused"), fused))
    assert "composed, plus -> minus would cancel s algebraically" in text, text
    assert {n.op for n in fused.topo() if n.role == "op"} == {f"fused_{'conv' if layer == 'conv' else layer}",
                                                              "fused_pointwise"}
    rng = np.random.default_rng(0)
    xv = rng.standard_normal((2,) + shape[1:]).astype(np.float32)
    sv = np.ones((2,) + tuple(h.shape[1:]), np.float32)
    sv[0, 0], sv[1, 1] = np.inf, 1e30
    params = gc.init_params(g, seed=0)
    want = np.asarray(gc.compile(g)(x=xv, s=sv, params=params))
    assert np.isnan(want[0, 0]).all() and (want[1, 1] == 0).all()
    for backend in ("numpy", "host"):
        got = np.asarray(gc.compile(fused, backend=backend)(x=xv, s=sv, params=params))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
    node = next(n for n in fused.topo() if n.op.startswith("fused_") and n.op != "fused_pointwise")
    bad = node.attrs["epilogue"] + (("sub", (), (-1, 0)),)
    with pytest.raises(gc.GraphError, match=r"cancels its operand\(s\) \$0 algebraically"):
        fused.apply(node.op, *fused.operands(node.name), **{**node.attrs, "epilogue": bad})


def test_a_training_conv_without_a_max_pool_says_so():
    from graphconv.fusion import format_report
    g = gc.Graph("np")
    h = g.sigmoid(g.conv2d(g.input("x", ("N", 1, 8, 8)), 4, 3, padding=1, name="c1"))
    g.output(g.linear(g.flatten(h), 10, name="fc"))
    text = format_report(report(build_unfused(g, "fused-train"), build(g, "fused-train")))
    assert "refused  c1: no max pool follows sigmoid1: the training pattern saves a max pool's output and its " \
           "argmax codes in place of c1's output" in text


def test_an_eval_mode_dropout_is_dropped_so_the_conv_chain_around_it_fuses():
    """Inference: conv -> relu -> dropout -> max pool fuses into one node (the dropout is the identity
    in eval mode; the ledger says it was removed) and gives the unfused graph's numbers on numpy and
    host; a dropout that is a graph output keeps its name; training keeps every dropout."""
    from graphconv.fusion import format_report, report
    from graphconv.passes import set_training
    from graphconv.pipeline import build_unfused
    g = gc.Graph("dnet")
    x = g.input("x", ("N", 1, 8, 8))
    h = g.max_pool2d(g.dropout(g.relu(g.conv2d(x, 4, 3, padding=1, name="c")), 0.3, name="drop"), 2, name="p")
    g.output(g.linear(g.flatten(h), 3, name="fc"), g.dropout(h, 0.5, name="drop_out"))
    fused = build(g, "fused")
    assert [n.op for n in fused.topo() if n.role == "op"] == ["fused_conv", "flatten", "linear", "dropout"]
    assert "removed  drop  (eval mode: the identity; its users read relu1)" in format_report(
        report(build_unfused(g, "fused"), fused))
    params = gc.init_params(g, seed=0)
    xs = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    want = gc.compile(set_training(g, False)).run({"x": xs}, params)
    for backend in ("numpy", "host"):
        got = gc.compile(fused, backend=backend).run({"x": xs}, {n.name: params[n.name] for n in fused.params})
        for name in ("fc", "drop_out"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=f"{backend} {name}")
    assert sum(n.op == "dropout" for n in build(g, "fused-train").topo()) >= 2


def test_a_linear_layer_and_the_elementwise_ops_after_it_become_one_fused_linear_node():
    """linear -> residual add (full-size operand) -> per-feature scale -> sympy activation: one
    fused_linear node equal to the chain, with a gradient rule (finite differences); the chain stops at
    the next linear, and a linear whose output is read twice (a training graph's relu) stays alone."""
    from graphconv.gradcheck import check_rule
    gc.define_activation("swish", lambda v: v * gc.sigmoid(v))
    g = gc.Graph("mlp", "float64")
    x = g.input("x", ("N", 6))
    scale = g.input("scale", (5,))
    h = g.add(g.linear(x, 5, name="fc1"), g.input("skip", ("N", 5)), name="res")
    h = g.activation(g.mul(h, scale, name="scaled"), "swish", name="sw")
    g.output(g.linear(h, 3, name="fc2"))
    fused = fuse_conv_chains(g)
    node = fused.node("sw")
    assert node.op == "fused_linear" and [r[0] for r in node.replaces] == ["fc1", "res", "scaled", "sw"]
    assert fused.operands("sw") == ["x", "fc1.weight", "fc1.bias", "skip", "scale"]
    assert fused.node("fc2").op == "linear"
    ledger = {(d.rule, d.anchor): d for d in fused.meta["fusion"]}
    assert ledger[("linear_chain", "fc1")].fired and not ledger[("linear_chain", "fc2")].fired
    assert ledger[("linear_chain", "fc2")].reason == "fc2 is a graph output"
    rng = np.random.default_rng(3)
    feed = {"x": rng.standard_normal((4, 6)), "skip": rng.standard_normal((4, 5)), "scale": rng.standard_normal(5)}
    params = gc.init_params(g, seed=2)
    np.testing.assert_allclose(gc.compile(fused).run(feed, params)["fc2"], gc.compile(g).run(feed, params)["fc2"],
                               rtol=1e-12)
    values = [feed["x"], rng.standard_normal((6, 5)), rng.standard_normal(5), feed["skip"], feed["scale"]]
    checks = check_rule("fused_linear", values, node.attrs, rng)
    assert len(checks) == 5 and all(c.ok for c in checks), checks


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "sigmoid"])
def test_in_training_a_relu_gradient_reads_the_relus_output_so_the_layer_before_it_fuses(act):
    """relu / leaky_relu (a positive slope): y > 0 exactly where x > 0, so the activation's gradient
    reads y and the conv (without a pool) or linear before it is no longer saved: both fuse with it,
    and the fused step computes the unfused one's gradients. sigmoid's gradient reads x: unfused."""
    g = gc.Graph("net", "float64")
    x = g.input("x", ("N", 2, 6, 6))
    h = getattr(g, act)(g.conv2d(x, 3, 3, padding=1, name="conv"), name="a1")
    h = getattr(g, act)(g.linear(g.flatten(h), 8, name="fc1"), name="a2")
    g.output(g.linear(h, 3, name="fc2"))
    unfused = build_unfused(g, "train")
    fused = build(g, "fused-train")
    ledger = {(d.rule, d.anchor): d for d in fused.meta["fusion"]}
    for layer, rule, into in (("conv", "conv_chain", "a1"), ("fc1", "linear_chain", "a2")):
        decision = ledger[(rule, layer)]
        assert decision.fired == (act != "sigmoid"), decision
        if act == "sigmoid":           # "no max pool follows a1: ...", "fc1 has 2 users (a2, dfc1): ..."
            assert layer in fused and ("no max pool" in decision.reason or "2 users" in decision.reason)
            continue
        assert decision.reason.startswith(f"d{layer} reads {into} (")
        assert layer not in fused and fused.node(into).op == ("fused_conv" if layer == "conv" else "fused_linear")
        assert into in fused.operands(f"d{layer}")          # the gradient reads the activation's output
    if act != "sigmoid":              # fc2's input gradient and a2's gradient: one fused_matmul
        assert fused.node("dfc1").op == "fused_matmul" and ledger[("matmul_chain", "da2")].fired
    params = gc.init_params(unfused, seed=1)
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((3, 2, 6, 6)), "y": np.array([0, 2, 1])}
    want = gc.compile(unfused).run(feed, params)
    got = gc.compile(fused).run(feed, {n.name: params[n.name] for n in fused.params})
    assert set(want) == set(got)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_hand_built_fused_linear_without_its_bias_operand_is_refused_by_name():
    g = gc.Graph("h")
    x, w = g.input("x", ("N", 4)), g.param("w", (4, 3), ("uniform", 1.0))
    with pytest.raises(gc.GraphError, match=r"f \[fused_linear\]: fused_linear needs an input and a weight, then a "
                                            r"bias \(bias=True\), got 2 operands"):
        g.apply("fused_linear", x, w, epilogue=(("relu", (), (-1,)),), name="f")
    h = g.apply("fused_linear", x, w, bias=False, epilogue=(("relu", (), (-1,)),), name="f")
    assert tuple(h.shape)[1] == 3
