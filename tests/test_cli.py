"""The command line: every subcommand's output and its clean errors (exit 2, no traceback)."""
import json
import subprocess
import sys

import numpy as np

import graphconv as gc
from graphconv.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_summary_table_and_json(capsys):
    code, out, _ = run(capsys, "summary", "lenet5")
    assert code == 0 and "| conv2    | conv2d     | 50 x 14 x 14 | 50 x 20 x 5 x 5 |" in out
    assert "1,256,080" in out and "6,522,000" in out
    code, out, _ = run(capsys, "summary", "seed_conv", "--format", "json", "--batch", "2")
    data = json.loads(out)
    assert data["total_params"] == 760 and data["total_macs"] == 2 * 768_000 and data["batch"] == 2


def test_models_lists_every_bundled_model(capsys):
    from graphconv.models import MODELS
    code, out, _ = run(capsys, "models")
    assert code == 0 and [ln.split()[0] for ln in out.splitlines()] == list(MODELS)


def test_dump_formats(capsys):
    code, out, _ = run(capsys, "dump", "resnet8", "--format", "text")
    assert code == 0 and "%block1.add:f32[N,16,32,32] = add %block1.bn2 %block1.relu1" not in out
    assert "= add %block1.bn2 %relu1" in out
    code, out, _ = run(capsys, "dump", "lenet5", "--format", "dot")
    assert out.startswith('digraph "lenet5"') and '"conv1" -> "relu1" [label="0: f32[N,20,28,28]"];' in out
    code, out, _ = run(capsys, "dump", "lenet5", "--format", "json")
    assert json.loads(out)["outputs"] == ["fc2"]


def test_run_prints_output_statistics(capsys):
    code, out, _ = run(capsys, "run", "conv1d_net", "--batch", "3")
    assert code == 0 and "fc: f32[N,10] -> float32[3, 10]" in out


def test_errors_are_one_clean_line(capsys, tmp_path):
    code, out, err = run(capsys, "summary", "lenet")
    assert code == 2 and err.startswith("graphconv: error: unknown model 'lenet'") and "Traceback" not in err
    bad = tmp_path / "bad.py"
    bad.write_text("import graphconv as gc\n"
                   "def net():\n"
                   "    g = gc.Graph('bad')\n"
                   "    x = g.input('x', ('N', 3, 8, 8))\n"
                   "    g.conv2d(g.conv2d(x, 4, 3, name='c1'), 8, 3, in_channels=5, name='c2')\n")
    code, out, err = run(capsys, "summary", f"{bad}:net")
    assert code == 2
    assert err.strip() == ("graphconv: error: bad.py:net: c2 [conv2d]: input has 4 channels, weight expects 5 "
                           "(input [N,4,6,6] from c1 <- x)")


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "graphconv.cli", "summary", "seed_conv"], capture_output=True,
                          text=True, check=True)
    assert "768,000" in proc.stdout


def test_dump_backward_and_train_stages(capsys):
    code, out, _ = run(capsys, "dump", "lenet5", "--stage", "backward")
    assert code == 0 and out.startswith("graph lenet5.backward(%x:f32[N,1,28,28], %y:i64[N]) -> (%loss:f32[]")
    assert "%drelu2:f32[N,50,14,14] = max_pool2d_backward" in out and "# grad_of=pool2, rule=max_pool2d.grad" in out
    assert "# saved for the backward pass: 11 tensors, 236,504 bytes per example (x, conv1," in out
    code, again, _ = run(capsys, "dump", "lenet5", "--stage", "backward")
    assert again == out
    code, out64, _ = run(capsys, "dump", "lenet5", "--stage", "backward", "--batch", "64")
    assert f"11 tensors, {64 * 236504:,} bytes at batch 64" in out64
    code, out, _ = run(capsys, "dump", "vgg_small", "--stage", "train", "--optimizer", "sgd")
    assert "%bn1_1.running_mean.next:f32[32] = batch_norm_update_stats[momentum=0.1, stat=mean]" in out
    assert "%fc2.bias.next:f32[10] = sgd_param %fc2.bias %fc2.bias.velocity.next %opt.lr" in out
    assert out.splitlines()[0].endswith(", ... 56 more) {")


