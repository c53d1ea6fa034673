"""`graphconv demo`: the whole tool on LeNet-5 in one command. It builds the model, prints its layer
table, derives and fuses the training step, emits its CUDA kernels (NVRTC-checked for sm_90),
checks every kernel against NumPy on the host backend, trains on the digits, and writes the learned
filters and the graph as pictures and the HTML report; then says where everything is."""
from __future__ import annotations

import os
import time

import numpy as np


def say(step, text):
    print(f"\n[{step}] {text}", flush=True)


OUTPUTS = {"kernels": "folder", "lenet5.npz": "file", "conv1-filters.png": "file", "lenet5-fused-train.svg": "file",
           "report.html": "file"}


def prepare_output(out_dir):
    """Create the demo's folder, or GraphConvError in one line: an empty name, a file in its place,
    a folder that cannot be made or written, or one of the demo's outputs there of the other kind
    (a folder named report.html)."""
    from .checkpoint import check_writable
    from .errors import GraphConvError
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise GraphConvError("demo -o: give a folder for the kernels, weights and pictures, e.g. -o graphconv-demo")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise GraphConvError(f"demo -o {out_dir}: is a file; the demo writes a folder (kernels, weights, pictures): "
                             f"give a new or existing folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise GraphConvError(f"demo -o {out_dir}: cannot create the folder ({e.strerror})") from None
    for name, kind in OUTPUTS.items():
        path = os.path.join(out_dir, name)
        if os.path.exists(path) and os.path.isdir(path) != (kind == "folder"):
            raise GraphConvError(f"demo -o {out_dir}: {path} is a {'file' if kind == 'folder' else 'folder'}, where "
                                 f"the demo writes its {name} {kind}; move it or choose another -o")
    check_writable(os.path.join(out_dir, "lenet5.npz"))


def run_demo(out_dir="graphconv-demo", epochs=3, backend="auto", seed=0, progress_mode="auto"):
    from codegen import nvrtc
    from codegen.check import check_kernels
    from codegen.emit import emit

    from . import data
    from .data import random_inputs
    from .fusion import report
    from .models import lenet5
    from .params import init_params
    from .pictures import filters_png
    from .pipeline import build, build_unfused
    from .printer import PICTURES, to_picture
    from .summary import format_table, summarize
    from .checkpoint import write_file
    from .training import Optimizer, Trainer, batches
    if backend == "auto":
        from codegen.cuda import available
        backend = "cuda" if available() else "host"
    prepare_output(out_dir)       # a folder that cannot take the results is found now, not after training
    start = time.perf_counter()
    model = lenet5()

    say(1, "LeNet-5 as the lecture's table (per example):")
    print(format_table(summarize(model)))

    say(2, "one training step as a graph: forward, backward (derived), Adam updates; then fused")
    opt = Optimizer("adam", lr=1e-3)
    fused = build(model, "fused-train", optimizer=opt)
    unfused = build_unfused(model, "fused-train", optimizer=opt)
    ledger = report(unfused, fused, batch=64)
    for group in ledger["groups"]:
        if group["fired"]:
            print(f"  fused  {' -> '.join(group['nodes'])}  =>  {group['into']}")
    print(f"  {ledger['kernels_before']} nodes moving {ledger['total_bytes_before'] / 2**20:.1f} MiB -> "
          f"{ledger['kernels_after']} nodes moving {ledger['total_bytes_after'] / 2**20:.1f} MiB (batch 64); the "
          f"fused step saves the pooled outputs and uint8 argmax codes, not the full-size activations")

    kernels_dir = os.path.join(out_dir, "kernels")
    checked = nvrtc.available()
    say(3, f"code generation: CUDA C for every node -> {kernels_dir}/"
           + (" (each compiled by NVRTC for sm_90)" if checked else " (NVRTC not installed: pip install "
                                                                    "nvidia-cuda-nvrtc to compile for sm_90)"))
    manifest = emit(fused, kernels_dir, check_nvrtc=checked)
    rows = manifest["kernels"]
    print(f"  {len(rows)} kernels, {len(manifest['launches'])} launches; buffer plan at batch 64: "
          f"{manifest['buffer_plan']['allocated_bytes'] / 2**20:.1f} MiB")
    for row in rows[:3]:
        res = row.get("nvrtc_sm_90")
        usage = f"  ({res['registers']} registers, {res['shared_bytes']} B shared, no spills)" if res else ""
        print(f"  {row['file']}{usage}")
    print("  ...")

    say(4, f"every kernel against NumPy on the {backend} backend (outputs poisoned with NaN first)")
    params = init_params(fused, seed=seed)
    results = check_kernels(fused, random_inputs(fused, 4, seed), params, backend=backend)
    bad = [r for r in results if not r.ok]
    worst = max(r.max_rel for r in results)
    print(f"  {sum(len(r.kernels) for r in results)} kernels checked, {len(bad)} mismatched, largest relative "
          f"error {worst:.1e}")
    if bad:
        raise SystemExit(f"graphconv demo: kernels disagree with NumPy: {', '.join(r.node for r in bad)}")

    say(5, f"training on scikit-learn's digits for {epochs} epochs on the {backend} backend (the fused kernels)")
    trainer = Trainer(model, opt, backend=backend, seed=seed)
    x_tr, y_tr, x_te, y_te = data.load("digits", model.inputs[0].shape, model.name)
    from .progressbar import progress
    weights = os.path.join(out_dir, "lenet5.npz")
    for _ in range(epochs):
        t = time.perf_counter()
        for idx in progress(batches(len(x_tr), 64, seed, trainer.epoch), f"epoch {trainer.epoch + 1}", progress_mode):
            trainer.step(x_tr[idx], y_tr[idx])
        trainer.epoch += 1
        loss, acc = trainer.evaluate(x_te, y_te)
        print(f"  epoch {trainer.epoch}  test loss {loss:.4f}  test accuracy {acc:6.2%}  "
              f"({time.perf_counter() - t:.1f} s)", flush=True)
    trainer.save(weights)

    say(6, "pictures")
    filters = os.path.join(out_dir, "conv1-filters.png")
    write_file(filters, filters_png(model, trainer.numpy_state(), "conv1")[1])
    print(f"  {filters}: what conv1's 20 filters learned")
    graph_picture = None
    try:
        graph_picture = os.path.join(out_dir, "lenet5-fused-train.svg")
        with open(graph_picture, "wb") as f:
            f.write(to_picture(fused, PICTURES[0]))
        print(f"  {graph_picture}: the fused training step, a cluster per layer")
    except Exception as e:  # noqa: BLE001 - no graphviz: the rest of the demo stands
        print(f"  (no graph picture: {e})")
        graph_picture = None

    from codegen.report import build_report
    report_path = os.path.join(out_dir, "report.html")
    write_file(report_path, build_report(model, "fused-train", trainer.numpy_state(), optimizer=opt))
    print(f"  {report_path}: layers, nodes, gradients, fusion decisions and kernels, linked (open it in a browser)")

    say(7, f"done in {time.perf_counter() - start:.0f} s. Where things are:")
    print(f"  kernels   {kernels_dir}/  (read one: {os.path.join(kernels_dir, rows[0]['file'])})")
    print(f"  manifest  {os.path.join(kernels_dir, 'manifest.json')}")
    print(f"  weights   {weights}  (test accuracy {acc:.2%})")
    print(f"  filters   {filters}")
    print(f"  report    {report_path}")
    if graph_picture:
        print(f"  graph     {graph_picture}")
    print(f"  next: graphconv predict lenet5 --weights {weights};  graphconv dump lenet5 --stage fused-train | less;"
          f"  graphconv check lenet5 --backend host")
    return 0
