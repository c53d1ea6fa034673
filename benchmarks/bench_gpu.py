"""The GPU benchmark: graphconv's kernels against PyTorch eager (cuDNN) and torch.compile on the same
device in one run, with warm-up, CUDA events and medians, at pinned precision (FP32 on both sides:
torch.backends.cudnn.allow_tf32 = False and torch.backends.cuda.matmul.allow_tf32 = False).

    python benchmarks/bench_gpu.py [--save] [--repeats 50]          # on a GPU machine, from the source tree
    python benchmarks/bench_gpu.py --smoke                         # the plumbing on the host backend, no GPU

Measured:
  1. every conv-ReLU-max-pool layer of lenet5 and vgg_small (its shapes, without vgg's batch norm) at
     batch 64, 128, 256: forward (the fused kernel) and backward (backward-data, backward-weight and the
     bias gradient, with the pool/ReLU gradient gathered in their prologues), against eager and compile;
  2. the whole training step (forward, backward, Adam) of lenet5 and vgg_small: graphconv as one CUDA
     graph against eager, eager captured in a CUDA graph, and torch.compile;
  3. achieved bandwidth of the memory-bound kernels against a device-to-device copy, and achieved
     FLOP/s of the convolutions against the FP32 peak.
Targets (printed, never asserted): fused layers >= 1.3x geomean over eager and >= 1.15x over compile,
none below 0.95x; LeNet-5's step at batch 256 >= 3x eager; memory-bound kernels >= 80% of the copy.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from datetime import date

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import graphconv as gc  # noqa: E402
from graphconv.data import random_inputs  # noqa: E402
from graphconv.models import MODELS  # noqa: E402
from graphconv.pipeline import build  # noqa: E402

# (model, layer, in channels, out channels, size, kernel, padding) of each conv-ReLU-max-pool layer
LAYERS = [("lenet5", "conv1", 1, 20, 28, 5, 2), ("lenet5", "conv2", 20, 50, 14, 5, 2),
          ("vgg_small", "conv1_2", 32, 32, 32, 3, 1), ("vgg_small", "conv2_2", 64, 64, 16, 3, 1),
          ("vgg_small", "conv3_2", 128, 128, 8, 3, 1)]
FP32_PEAK = {"H100 80GB HBM3": 66.9e12, "H100 PCIe": 51.2e12, "H200": 66.9e12, "H100": 66.9e12}


class Timer:
    """Median milliseconds of fn over `repeats` after `warmup` calls: CUDA events on the GPU."""

    def __init__(self, backend, repeats, warmup=5):
        self.backend, self.repeats, self.warmup = backend, repeats, warmup
        if backend == "cuda":
            import cupy
            self.cp = cupy

    def __call__(self, fn):
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.backend == "cuda":
                start, end = self.cp.cuda.Event(), self.cp.cuda.Event()
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(self.cp.cuda.get_elapsed_time(start, end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


def layer_graph(c_in, c_out, size, k, pad, input_grad):
    """conv -> relu -> 2x2 max pool (+ a classifier so it trains); `input_grad`: a 1x1 conv before it,
    so the layer's backward includes backward-data as it does inside a network."""
    g = gc.Graph("layer")
    x = g.input("x", ("N", c_in, size, size))
    if input_grad:
        x = g.conv2d(x, c_in, 1, name="pre")
    h = g.max_pool2d(g.relu(g.conv2d(x, c_out, k, padding=pad, name="conv")), 2)
    g.output(g.linear(g.flatten(h), 10, name="fc"))
    return g


def graphconv_layer(args, c_in, c_out, size, k, pad, batch, input_grad, timer):
    graph = build(layer_graph(c_in, c_out, size, k, pad, input_grad), "fused-train")
    program = gc.compile(graph, backend=args.backend)
    step = program.bind(batch)
    step(random_inputs(graph, batch, 0), gc.init_params(graph, seed=0))        # real codes, real gradients
    layer_of = {launch.node: graph.node(launch.node) for launch in program.program.launches}
    picked = {"forward": [], "backward": []}
    for launch, bound in zip(program.program.launches, step.launches):
        node = layer_of[launch.node]
        if node.stage == "update":          # the optimizer's kernels are not the layer's
            continue
        if node.layer == "conv" or (node.op == "fused_conv" and any(r[0] == "conv" for r in node.replaces)):
            picked["forward" if node.stage == "forward" else "backward"].append((launch.spec, bound))
    runtime = program.runtime
    out = {}
    for phase, launches in picked.items():
        def run(launches=launches):
            for _, (kernel, grid, block, kargs) in launches:
                runtime.launch(kernel, grid, block, kargs)
        out[phase] = {"ms": timer(run), "kernels": [spec.name for spec, _ in launches]}
    return out