def test_gradcheck_command(capsys):
    code, out, _ = run(capsys, "gradcheck", "lenet5_swish")
    assert code == 0 and "swish.grad[x]" in out and "mish.grad[x]" in out and "0 failed" in out
    code, out, _ = run(capsys, "gradcheck", "conv1d_net", "--loss", "hinge")
    assert code == 0 and "hinge_loss.grad[scores]" in out


def test_gradcheck_exits_non_zero_on_a_wrong_rule(capsys, monkeypatch):
    from graphconv.ops import OPS
    op = OPS["reduce_sum"]
    monkeypatch.setattr(op, "reference", lambda xs, attrs: 2 * xs[0].sum(axis=attrs["axes"]))
    code, out, _ = run(capsys, "gradcheck", "conv1d_net")
    assert code == 1 and "FAIL" in out


def test_train_command_saves_and_resumes(capsys, tmp_path):
    ck = tmp_path / "c1.npz"
    code, out, _ = run(capsys, "train", "conv1d_net", "--data", "mnist1d", "--epochs", "1", "--save", str(ck),
                       "--progress", "off")
    assert code == 0 and "epoch   1  loss" in out and ck.exists()
    code, out, _ = run(capsys, "train", "conv1d_net", "--data", "mnist1d", "--epochs", "1", "--save", str(ck),
                       "--resume", str(ck), "--progress", "off")
    assert code == 0 and "resumed from" in out and "epoch   2  loss" in out
    code, out, err = run(capsys, "train", "lenet5", "--resume", str(ck), "--epochs", "1")
    assert code == 2 and "fc.weight: lenet5 has no parameter or buffer of that name (a checkpoint of another model?)" \
        in err and "Traceback" not in err


def test_readme_python_examples_run():
    """The README's Python blocks, run top to bottom in one namespace."""
    import pathlib
    import re
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (64, 10)
    assert namespace["out"]["dconv1.weight"].shape == (20, 1, 5, 5)
    assert namespace["h2"].shape == namespace["h"].shape


def test_example_user_model_with_a_sympy_activation(capsys):
    import pathlib
    spec = f"{pathlib.Path(__file__).parent.parent / 'examples' / 'custom_net.py'}:build"
    code, out, _ = run(capsys, "summary", spec)
    assert code == 0 and "| gelu_tanh1 | gelu_tanh  | 16 x 28 x 28 |" in out
    code, out, _ = run(capsys, "gradcheck", spec)
    assert code == 0 and "gelu_tanh.grad[x]" in out and "0 failed" in out


def test_train_refuses_a_model_whose_classes_do_not_match_the_data(capsys, tmp_path):
    src = tmp_path / "five.py"
    src.write_text("import graphconv as gc\n"
                   "def net():\n"
                   "    g = gc.Graph('five')\n"
                   "    g.output(g.linear(g.flatten(g.input('x', ('N', 1, 8, 8))), 5))\n"
                   "    return g\n")
    code, _, err = run(capsys, "train", f"{src}:net", "--epochs", "1", "--save", str(tmp_path / "f.npz"))
    assert code == 2 and "five outputs 5 scores per example; digits has 10 classes" in err


