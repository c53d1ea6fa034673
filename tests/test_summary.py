"""The layer table against the lecture (LeNet-5 table, the 3x32x32 convolution example) and the
receptive fields against an empirical oracle (which input pixels move an output, by autograd)."""
import numpy as np
import pytest

import graphconv as gc
from graphconv.models import MODELS, lenet5, seed_conv
from graphconv.passes import bind_dims
from graphconv.shapes import symbol
from graphconv.summary import format_json, format_table, summarize
from torch_oracle import torch

# The lecture's LeNet-5 table: layer, output size, weight size
LECTURE_LENET5 = [
    ("Input", "1 x 28 x 28", ""),
    ("Conv", "20 x 28 x 28", "20 x 1 x 5 x 5"),
    ("ReLU", "20 x 28 x 28", ""),
    ("MaxPool", "20 x 14 x 14", ""),
    ("Conv", "50 x 14 x 14", "50 x 20 x 5 x 5"),
    ("ReLU", "50 x 14 x 14", ""),
    ("MaxPool", "50 x 7 x 7", ""),
    ("Flatten", "2450", ""),
    ("Linear", "500", "2450 x 500"),
    ("ReLU", "500", ""),
    ("Linear", "10", "500 x 10"),
]
LECTURE_OPS = {"Input": "input", "Conv": "conv2d", "ReLU": "relu", "MaxPool": "max_pool2d", "Flatten": "flatten",
               "Linear": "linear"}


def table_rows(text):
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_lenet5_table_equals_the_lecture():
    rows = table_rows(format_table(summarize(lenet5())))
    head, body = rows[0], rows[1:-1]
    assert head[:4] == ["Layer", "Op", "Output Size", "Weight Size"]
    assert [(LECTURE_OPS[k], size, w) for k, size, w in LECTURE_LENET5] == [(r[1], r[2], r[3]) for r in body]


def test_lenet5_counts():
    s = summarize(lenet5())
    by = {r["name"]: r for r in s["layers"]}
    # parameters: weights + biases, as the lecture counts them for the conv example
    assert by["conv1"]["params"] == 20 * 1 * 5 * 5 + 20
    assert by["conv2"]["params"] == 50 * 20 * 5 * 5 + 50
    assert by["fc1"]["params"] == 2450 * 500 + 500
    assert by["fc2"]["params"] == 500 * 10 + 10
    assert s["total_params"] == 520 + 25050 + 1225500 + 5010
    # multiply-adds: outputs x (C_in * K * K), per example
    assert by["conv1"]["macs"] == 20 * 28 * 28 * 25
    assert by["conv2"]["macs"] == 50 * 14 * 14 * 20 * 25
    assert s["total_macs"] == 392000 + 4900000 + 1225000 + 5000
    assert [r["receptive_field"] for r in s["layers"][:8]] == [[1, 1], [5, 5], [5, 5], [6, 6], [14, 14], [14, 14],
                                                               [16, 16], [28, 28]]


def test_seed_conv_is_the_lecture_example():
    s = summarize(seed_conv())
    conv = s["layers"][1]
    assert conv["output_shape"] == ["N", 10, 32, 32]
    assert conv["weight_shape"] == [10, 3, 5, 5]
    assert conv["params"] == 760 and s["total_params"] == 760
    assert conv["macs"] == 768_000
    text = format_table(s)
    assert "768,000" in text and "760" in text and "10 x 32 x 32" in text


def test_batch_scales_counts_and_json_fields():
    s1, s64 = summarize(lenet5()), summarize(lenet5(), batch=64)
    assert s64["total_macs"] == 64 * s1["total_macs"]
    assert s64["total_params"] == s1["total_params"]
    assert s64["layers"][1]["output_shape"] == [64, 20, 28, 28]
    assert s64["layers"][1]["activation_bytes"] == 64 * 20 * 28 * 28 * 4
    import json
    data = json.loads(format_json(s64))
    for layer in data["layers"]:
        assert {"name", "op", "output_shape", "weight_shape", "params", "macs", "receptive_field"} <= set(layer)
    assert data["total_params"] == 1_256_080 and data["total_macs"] == 64 * 6_522_000