def torch_layer(c_in, c_out, size, k, pad, batch, input_grad, timer, compiled):
    import torch
    module = torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, k, padding=pad), torch.nn.ReLU(),
                                 torch.nn.MaxPool2d(2)).cuda()
    x = torch.randn(batch, c_in, size, size, device="cuda", requires_grad=input_grad)
    fn = torch.compile(module) if compiled else module
    y = fn(x)
    dy = torch.randn_like(y)
    wanted = ([x] if input_grad else []) + list(module.parameters())

    def forward():
        with torch.no_grad():
            fn(x)

    def backward():
        torch.autograd.grad(fn(x), wanted, dy)
    fwd = timer(forward)
    both = timer(backward)
    return {"forward": {"ms": fwd}, "backward": {"ms": max(both - fwd, 1e-6)}}


def torch_model(name):
    import torch
    nn = torch.nn
    if name == "lenet5":
        return nn.Sequential(nn.Conv2d(1, 20, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5, padding=2),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2450, 500), nn.ReLU(),
                             nn.Linear(500, 10)), (1, 28, 28)
    layers, c = [], 3
    for width in (32, 64, 128):
        for _ in range(2):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            c = width
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 16, 256), nn.ReLU(), nn.Linear(256, 10)), (3, 32, 32)


def training_steps(args, name, batch, timer, with_torch):
    graph = build(MODELS[name](), "fused-train")
    program = gc.compile(graph, backend=args.backend)
    step = program.bind(batch)
    inputs, params = random_inputs(graph, batch, 0), gc.init_params(graph, seed=0)
    step(inputs, params)
    result = {"graphconv_graph_ms": timer(step.replay), "launches": len(step.launches)}
    if not with_torch:
        return result
    import torch
    for mode in ("eager", "eager_cuda_graph", "compile"):
        model, shape = torch_model(name)
        model = model.cuda()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=mode == "eager_cuda_graph")
        x = torch.randn(batch, *shape, device="cuda")
        y = torch.randint(0, 10, (batch,), device="cuda")
        fwd = torch.compile(model) if mode == "compile" else model

        def train_step():
            opt.zero_grad(set_to_none=False)
            torch.nn.functional.cross_entropy(fwd(x), y).backward()
            opt.step()
        if mode == "eager_cuda_graph":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    train_step()
            torch.cuda.current_stream().wait_stream(side)
            graph_ = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph_):
                train_step()
            result[f"torch_{mode}_ms"] = timer(graph_.replay)
        else:
            result[f"torch_{mode}_ms"] = timer(train_step)
    return result