def test_dump_pictures_cluster_layers_and_need_graphviz(capsys, tmp_path, monkeypatch):
    import shutil as _shutil
    import pytest
    if _shutil.which("dot") is None:
        pytest.skip("graphviz not installed (.ci/run installs it)")
    code, out, _ = run(capsys, "dump", "lenet5", "--stage", "fused", "--format", "svg", "-o", str(tmp_path / "g.svg"))
    svg = (tmp_path / "g.svg").read_text()
    assert code == 0 and "wrote" in out and svg.count('class="cluster"') == 4     # conv1, conv2, fc1, fc2
    assert "conv1 (fused: conv1 &#45;&gt; relu1 &#45;&gt; pool1)" in svg
    code, out, _ = run(capsys, "dump", "lenet5", "--stage", "train", "--format", "png", "-o", str(tmp_path / "g.png"))
    assert code == 0 and (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dot = main(["dump", "lenet5", "--stage", "backward", "--format", "dot"]) or capsys.readouterr().out
    assert 'fillcolor="#fbe3cf"' in dot and '"conv1" -> "relu1" [label="0: f32[N,20,28,28]"];' in dot
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)            # a terminal gets no PNG bytes
    code, _, err = run(capsys, "dump", "lenet5", "--format", "png")
    assert code == 2 and "--format png is binary: write it to a file with -o FILE.png" in err
    code, out, _ = run(capsys, "dump", "lenet5", "--format", "json", "-o", str(tmp_path / "g.json"))
    assert code == 0 and out.startswith(f"wrote {tmp_path / 'g.json'} (") and "lenet5 --stage forward, json)" in out
    monkeypatch.setattr(_shutil, "which", lambda name: None)
    code, _, err = run(capsys, "dump", "lenet5", "--format", "svg")
    assert code == 2 and "apt-get install graphviz" in err and len(err.strip().splitlines()) == 1


def test_filters_draws_each_conv_filter_around_mid_grey(capsys, tmp_path):
    import zlib
    import numpy as np
    from graphconv.models import lenet5
    from graphconv.training import Trainer
    trainer = Trainer(lenet5(), seed=0)
    w = np.zeros((20, 1, 5, 5), np.float32)
    w[0, 0, 0, 0], w[1, 0, 4, 4] = 0.5, -2.0           # white top-left of filter 0, black bottom-right of 1
    trainer.state["conv1.weight"] = w
    trainer.save(tmp_path / "w.npz")
    code, out, _ = run(capsys, "filters", "lenet5", "--weights", str(tmp_path / "w.npz"), "-o", str(tmp_path / "f.png"))
    assert code == 0 and "the filters of conv1" in out
    data = (tmp_path / "f.png").read_bytes()
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    raw = zlib.decompress(data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8])
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)[:, 1:].reshape(height, width, 3)
    scale, gap = 36 // 5, 3                      # 7 pixels a weight, 3-pixel gaps, 10 filters a row
    assert (width, height) == (gap + 10 * (5 * scale + gap), gap + 2 * (5 * scale + gap))
    assert rows[gap, gap].tolist() == [255, 255, 255]                       # filter 0, weight (0, 0)
    assert rows[gap + 5 * scale - 1, gap + 5 * scale - 1].tolist() == [127, 127, 127]   # filter 0 elsewhere: 0
    second = gap + (5 * scale + gap)
    assert rows[gap + 5 * scale - 1, second + 5 * scale - 1].tolist() == [0, 0, 0]      # filter 1, weight (4, 4)
    code, _, err = run(capsys, "filters", "lenet5", "--weights", str(tmp_path / "w.npz"), "--layer", "fc1")
    assert code == 2 and "no conv layer 'fc1' (its conv layers: conv1, conv2)" in err


def test_demo_runs_the_whole_tool_and_says_where_everything_is(capsys, tmp_path):
    import json as _json
    out_dir = tmp_path / "demo"
    code, out, _ = run(capsys, "demo", "-o", str(out_dir), "--epochs", "1", "--backend", "host", "--progress", "off")
    assert code == 0
    for step in ("[1] LeNet-5", "[2] one training step", "[3] code generation", "[4] every kernel against NumPy",
                 "[5] training", "[6] pictures", "[7] done"):
        assert step in out
    assert "24 kernels checked, 0 mismatched" in out
    manifest = _json.loads((out_dir / "kernels" / "manifest.json").read_text())
    assert len(manifest["kernels"]) == 24 and all((out_dir / "kernels" / k["file"]).exists() for k in manifest["kernels"])
    assert (out_dir / "lenet5.npz").exists() and (out_dir / "conv1-filters.png").read_bytes()[:4] == b"\x89PNG"
    report = (out_dir / "report.html").read_text()
    assert report.startswith("<!DOCTYPE html>") and "What conv1's filters learned" in report
    accuracy = float(out.split("test accuracy")[1].split("%")[0])
    assert accuracy > 80, out
    assert f"weights   {out_dir / 'lenet5.npz'}" in out
    nxt = [line for line in out.splitlines() if line.strip().startswith("next:")][0]
    command = nxt.split("next:")[1].split(";")[0].split()                # the suggested predict works
    assert command[:2] == ["graphconv", "predict"] and main(command[1:] + ["--backend", "host"]) == 0
    assert f"accuracy {accuracy:.2f}%" in capsys.readouterr().out