def empirical_receptive_field(graph, node_name):
    """Extent of the input pixels whose change moves the centre output of `node_name`: autograd
    through the torch oracle, with positive weights so that nothing cancels."""
    from torch_oracle import evaluate_into
    g64 = gc.cast(graph, "float64")
    tensors = {k: torch.from_numpy(np.abs(v) + 0.1) for k, v in gc.init_params(g64).items()}
    x = torch.ones([int(d) for d in g64.inputs[0].shape], dtype=torch.float64, requires_grad=True)
    tensors[g64.inputs[0].name] = x
    evaluate_into(g64, tensors)
    out = tensors[node_name]
    out[(0, 0) + tuple(s // 2 for s in out.shape[2:])].backward()
    return [int(ix.max() - ix.min() + 1) for ix in np.nonzero(x.grad[0, 0].numpy())]


@pytest.mark.skipif(torch is None, reason="PyTorch not installed")
def test_receptive_fields_match_autograd():
    g = gc.Graph("rf")
    x = g.input("x", (1, 1, 64, 64))
    h = g.conv2d(x, 2, 3, padding=1, name="c1")
    h = g.avg_pool2d(h, 2, name="p1")
    h = g.conv2d(h, 2, (3, 5), dilation=(2, 1), padding=(2, 2), name="c2")
    h = g.conv2d(h, 2, 3, stride=2, padding=1, name="c3")
    h = g.avg_pool2d(g.relu(h, name="r"), 3, stride=1, padding=1, name="p2")
    g.output(h)
    rfs = {r["name"]: r["receptive_field"] for r in summarize(g)["layers"]}
    for name in ("c1", "p1", "c2", "c3", "p2"):
        assert rfs[name] == empirical_receptive_field(g, name), name


def test_every_bundled_model_summarises():
    for name, build in MODELS.items():
        s = summarize(build(), batch=2)
        assert s["total_params"] == sum(int(np.prod(p.shape)) for p in build().params if p.attrs["trainable"])
        out = build().node(build().outputs[0])
        assert s["layers"][-1]["output_shape"] == [2] + [int(d) for d in out.shape[1:]], name


def test_costs_of_ops_and_gradient_ops():
    from graphconv.autodiff import derive_backward
    from graphconv.ops import OPS
    from graphconv.training import attach_loss
    import sympy as sp
    g = lenet5()
    node = g.node("conv2")
    cost = OPS["conv2d"].cost(g.in_types("conv2"), node.type, node.attrs)
    n = sp.Symbol("N", integer=True, positive=True)
    assert cost.params == 25050 and cost.macs == 4_900_000 * n
    assert cost.bytes_read == 4 * (20 * 14 * 14 * n + 50 * 20 * 25 + 50)
    assert cost.bytes_written == 4 * 50 * 14 * 14 * n
    bwd = derive_backward(attach_loss(g))
    macs = {b.name: OPS[b.op].cost(bwd.in_types(b.name), b.type, b.attrs).macs for b in bwd.topo() if b.role == "op"}
    assert macs["dpool1"] == macs["dconv2.weight"] == cost.macs     # each conv gradient costs one forward conv
    assert macs["dfc1.weight"] == macs["dflatten1"] == 2450 * 500 * n


def test_training_step_summary():
    from graphconv.summary import format_training, summarize_training
    from graphconv.training import Optimizer, attach_loss, build_train_step
    step = build_train_step(attach_loss(lenet5()), Optimizer("adam"))
    t = summarize_training(step)
    assert t["macs"]["forward"] == 6_522_000
    # conv2: data + weight gradients; conv1: weight only (no gradient for the image); fc: both
    assert t["macs"]["backward"] == 2 * 4_900_000 + 392_000 + 2 * 1_225_000 + 2 * 5_000
    params = 4 * 1_256_080
    assert t["bytes"]["parameters"] == t["bytes"]["gradients"] == params
    assert t["bytes"]["optimizer state"] == 2 * params + 8          # Adam's m and v, the step count, the lr
    assert t["bytes"]["saved activations"] == 236_504
    t64 = summarize_training(step, batch=64)
    assert t64["macs"]["backward"] == 64 * t["macs"]["backward"] and t64["bytes"]["parameters"] == params
    assert "backward MACs      12,652,000" in format_training(t)


def test_an_uneven_adaptive_pool_has_no_single_receptive_field_and_a_global_one_sees_everything():
    from graphconv.summary import receptive_fields
    g = gc.Graph("a")
    h = g.conv2d(g.input("x", ("N", 1, 7, 7)), 2, 3, name="c")
    g.output(g.adaptive_max_pool2d(h, 3, name="uneven"), g.adaptive_avg_pool2d(h, 2, name="also"),
             g.global_avg_pool(g.input("y", ("N", 1, "H", "W")), name="global"))
    rf = receptive_fields(g)
    assert rf["c"][0] == (3, 3) and rf["uneven"][0] is None and rf["also"][0] is None   # windows 3 and 2 (5 -> 2)
    assert rf["global"][0] == (symbol("H"), symbol("W"))     # symbolic sizes: the whole input, H x W
    g2 = gc.Graph("b")
    g2.output(g2.global_avg_pool(g2.conv2d(g2.input("x", ("N", 1, 6, 9)), 2, 3, name="c"), name="global"))
    assert receptive_fields(g2)["global"][0] == (6, 9)
    g3 = gc.Graph("c")                                # a field already past the input's extent stays so
    h = g3.conv2d(g3.conv2d(g3.input("x", ("N", 1, 4, 4)), 2, 5, padding=2, name="c1"), 2, 5, padding=2, name="c2")
    g3.output(g3.apply("adaptive_avg_pool2d", h, output_size=(1, 1), name="global"))
    assert receptive_fields(g3)["c2"][0] == (9, 9) and receptive_fields(g3)["global"][0] == (9, 9)
    g4 = gc.Graph("d")                                # past a resampling layer, a linear sees the whole input again
    h = g4.conv_transpose2d(g4.conv2d(g4.input("x", ("N", 1, 8, 8)), 4, 3, name="c"), 2, 2, stride=2, name="ct")
    g4.output(g4.linear(g4.flatten(g4.adaptive_avg_pool2d(g4.conv2d(h, 3, 3, name="c2"), 5, name="ap")), 3, name="fc"))
    rf4 = receptive_fields(g4)
    assert [rf4[n][0] for n in ("c", "ct", "c2", "ap", "fc")] == [(3, 3), None, None, None, (8, 8)]
    from graphconv.summary import summarize
    rows = {r["name"]: r["receptive_field"] for r in summarize(g4)["layers"]}
    assert rows["ct"] is None and rows["fc"] == [8, 8]


def test_symbolic_sizes_read_shortest_and_keep_their_receptive_fields():
    """A stride-2 conv's floor(H/2 - 1/2) + 1 reads ceiling(H/2) (the shapes keep their form; the
    display is checked equal to them in test_shapes); receptive fields do not depend on H, W up to a
    layer that sees the whole input, which sees Max(its field, H)."""
    g = gc.Graph("sym")
    h = g.relu(g.conv2d(g.input("x", ("N", 3, "H", "W")), 8, 3, stride=2, padding=1, name="c1"))
    h = g.max_pool2d(g.conv2d(h, 8, 5, stride=2, name="c2"), 3, stride=2, name="pool")
    g.output(g.linear(g.flatten(g.adaptive_avg_pool2d(h, 1, name="gap")), 10, name="fc"))
    rows = {r["name"]: r for r in summarize(g)["layers"]}
    assert rows["c1"]["output_shape"] == ["N", 8, "ceiling(H/2)", "ceiling(W/2)"]
    assert rows["c2"]["output_shape"][2:] == ["ceiling(H/4)-2", "ceiling(W/4)-2"]
    assert rows["pool"]["output_shape"][2:] == ["ceiling(H/8)-2", "ceiling(W/8)-2"]
    assert rows["c1"]["macs"] == "216*ceiling(H/2)*ceiling(W/2)"
    assert [rows[n]["receptive_field"] for n in ("c1", "c2", "pool", "gap", "fc")] == [
        [3, 3], [11, 11], [19, 19], ["Max(19,H)", "Max(19,W)"], ["Max(19,H)", "Max(19,W)"]]
    bound = summarize(bind_dims(g, {"H": 40, "W": 64}))
    sized = {r["name"]: r for r in bound["layers"]}
    assert sized["pool"]["output_shape"][2:] == [3, 6] and sized["fc"]["receptive_field"] == [40, 64]


def test_a_fused_summary_counts_the_parameters_a_folded_or_composed_weight_is_made_of():
    """fold_batch_norm and --collapse-convs compute a layer's weight from parameters: the row counts
    those parameters (a batch norm's gamma and beta, both convs' weights and biases), so the total is
    the model's, not the computed weights' (which dropped the batch norms and counted a composed 5 x 5
    kernel in place of two 3 x 3 ones)."""
    from graphconv.pipeline import build
    for name in ("vgg_small", "resnet8"):
        assert summarize(build(MODELS[name](), "fused"))["total_params"] == summarize(MODELS[name]())["total_params"]
    g = gc.Graph("stacked")
    x = g.input("x", ("N", 3, 10, 10))
    g.output(g.relu(g.conv2d(g.conv2d(x, 8, 3, padding=1, name="c1"), 4, 3, name="c2")))
    collapsed = build(g, "fused", collapse=True)
    rows = {r["name"]: r for r in summarize(collapsed)["layers"]}
    assert rows["relu1"]["params"] == (8 * 3 * 9 + 8) + (4 * 8 * 9 + 4) == summarize(g)["total_params"]


def test_a_graph_with_a_fixed_first_dim_counts_for_that_batch_and_refuses_another(capsys, tmp_path):
    """(4, 1, 8, 8) has no batch symbol: its counts are for batch 4, and the title says so (it said
    "per example" or "for batch 8" over batch-4 rows); --batch is refused as `run` refuses it."""
    from graphconv.cli import main
    g = gc.Graph("fixed")
    g.output(g.linear(g.flatten(g.input("x", (4, 1, 8, 8))), 10, name="fc1"))
    s = g.summary()
    assert s.splitlines()[0] == "fixed (float32, counts for batch 4)" and "2,560" in s
    path = tmp_path / "fixed.py"
    path.write_text("import graphconv as gc\ndef build():\n    g = gc.Graph('fixed')\n"
                    "    g.output(g.linear(g.flatten(g.input('x', (4, 1, 8, 8))), 10, name='fc1'))\n    return g\n")
    vector = gc.Graph("vector")                      # a plain vector input has no rows: per example
    vector.output(vector.relu(vector.input("x", (10,)), name="r"))
    assert vector.summary().splitlines()[0] == "vector (float32, counts per example (N = 1))"
    assert main(["summary", f"{path}:build", "--batch", "8"]) == 2
    assert "fixed has no batch dim to size" in capsys.readouterr().err