def bandwidth(args, timer):
    """Device-to-device copy bandwidth, and each memory-bound kernel of LeNet-5's step at batch 256
    as a fraction of it (bytes: every array argument read or written once)."""
    import cupy as cp
    n = 1 << 28
    a, b = cp.ones(n // 4, cp.float32), cp.empty(n // 4, cp.float32)
    copy_gbs = 2 * n / timer(lambda: cp.copyto(b, a)) / 1e6
    graph = build(MODELS["lenet5"](), "fused-train")
    program = gc.compile(graph, backend="cuda")
    step = program.bind(256)
    step(random_inputs(graph, 256, 0), gc.init_params(graph, seed=0))
    rows = []
    for launch, (kernel, grid, block, kargs) in zip(program.program.launches, step.launches):
        if launch.spec.template not in ("pointwise.cu.j2", "pool.cu.j2", "pool_backward.cu.j2", "channel_partial.cu.j2"):
            continue
        nbytes = sum(int(x.nbytes) for x in kargs if hasattr(x, "nbytes") and x.size > 1)
        if nbytes < (1 << 20):
            continue
        ms = timer(lambda: program.runtime.launch(kernel, grid, block, kargs))
        rows.append({"kernel": launch.spec.name, "MB": nbytes / 1e6, "GB_s": nbytes / ms / 1e6,
                     "of_copy": nbytes / ms / 1e6 / copy_gbs})
    return {"copy_GB_s": copy_gbs, "kernels": rows}


def device_info(backend):
    info = {"date": date.today().isoformat(), "backend": backend}
    if backend == "cuda":
        import cupy as cp
        props = cp.cuda.runtime.getDeviceProperties(0)
        info.update(device=props["name"].decode(), driver=cp.cuda.runtime.driverGetVersion(),
                    runtime=cp.cuda.runtime.runtimeGetVersion(), cupy=cp.__version__)
        try:
            import torch
            info.update(torch=torch.__version__, cudnn=torch.backends.cudnn.version())
        except ImportError:
            pass
    from codegen import nvrtc
    info["nvrtc"] = ".".join(map(str, nvrtc.version()))
    return info


def ratio_text(ours, theirs):
    return f"{theirs / ours:.2f}x" if ours and theirs else "-"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--smoke", action="store_true", help="host backend, batch 4, no PyTorch: the plumbing only")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()
    args.backend = "host" if args.smoke else "cuda"
    with_torch = not args.smoke
    if with_torch:
        import torch
        torch.backends.cudnn.allow_tf32 = False          # FP32 against FP32 (PyTorch's default is TF32 convs)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    timer = Timer(args.backend, 3 if args.smoke else args.repeats, 1 if args.smoke else 10)
    result = {"device": device_info(args.backend), "precision": "fp32 (tf32 off on both sides)", "layers": [],
              "steps": []}
    speedups = {"eager": [], "compile": []}
    lines = ["| layer | batch | phase | graphconv ms | eager ms | compile ms | vs eager | vs compile | TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, layer, c_in, c_out, size, k, pad in LAYERS:
        for batch in ((4,) if args.smoke else (64, 128, 256)):
            input_grad = layer != "conv1"
            ours = graphconv_layer(args, c_in, c_out, size, k, pad, batch, input_grad, timer)
            eager = torch_layer(c_in, c_out, size, k, pad, batch, input_grad, timer, False) if with_torch else {}
            comp = torch_layer(c_in, c_out, size, k, pad, batch, input_grad, timer, True) if with_torch else {}
            flops = 2 * batch * c_out * size * size * c_in * k * k
            for phase in ("forward", "backward"):
                ms = ours[phase]["ms"]
                e, c = eager.get(phase, {}).get("ms"), comp.get(phase, {}).get("ms")
                if e:
                    speedups["eager"].append(e / ms)
                    speedups["compile"].append(c / ms)
                work = flops * (1 if phase == "forward" else 1 + input_grad)
                row = {"model": model, "layer": layer, "batch": batch, "phase": phase, "graphconv_ms": ms,
                       "eager_ms": e, "compile_ms": c, "tflops": work / ms / 1e9, "kernels": ours[phase]["kernels"]}
                result["layers"].append(row)
                lines.append(f"| {model} {layer} | {batch} | {phase} | {ms:.4f} | {e or 0:.4f} | {c or 0:.4f} | "
                             f"{ratio_text(ms, e)} | {ratio_text(ms, c)} | {row['tflops']:.2f} |")
    for name in ("lenet5", "vgg_small"):
        for batch in ((4,) if args.smoke else (64, 256)):
            row = {"model": name, "batch": batch, **training_steps(args, name, batch, timer, with_torch)}
            result["steps"].append(row)
    print("\n".join(lines))
    for row in result["steps"]:
        others = {k: v for k, v in row.items() if k.startswith("torch_")}
        text = ", ".join(f"{k[6:-3]} {v:.3f} ms ({v / row['graphconv_graph_ms']:.2f}x)" for k, v in others.items())
        print(f"training step {row['model']} batch {row['batch']}: graphconv (one graph, {row['launches']} kernels) "
              f"{row['graphconv_graph_ms']:.3f} ms" + (f"; {text}" if text else ""))
    if speedups["eager"]:
        geo = {k: math.exp(statistics.mean(math.log(v) for v in vals)) for k, vals in speedups.items()}
        worst = min(speedups["eager"] + speedups["compile"])
        result["targets"] = {"geomean_vs_eager": geo["eager"], "geomean_vs_compile": geo["compile"], "worst": worst}
        print(f"fused layers: geomean {geo['eager']:.2f}x over eager (target 1.3x), {geo['compile']:.2f}x over "
              f"torch.compile (target 1.15x), worst {worst:.2f}x (target >= 0.95x)")
        lenet = [r for r in result["steps"] if r["model"] == "lenet5" and r["batch"] == 256]
        if lenet and "torch_eager_ms" in lenet[0]:
            r = lenet[0]["torch_eager_ms"] / lenet[0]["graphconv_graph_ms"]
            print(f"LeNet-5 training step at batch 256: {r:.2f}x eager (target 3x)")
        result["bandwidth"] = bandwidth(args, timer)
        bw = result["bandwidth"]
        print(f"device-to-device copy: {bw['copy_GB_s']:.0f} GB/s")
        for row in bw["kernels"]:
            print(f"  {row['kernel']}: {row['GB_s']:.0f} GB/s = {row['of_copy'] * 100:.0f}% of the copy (target 80%)")
        peak = next((v for k, v in FP32_PEAK.items() if k in result["device"].get("device", "")), None)
        if peak:
            best = max(r["tflops"] for r in result["layers"]) * 1e12
            print(f"best convolution layer: {best / 1e12:.1f} TFLOP/s = {best / peak * 100:.0f}% of the FP32 peak")
    if args.save:
        device = result["device"].get("device", "host").replace(" ", "-")
        base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"gpu-{device}")
        with open(base + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(f"# GPU benchmark, {result['device']}\n\n" + "\n".join(lines) + "\n")
        print("saved", base + ".json", base + ".md")


if __name__ == "__main__":
    main()