def test_every_command_has_help_with_examples_that_parse(capsys):
    import shlex
    from graphconv.cli import EXAMPLES, parser
    p = parser()
    commands = set(p._subparsers._group_actions[0].choices)
    assert commands == set(EXAMPLES)
    for name in commands:
        try:
            main([name, "--help"])
        except SystemExit as e:
            assert e.code == 0
        out = capsys.readouterr().out
        assert "examples:\n  graphconv " + name in out, name
        for line in EXAMPLES[name]:
            p.parse_args(shlex.split(line)[1:])


def test_run_says_which_mode_and_eval_switches_it(capsys):
    code, train, _ = run(capsys, "run", "vgg_small", "--batch", "2")
    assert code == 0 and train.startswith("vgg_small on numpy, training mode: batch statistics (--eval for inference): ")
    code, evaluated, _ = run(capsys, "run", "vgg_small", "--batch", "2", "--eval")
    assert code == 0 and evaluated.startswith("vgg_small on numpy, eval mode: ")
    assert train.splitlines()[1] != evaluated.splitlines()[1]          # running statistics: other outputs
    code, out, _ = run(capsys, "run", "lenet5", "--batch", "2")
    assert code == 0 and out.startswith("lenet5 on numpy: batch 2")    # nothing modal: no word


def test_train_refuses_the_step_schedules_settings_with_another_schedule(capsys, tmp_path):
    """--gamma and --step-size were silently ignored with --schedule cosine (or constant)."""
    save = str(tmp_path / "g.npz")
    code, out, err = run(capsys, "train", "lenet5", "--schedule", "cosine", "--gamma", "0.5", "--save", save)
    assert code == 2 and out == "" and "Traceback" not in err
    assert "--gamma sets the step schedule (the learning rate times --gamma every --step-size epochs); --schedule " \
           "cosine does not use it: add --schedule step, or drop --gamma" in err, err
    code, _, err = run(capsys, "train", "lenet5", "--gamma", "0.5", "--step-size", "3", "--save", save)
    assert code == 2 and "--gamma and --step-size set the step schedule" in err and "--schedule constant" in err
    assert not (tmp_path / "g.npz").exists()


def test_the_train_header_lists_the_schedule_as_an_item_of_its_own():
    """The header read "adam lr 0.001, cosine to 0 over 1 epochs betas (0.9, 0.999) ...": the schedule
    split the optimizer's settings, with no comma before betas."""
    from graphconv.training import Optimizer
    assert Optimizer(schedule="cosine", epochs=1).describe() == \
        "adam lr 0.001 betas (0.9, 0.999) weight decay 0, lr cosine to 0 over 1 epoch"
    assert Optimizer("sgd", schedule="step", step_size=10, gamma=0.5).describe() == \
        "sgd lr 0.001 momentum 0.9 weight decay 0, lr x0.5 every 10 epochs"
    assert Optimizer().describe() == "adam lr 0.001 betas (0.9, 0.999) weight decay 0"


