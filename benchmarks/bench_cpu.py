"""CPU speed: the numpy backend against PyTorch CPU eager on the same models, weights and inputs.

    python benchmarks/bench_cpu.py [--save] [--quick] [--cases lenet5:64,resnet8:32] [--torch-threads N]

Cases: lenet5 at batch 16, 64 and 256, vgg_small and resnet8 at batch 32; for each, the forward pass
(eval mode, no gradients) and a training step (cross-entropy, backward, Adam). PyTorch runs the
same graph op by op through torch.nn.functional (benchmarks/torch_twin.py).

Method. Threads are pinned on both sides and printed: the numpy backend's BLAS threads are its own
setting (graphconv.reference.BLAS_THREADS, applied with threadpoolctl around every run), PyTorch's
intra-op threads torch.set_num_threads (default: PyTorch's own default, the core count). Each case
runs in a fresh process, so every case starts from the same state (in one process the allocator's
heap carried over from case to case and moved a whole case by 15%); there the two sides run in
alternating blocks, so that both see the same machine; the first calls
of each block are not counted (the other library's worker threads keep spinning for a while after
its last call). Each block gives a median per side and a ratio; the table reports the median of
the block ratios and their spread (max - min over blocks, as a fraction of the median), and the
median time of each side. Peak memory: each side alone in a fresh process, the resident set's
high-water mark over three calls above the resident set held before them (Linux /proc/self). Results are written only
with --save (benchmarks/results/cpu.json and cpu.md), so a run never overwrites committed numbers.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphconv as gc  # noqa: E402
from graphconv import reference  # noqa: E402
from graphconv.models import MODELS  # noqa: E402
from graphconv.training import Optimizer, Trainer  # noqa: E402
from common import machine  # noqa: E402

CASES = [("lenet5", 16), ("lenet5", 64), ("lenet5", 256), ("vgg_small", 32), ("resnet8", 32)]
PHASES = ("forward", "step")


def make_inputs(graph, batch, seed=0):
    rng = np.random.default_rng(seed)
    shape = [batch] + [int(d) for d in graph.inputs[0].shape[1:]]
    return rng.standard_normal(shape).astype(np.float32), rng.integers(0, 10, batch)


def setup(model, batch, phase, side):
    """A function running one call of `side` ('ours' or 'torch'), after checking that the first call
    of each side computes the same numbers."""
    graph = MODELS[model]()
    x, y = make_inputs(graph, batch)
    trainer = Trainer(graph, Optimizer("adam", lr=1e-3), seed=0)
    params = {k: v.copy() for k, v in trainer.state.items() if k in {n.name for n in graph.params}}
    if side == "ours":
        if phase == "step":
            return lambda: trainer.step(x, y)
        run = gc.compile(gc.set_training(graph, False))
        return lambda: run(x, params=params)
    import torch
    from torch_twin import TorchTwin, inference, training_step
    twin = TorchTwin(graph, params)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    if phase == "step":
        step = training_step(twin)
        return lambda: step(tx, ty)
    forward = inference(twin)
    return lambda: forward(tx)


def check_same(model, batch, phase, ours, theirs):
    """The first call of each side: the same loss (step) or scores (forward)."""
    a, b = ours(), theirs()
    a = a[0] if phase == "step" else a
    b = b.item() if phase == "step" else b.numpy()
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=f"{model} {batch} {phase}: the sides differ")


def alternate(ours, theirs, rounds, block_s, settle=2):
    """Per block: (our median, their median) over calls in alternating blocks of about block_s seconds."""
    def count(fn):
        start = time.perf_counter()
        fn()
        return max(3, int(block_s / max(time.perf_counter() - start, 1e-4)))
    n_ours, n_theirs = count(ours), count(theirs)
    blocks = []
    for _ in range(rounds):
        pair = []
        for fn, n in ((ours, n_ours), (theirs, n_theirs)):
            times = []
            for i in range(settle + n):
                start = time.perf_counter()
                fn()
                if i >= settle:
                    times.append(time.perf_counter() - start)
            pair.append(statistics.median(times))
        blocks.append(tuple(pair))
    return blocks


def time_child(model, batch, phase, rounds, block_s, torch_threads):
    import torch
    torch.set_num_threads(torch_threads)
    ours, theirs = setup(model, batch, phase, "ours"), setup(model, batch, phase, "torch")
    check_same(model, batch, phase, ours, theirs)
    blocks = alternate(ours, theirs, rounds, block_s)
    ratios = [a / b for a, b in blocks]
    ratio = statistics.median(ratios)
    print(json.dumps({"model": model, "batch": batch, "phase": phase,
                      "numpy_ms": statistics.median(a for a, _ in blocks) * 1e3,
                      "torch_ms": statistics.median(b for _, b in blocks) * 1e3,
                      "ratio": ratio, "ratio_spread": (max(ratios) - min(ratios)) / ratio, "block_ratios": ratios}))


def timed_case(model, batch, phase, rounds, block_s, torch_threads):
    """One case timed in a fresh process: every case starts from the same state (the allocator's
    heap and thresholds carry over from case to case in one process, and moved a whole case by 15%)."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--time-child", model, str(batch), phase,
                           str(rounds), str(block_s), str(torch_threads)], capture_output=True, text=True, timeout=1200)
    if done.returncode:
        raise SystemExit(f"{model} {batch} {phase}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_child(model, batch, phase, side, torch_threads):
    """In a fresh process, after setup and one warm-up call: the resident set's high-water mark over
    three calls above the resident set before them, in MiB (the mark reset through clear_refs)."""
    if side == "torch":
        import torch
        torch.set_num_threads(torch_threads)
    fn = setup(model, batch, phase, side)
    fn()
    import ctypes
    import gc as collector
    collector.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)           # hand freed heap back, so the baseline is what is held
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                    # resets VmHWM to the current resident set
    base = status_kib("VmRSS")
    for _ in range(3):
        fn()
    print(json.dumps({"peak_mib": (status_kib("VmHWM") - base) / 1024}))


