"""IR invariants: operand order, deterministic order and dumps, copies, casts, parameters."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import graphconv as gc
from graphconv.models import MODELS, lenet5
from graphconv.printer import FORMATS, to_text


def test_repeated_operand_keeps_order_and_multiplicity():
    g = gc.Graph("t")
    a = g.input("a", ("N", 3))
    b = g.relu(a, name="b")
    s = g.add(b, b, name="s")
    c = g.concat([a, b, a], name="c")
    assert g.operands("s") == ["b", "b"]
    assert g.operands("c") == ["a", "b", "a"]
    assert g.users("a") == [("b", 0), ("c", 0), ("c", 2)]
    g.output(s, c)
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2
    out_s, out_c = gc.compile(g)(x)
    np.testing.assert_array_equal(out_s, 2 * np.maximum(x, 0))
    np.testing.assert_array_equal(out_c, np.concatenate([x, np.maximum(x, 0), x], axis=1))


def test_topological_order_follows_creation():
    g = lenet5()
    names = [n.name for n in g.topo()]
    assert names[:4] == ["x", "conv1.weight", "conv1.bias", "conv1"]
    assert names[-1] == "fc2"


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_dumps_are_byte_identical_across_processes(fmt):
    """Same graph, fresh interpreters with different hash seeds: identical bytes."""
    code = (f"import sys; from graphconv.models import MODELS; from graphconv.printer import FORMATS; "
            f"from graphconv.training import Optimizer, attach_loss, build_train_step; "
            f"graphs = [MODELS[m]() for m in sorted(MODELS)]; "
            f"graphs += [build_train_step(attach_loss(MODELS[m]()), Optimizer(o)) for m, o in "
            f"(('resnet8', 'adam'), ('vgg_small', 'sgd'), ('lenet5_swish', 'adam'))]; "
            f"sys.stdout.write(''.join(FORMATS['{fmt}'](g) for g in graphs))")
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True).stdout)
    assert outs[0] == outs[1]
    assert outs[0].decode().startswith("".join(FORMATS[fmt](MODELS[m]()) for m in sorted(MODELS)))
    assert b"adam_param" in outs[0] and b"sgd_velocity" in outs[0] and b"swish_grad" in outs[0]


def test_text_dump_reads_like_a_jaxpr():
    text = to_text(lenet5())
    assert str(lenet5()) == text and lenet5().dump("dot") == FORMATS["dot"](lenet5())
    assert "| conv1    | conv2d     | 20 x 28 x 28 |" in lenet5().summary()
    with pytest.raises(gc.GraphError, match="unknown dump format 'svg'"):
        lenet5().dump("svg")
    assert text.startswith("graph lenet5(%x:f32[N,1,28,28]) -> (%fc2:f32[N,10]) {")
    assert "%pool1:f32[N,20,14,14] = max_pool2d[kernel_size=(2,2), stride=(2,2)" in text
    assert "%conv2:f32[N,50,14,14] = conv2d[stride=(1,1), padding=(2,2)" in text and "%pool1 %conv2.weight %conv2.bias" in text


def test_copy_is_independent_and_cast_changes_every_float():
    g = lenet5()
    c = g.copy()
    c.node("relu1").attrs["x"] = 1
    assert "x" not in g.node("relu1").attrs
    g64 = gc.cast(g, "float64")
    assert all(n.dtype == "float64" for n in g64.topo())
    assert all(n.dtype == "float32" for n in g.topo())
    # a training step: the backward pass's seed and zero gradients are constants, cast too (they were
    # left float32: "grad_output is float32 but input is float64"); a mean-squared loss, a parameter
    # the loss does not reach, SGD with momentum
    from graphconv.training import Optimizer, attach_loss, build_train_step
    h = gc.Graph("m")
    x, t = h.input("x", ("N", 4)), h.input("t", ("N", 2))
    h.output(h.mse_loss(h.linear(x, 2, name="fc"), t))
    h.linear(x, 3, name="unused")
    step = build_train_step(attach_loss(h), Optimizer("sgd", momentum=0.9))
    step64 = gc.cast(step, "float64")
    assert {n.dtype for n in step64.topo() if not n.is_tuple} == {"float64"}
    feed = {"x": np.ones((2, 4)), "t": np.zeros((2, 2))}
    out = gc.compile(step, dtype="float64").run(feed, gc.init_params(step64, seed=0))
    assert all(v.dtype == np.float64 for v in out.values() if isinstance(v, np.ndarray))


def test_init_params_follows_pytorch_defaults_and_is_seeded():
    g = MODELS["vgg_small"]()
    p0, p0b, p1 = gc.init_params(g, seed=0), gc.init_params(g, seed=0), gc.init_params(g, seed=1)
    assert all(np.array_equal(p0[k], p0b[k]) for k in p0)
    assert not np.array_equal(p0["conv1_1.weight"], p1["conv1_1.weight"])
    w = p0["conv2_1.weight"]                        # fan_in = 32 * 3 * 3
    bound = 1 / np.sqrt(32 * 9)
    assert w.dtype == np.float32 and np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert abs(w.std() - bound / np.sqrt(3)) < 0.05 * bound   # U(-b, b) has std b / sqrt(3)
    assert (p0["bn1_1.weight"] == 1).all() and (p0["bn1_1.bias"] == 0).all()
    assert (p0["bn1_1.running_var"] == 1).all() and (p0["bn1_1.running_mean"] == 0).all()
    # a parameter's values do not depend on the layers around it
    g2 = gc.Graph("other")
    h = g2.conv2d(g2.input("x", ("N", 5, 8, 8)), 32, 1, name="pre")
    g2.conv2d(h, 64, 3, padding=1, name="conv2_1")
    assert np.array_equal(gc.init_params(g2)["conv2_1.weight"], w)


def test_trainable_flags():
    g = MODELS["resnet8"]()
    buffers = [n.name for n in g.params if not n.attrs["trainable"]]
    assert buffers and all(b.endswith(("running_mean", "running_var")) for b in buffers)


def test_initialisation_bounds_equal_pytorch_defaults():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    g = gc.Graph("t")
    x = g.input("x", ("N", 12, 9, 9))
    g.linear(g.flatten(g.conv2d(x, 66, 3, groups=3, name="c")), 100, name="fc")
    params = gc.init_params(g)
    ours = {k: np.abs(v).max() for k, v in params.items()}
    conv, fc = torch.nn.Conv2d(12, 66, 3, groups=3), torch.nn.Linear(66 * 7 * 7, 100)
    theirs = {"c.weight": conv.weight, "c.bias": conv.bias, "fc.weight": fc.weight, "fc.bias": fc.bias}
    for name, t in theirs.items():   # both U(-b, b): the sample maxima agree to within a few percent
        assert ours[name] == pytest.approx(float(t.detach().abs().max()), rel=0.05), name


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz not installed (.ci/run installs it)")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_dot_dumps_render_with_graphviz(name):
    from graphconv.autodiff import derive_backward
    from graphconv.training import attach_loss
    graphs = [MODELS[name]()]
    if len(graphs[0].node(graphs[0].outputs[0]).shape) == 2:   # class scores: add its backward graph
        graphs.append(derive_backward(attach_loss(graphs[0])))
    for graph in graphs:
        svg = subprocess.run(["dot", "-Tsvg"], input=graph.dump("dot"), capture_output=True, text=True, check=True).stdout
        assert svg.count('class="node"') == graph.nx.number_of_nodes()
        assert svg.count('class="edge"') == graph.nx.number_of_edges()


def test_dot_quotes_odd_names():
    g = gc.Graph('we"ird')
    g.output(g.relu(g.input("x", ("N", 3)), name='a"b'))
    assert '"a\\"b" [label="a\\"b\\nrelu\\nf32[N,3]"];' in g.dump("dot")


def test_nodes_carry_a_typed_stage():
    from graphconv.autodiff import saved_tensors
    from graphconv.training import Optimizer, attach_loss, build_train_step
    step = build_train_step(attach_loss(lenet5()), Optimizer("adam"))
    stages = {n.name: n.stage for n in step.topo()}
    assert stages["conv1"] == "forward" and stages["dconv1.weight"] == "backward"
    assert stages["conv1.weight.next"] == "update" and stages["opt.step.next"] == "update"
    # saved tensors are decided by stage, not by provenance: a forward node with a display record stays one
    step.node("relu1").provenance["note"] = "display only"
    assert "relu1" in [n.name for n in saved_tensors(step)]


def test_gradient_ops_have_no_gradient_of_their_own():
    from graphconv.autodiff import derive_backward
    g = gc.Graph("second")
    x, dy = g.input("x", ("N", 2, 4, 4)), g.input("dy", ("N", 2, 2, 2))
    w = g.param("w", (1,), ("constant", 1.0))
    h = g.apply("max_pool2d_backward", x, dy, kernel_size=2, name="unpool")
    g.output(g.cross_entropy(g.flatten(h), g.input("y", ("N",), dtype="int64")))
    with pytest.raises(gc.GraphError, match="unpool \\[max_pool2d_backward\\]: max_pool2d_backward is a gradient "
                                            "op; graphconv derives first-order gradients only"):
        derive_backward(g, wrt=["x"])
    assert w.name == "w"


def test_the_ir_imports_nothing_above_it():
    """ir.py sits on the ground floor: ops and shapes below it; passes, printers, summaries, the
    builder and the CLI above."""
    import ast
    import pathlib
    source = pathlib.Path(gc.__file__).with_name("ir.py").read_text()
    imported = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and n.level}
    assert imported <= {"errors", "ops", "shapes"}, imported


def test_replace_keeps_operand_order_users_outputs_and_records_what_it_replaced():
    g = gc.Graph("r")
    x = g.input("x", ("N", 4))
    a = g.relu(x, name="a")
    b = g.tanh(a, name="b")
    g.output(g.add(x, b, name="sum"), b)
    before = g.nx.nodes["b"]["node"].index
    new = g.replace(["a", "b"], "sigmoid", [x])
    assert new.name == "b" and g.node("b").op == "sigmoid" and g.node("b").index == before
    assert g.operands("sum") == ["x", "b"] and g.outputs == ["sum", "b"] and "a" not in g
    assert [r[:2] for r in g.node("b").replaces] == [("a", "relu"), ("b", "tanh")]
    g.verify()
    with pytest.raises(gc.GraphError, match="x is used outside the replaced nodes"):
        g.replace(["x", "b"], "relu", [g.input("z", ("N", 4))])
    g.replace_uses("b", "x")
    assert g.operands("sum") == ["x", "x"] and g.outputs == ["sum", "x"]


def test_passes_return_new_graphs_and_leave_their_argument_alone():
    from graphconv.passes import bind_dims, cast, eliminate_dead_code, reinfer, set_training
    from graphconv.training import Optimizer, add_optimizer, add_running_statistics, attach_loss
    from graphconv.autodiff import derive_backward
    g = MODELS["vgg_small"]()
    text = str(g)
    for p in (reinfer, eliminate_dead_code, lambda h: cast(h, "float64"), lambda h: set_training(h, False),
              lambda h: bind_dims(h, {})):
        out = p(g)
        assert str(g) == text and out is not g
    bwd = derive_backward(attach_loss(g))
    bwd_text = str(bwd)
    stats = add_running_statistics(bwd)
    step = add_optimizer(stats, Optimizer("sgd"))
    assert str(bwd) == bwd_text and stats is not bwd and step is not stats
    assert len(step.meta["updates"]) == len(stats.meta["updates"]) + 2 * len(bwd.meta["grads"])


def test_per_channel_operands_broadcast_along_dim_1_and_get_summed_gradients():
    import sympy as sp
    from graphconv.gradcheck import check_rule
    from graphconv.ops import OPS, register
    from graphconv.ops.pointwise import Pointwise
    x, s, b = sp.symbols("x s b", real=True)
    if "test_affine" not in OPS:
        register(Pointwise("test_affine", x * s + b, ("x", "s", "b")))
    rng = np.random.default_rng(0)
    values = [rng.standard_normal((2, 3, 4, 4)), rng.standard_normal(3), rng.standard_normal(())]
    g = gc.Graph("pc", "float64")
    ins = [g.input(f"i{k}", v.shape) for k, v in enumerate(values)]
    g.output(g.apply("test_affine", *ins))
    y = gc.compile(g)(*values)
    np.testing.assert_allclose(y, values[0] * values[1][None, :, None, None] + values[2], rtol=1e-12)
    checks = check_rule("test_affine", values, {}, rng)
    assert len(checks) == 3 and all(c.ok for c in checks), checks
    with pytest.raises(gc.ShapeError, match=r"s has shape \[4\], expected \[N,3,4,4\] \(or \[3\] per channel"):
        g.apply("test_affine", g.input("a", ("N", 3, 4, 4)), g.input("c", (4,)), g.input("d", ()))


def test_nodes_with_several_outputs_are_read_through_part_nodes():
    from graphconv.ops import OPS, Op, TensorType, TupleType, register

    class MinMax(Op):
        name = "test_minmax"

        def infer(self, ins, attrs):
            return TupleType((ins[0], TensorType(ins[0].shape, "uint8")))

        def reference(self, xs, attrs):
            return np.minimum(xs[0], 0), (xs[0] > 0).astype(np.uint8)

    if "test_minmax" not in OPS:
        register(MinMax())
    g = gc.Graph("tuple")
    x = g.input("x", ("N", 3))
    both = g.apply("test_minmax", x, name="both")
    g.output(g.apply("part", both, index=0, name="low"), g.apply("part", both, index=1, name="positive"))
    assert "%both:(f32[N,3], u8[N,3]) = test_minmax %x" in str(g)
    assert "%positive:u8[N,3] = part[index=1] %both" in str(g)
    with pytest.raises(gc.GraphError, match=r"both has 2 outputs \(float32\[N,3\], uint8\[N,3\]\); read them"):
        g.node("both").shape
    with pytest.raises(gc.ShapeError, match="index 2 is out of range: the operand has 2 outputs"):
        g.apply("part", both, index=2)
    low, positive = gc.compile(g)(np.array([[-1.0, 2.0, 0.5]], np.float32))
    assert positive.dtype == np.uint8 and positive.tolist() == [[0, 1, 1]] and low.tolist() == [[-1.0, 0, 0]]
    g.verify()


def test_an_automatic_name_after_a_digit_is_separated():
    import sympy as sp
    gc.define_activation("softsign2", lambda v: v / (1 + sp.Abs(v)))
    g = gc.Graph("a")
    h = g.activation(g.input("x", ("N", 4)), "softsign2")
    assert [h.name, g.activation(h, "softsign2").name, g.relu(h).name] == ["softsign2_1", "softsign2_2", "relu1"]