def test_collapse_convs_on_every_command_that_builds_a_fused_stage(capsys, tmp_path):
    """--collapse-convs was on dump, fuse and check only: emit and summary build a fused stage too.
    Where the stage has no fusion passes it is refused, not ignored; the help is one text everywhere."""
    from graphconv.cli import COLLAPSE_HELP, parser
    src = tmp_path / "two.py"
    src.write_text("import graphconv as gc\n\ndef build():\n    g = gc.Graph('two')\n"
                   "    h = g.conv2d(g.input('x', ('N', 1, 8, 8)), 4, 3, padding=1, name='c1')\n"
                   "    g.output(g.linear(g.flatten(g.conv2d(h, 4, 3, name='c2')), 10, name='fc'))\n    return g\n")
    model = f"{src}:build"
    code, out, _ = run(capsys, "emit", model, "-o", str(tmp_path / "k"), "--no-nvrtc", "--collapse-convs")
    assert code == 0 and "compose_conv_weights" in out and "two --stage fused: 3 kernels" in out, out
    code, out, _ = run(capsys, "emit", model, "-o", str(tmp_path / "k2"), "--no-nvrtc")
    assert code == 0 and "compose_conv_weights" not in out
    code, out, _ = run(capsys, "summary", model, "--stage", "fused", "--collapse-convs")
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| c")]
    assert code == 0 and rows == ["c2"] and "4 x 1 x 5 x 5" in out, out
    for command in ("summary", "dump", "emit"):
        argv = [command, model, "--stage", "forward", "--collapse-convs"] + (["-o", str(tmp_path / "k3")]
                                                                              if command == "emit" else [])
        code, out, err = run(capsys, *argv)
        assert code == 2 and "--collapse-convs is a fusion pass: it applies to --stage fused or fused-train, " \
                             "not --stage forward" in err, (command, err)
    p = parser()
    for command in ("dump", "fuse", "check", "emit", "summary"):
        action = next(a for a in p._subparsers._group_actions[0].choices[command]._actions
                      if "--collapse-convs" in a.option_strings)
        assert action.help == COLLAPSE_HELP, command


def test_check_counts_relu_inputs_within_float32_rounding_of_the_kink():
    """check's note on float32 training-step mismatches: the elements of each ReLU's input within 16
    float32 eps (of its largest magnitude) of 0, where two correct computations may take opposite
    sides; counted on the reference run, named by the node that feeds the ReLU."""
    from graphconv.cli import near_kinks
    g = gc.Graph("kinks", "float32")
    h = g.add(g.input("x", ("N", 6)), g.input("b", ("N", 6)), name="pre")
    g.output(g.relu(h, name="act"))
    x = np.array([[1.0, -2.0, 1e-7, 4.0, -3e-5, 0.5]], np.float32)
    b = np.array([[0.0, 0.0, 0.0, 0.0, 0.0, -0.5]], np.float32)       # the last cancels to exactly 0
    assert near_kinks(g, {"x": x, "b": b}, {}) == {"pre": 2}            # 1e-7 and 0; not -3e-5 (> 16 eps * 4)
    assert near_kinks(g, {"x": x + np.float32(1), "b": b}, {}) == {}


def test_a_model_files_own_dtype_is_the_default(capsys, tmp_path):
    """A graph declared float64 runs in float64 unless --dtype says otherwise (it was cast to float32
    silently); a bundled model is float32 by default."""
    path = tmp_path / "f64.py"
    path.write_text("import graphconv as gc\ndef build():\n    g = gc.Graph('f64', dtype='float64')\n"
                    "    g.output(g.linear(g.flatten(g.input('x', ('N', 1, 4, 4))), 3, name='fc'))\n    return g\n")
    code, out = run(capsys, "summary", f"{path}:build")[:2]
    assert code == 0 and out.startswith("f64 (float64,")
    code, out = run(capsys, "run", f"{path}:build")[:2]
    assert code == 0 and "-> float64[8, 3]" in out
    code, out = run(capsys, "summary", f"{path}:build", "--dtype", "float32")[:2]
    assert code == 0 and out.startswith("f64 (float32,")
    assert run(capsys, "summary", "lenet5")[1].startswith("lenet5 (float32,")