def peak(model, batch, phase, side, torch_threads):
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak-child", model, str(batch), phase, side,
                           str(torch_threads)], capture_output=True, text=True, timeout=600)
    if done.returncode:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/cpu.json and cpu.md")
    ap.add_argument("--quick", action="store_true", help="3 rounds of 0.2 s blocks, no peak memory")
    ap.add_argument("--cases", help="model:batch,... (default: all)")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--block-s", type=float, default=0.4)
    ap.add_argument("--torch-threads", type=int, default=None)
    ap.add_argument("--peak-child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--time-child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_child:
        m, b, ph, r, bs, th = args.time_child
        return time_child(m, int(b), ph, int(r), float(bs), int(th))
    if args.peak_child:
        m, b, ph, side, th = args.peak_child
        return peak_child(m, int(b), ph, side, int(th))
    import torch
    torch_threads = args.torch_threads or torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    rounds, block_s = (3, 0.2) if args.quick else (args.rounds, args.block_s)
    cases = CASES if not args.cases else [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    info = machine()
    info.update(numpy_blas_threads=reference.BLAS_THREADS, torch_threads=torch_threads,
                torch_interop_threads=torch.get_num_interop_threads(), rounds=rounds, block_s=block_s)
    print(f"threads: numpy backend BLAS {reference.BLAS_THREADS} (graphconv's setting, threadpoolctl), "
          f"PyTorch intra-op {torch_threads}; {rounds} alternating blocks of ~{block_s} s per side")
    rows = []
    for model, batch in cases:
        for phase in args.phases.split(","):
            row = timed_case(model, batch, phase, rounds, block_s, torch_threads)
            ratio = row["ratio"]
            if not args.quick:
                row["numpy_peak_mib"] = peak(model, batch, phase, "ours", torch_threads)
                row["torch_peak_mib"] = peak(model, batch, phase, "torch", torch_threads)
            rows.append(row)
            mem = (f"; peak +{row['numpy_peak_mib']:.0f} / +{row['torch_peak_mib']:.0f} MiB"
                   if row.get("numpy_peak_mib") is not None and row.get("torch_peak_mib") is not None else "")
            print(f"{model:9s} batch {batch:3d} {phase:7s}: numpy {row['numpy_ms']:8.2f} ms  torch {row['torch_ms']:8.2f} ms"
                  f"  ratio {ratio:.2f}x (spread {row['ratio_spread'] * 100:.0f}%){mem}", flush=True)
    steps = [r for r in rows if r["phase"] == "step"]
    for r in steps:
        verdict = "met" if r["ratio"] <= 1.5 else f"missed by {(r['ratio'] / 1.5 - 1) * 100:.0f}%"
        print(f"training step {r['model']} batch {r['batch']}: {r['ratio']:.2f}x PyTorch (target <= 1.5x: {verdict})")
    if args.save:
        result = {"benchmark": "numpy backend vs PyTorch CPU eager", **info, "rows": rows}
        folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        with open(os.path.join(folder, "cpu.json"), "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        lines = ["| model | batch | phase | numpy backend ms | PyTorch ms | ratio | spread | numpy peak MiB | PyTorch peak MiB |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            def mib(v):
                return f"{v:.0f}" if v is not None else "-"
            lines.append(f"| {r['model']} | {r['batch']} | {r['phase']} | {r['numpy_ms']:.2f} | {r['torch_ms']:.2f} | "
                         f"{r['ratio']:.2f}x | {r['ratio_spread'] * 100:.0f}% | {mib(r.get('numpy_peak_mib'))} | "
                         f"{mib(r.get('torch_peak_mib'))} |")
        with open(os.path.join(folder, "cpu.md"), "w") as f:
            f.write(f"# numpy backend vs PyTorch CPU eager\n\n{json.dumps(info)}\n\n" + "\n".join(lines) + "\n")
        print("saved benchmarks/results/cpu.json and cpu.md")
    else:
        print("(not saved: pass --save to write benchmarks/results/cpu.json and cpu.md)")


if __name__ == "__main__":
    main()
