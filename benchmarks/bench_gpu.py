"""The GPU benchmark: graphconv's kernels against PyTorch eager (cuDNN) and torch.compile on the same
device in one run, with warm-up, CUDA events and medians, at pinned precision (FP32 on both sides:
torch.backends.cudnn.allow_tf32 = False and torch.backends.cuda.matmul.allow_tf32 = False).

    python benchmarks/bench_gpu.py [--save] [--repeats 50]          # on a GPU machine, from the source tree
    python benchmarks/bench_gpu.py --smoke                         # the plumbing on the host backend, no GPU
    python benchmarks/bench_gpu.py --save --out $OUT --budget-s 240  # a lease: torch.compile rows last, in budget

torch.compile rows are measured in a second pass after every graphconv/eager row (batch 256 first),
and skipped once `--budget-s` seconds have passed (each compile takes seconds); the JSON is rewritten after each part, so
a run cut short keeps what it measured.

With --tf32: graphconv's TF32 tensor-core kernels against PyTorch with TF32 allowed.
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
TF32_PEAK = {"H100 80GB HBM3": 494.7e12, "H100 PCIe": 378e12, "H200": 494.7e12, "H100": 494.7e12}   # dense, datasheet


class Timer:
    """Median milliseconds of one call of fn: `repeats` samples after `warmup` calls, each sample `inner`
    back-to-back calls between two CUDA events (so event overhead does not swamp microsecond kernels)."""

    def __init__(self, backend, repeats, warmup=5, inner=10):
        self.backend, self.repeats, self.warmup, self.inner = backend, repeats, warmup, inner
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
                for _ in range(self.inner):
                    fn()
                end.record()
                end.synchronize()
                times.append(self.cp.cuda.get_elapsed_time(start, end) / self.inner)
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def replayed(self, replay, calls):
        """Median milliseconds of one of the `calls` calls that one `replay` of a captured graph makes:
        the device's own time, one kernel after the other, without Python's launch overhead in between
        (CuPy takes a few microseconds per launch, more than a kernel moving a few MB needs)."""
        inner, self.inner = self.inner, 1
        try:
            return self(replay) / calls
        finally:
            self.inner = inner


def captured(backend, fn, calls):
    """`calls` calls of fn (which issues its work on the current stream) as one CUDA graph, replayed
    ordered with the default stream both ways as CudaRuntime.capture's replays are; on the host
    backend, the calls in a loop."""
    if backend != "cuda":
        return lambda: [fn() for _ in range(calls)]
    import cupy as cp
    fn()                          # outside the capture: whatever fn compiles or allocates the first time
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        for _ in range(calls):
            fn()
        graph = stream.end_capture()

    def replay():
        stream.wait_event(cp.cuda.Stream.null.record())
        graph.launch(stream)
        cp.cuda.Stream.null.wait_event(stream.record())
    return replay


def kernel_ms(program, launch, timer, calls=20):
    """One bound launch (kernel, grid, block, arguments) alone: `calls` of it captured as one graph by the
    program's runtime and replayed (on the host backend: launched in a loop)."""
    return timer.replayed(program.runtime.capture([launch] * calls), calls)


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


def bound_step(graph, backend, batch, tf32=False):
    """(program, step): `graph` compiled, bound to `batch` and run once on random data, so every
    buffer holds real values (argmax codes, gradients) before anything is timed."""
    program = gc.compile(graph, backend=backend, tf32=tf32)
    step = program.bind(batch)
    step(random_inputs(graph, batch, 0), gc.init_params(graph, seed=0))
    return program, step


def layer_phase(graph, launch):
    """"forward" or "backward" for a launch of the timed layer ("conv"; the optimizer's kernels, the
    1x1 conv before it and the classifier after it are not the layer's), else None."""
    node = graph.node(launch.node)
    if node.stage == "update":
        return None
    if node.layer == "conv" or (node.op == "fused_conv" and any(r[0] == "conv" for r in node.replaces)):
        return "forward" if node.stage == "forward" else "backward"
    return None


def graphconv_layer(args, c_in, c_out, size, k, pad, batch, input_grad, timer):
    return layer_ms(args, build(layer_graph(c_in, c_out, size, k, pad, input_grad), "fused-train"), batch, timer)


def layer_ms(args, graph, batch, timer):
    """The forward and backward launches of `graph`'s layer "conv", each phase timed as a whole."""
    program, step = bound_step(graph, args.backend, batch, args.tf32)
    picked = {"forward": [], "backward": []}
    for launch, bound in zip(program.program.launches, step.launches):
        phase = layer_phase(graph, launch)
        if phase:
            picked[phase].append((launch.spec, bound))
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
                                 torch.nn.MaxPool2d(2))
    return torch_module_ms(module, (batch, c_in, size, size), input_grad, timer, compiled)


def torch_module_ms(module, shape, input_grad, timer, compiled):
    """PyTorch's forward and backward (gradients of the input where `input_grad`, and of the
    parameters) of `module` on a random input, the backward's time less the forward's."""
    import torch
    module = module.cuda()
    x = torch.randn(*shape, device="cuda", requires_grad=input_grad)
    if compiled:
        torch._dynamo.reset()       # a fresh compile per layer (else dynamo's recompile limit falls back to eager)
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


def graphconv_step(args, name, batch, timer):
    """The captured step alone (what is compared with PyTorch), and Trainer.step: the same graph plus
    what a user's training loop pays, a NumPy batch uploaded, the update checked finite and committed
    on the device (the state stays there), the loss and scores downloaded."""
    from graphconv.training import Optimizer, Trainer
    _, step = bound_step(build(MODELS[name](), "fused-train"), args.backend, batch, args.tf32)
    out = {"graphconv_graph_ms": timer(step.replay), "launches": len(step.launches)}
    trainer = Trainer(MODELS[name](), Optimizer("adam", lr=1e-4), backend=args.backend, tf32=args.tf32)
    inputs = random_inputs(trainer.with_loss, batch, 0)
    x, y = inputs[trainer.input_name], inputs["y"]
    out["graphconv_trainer_ms"] = timer(lambda: trainer.step(x, y))
    return out


def torch_steps(name, batch, timer, modes):
    import torch
    result = {}
    for mode in modes:
        model, shape = torch_model(name)
        model = model.cuda()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=mode == "eager_cuda_graph")
        x = torch.randn(batch, *shape, device="cuda")
        y = torch.randint(0, 10, (batch,), device="cuda")
        if mode == "compile":
            torch._dynamo.reset()
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


# the templates of memory-bound kernels: a few operations per element moved
MEMORY_BOUND = ("pointwise.cu.j2", "pool.cu.j2", "pool_backward.cu.j2", "channel_partial.cu.j2",
                "column_partial.cu.j2", "splitk_reduce.cu.j2")


def moved_bytes(spec, kargs) -> int:
    """Bytes a memory-bound kernel moves: each array argument read or written once, but a pointwise
    kernel's operands its expression ignores (a gradient rule that needs only one operand) are not read
    (a multi-tensor kernel's are `a0_<tensor>`, ...: all read)."""
    loaded = {load["expr"].split("[")[0] for load in spec.params.get("loads", [])} \
        if spec.template == "pointwise.cu.j2" else None
    segmented = bool(spec.params.get("segments"))
    return sum(int(x.nbytes) for arg, x in zip(spec.args, kargs)
               if hasattr(x, "nbytes") and x.size > 1
               and (loaded is None or not arg.ctype.startswith("const") or arg.name in loaded or segmented))


def copy_ms(args, timer, nbytes):
    """A device-to-device copy moving `nbytes` in all (nbytes / 2 read, nbytes / 2 written), timed as the
    kernels are: `inner` copies replayed from one captured graph."""
    n = max(1, nbytes // 8)
    if args.backend == "cuda":
        import cupy as cp
        a, b = cp.ones(n, cp.float32), cp.empty(n, cp.float32)
        copy = lambda: cp.copyto(b, a)    # noqa: E731
    else:
        a, b = np.ones(n, np.float32), np.empty(n, np.float32)
        copy = lambda: np.copyto(b, a)    # noqa: E731
    return timer.replayed(captured(args.backend, copy, 20), 20)


def bandwidth(args, timer):
    """Device-to-device copy bandwidth (256 MiB), and each memory-bound kernel of LeNet-5's and
    vgg_small's steps at batch 256 that moves at least 1 MB, alone, replayed from a captured graph
    (bytes: every array argument read or written once), against both that copy and a copy of the same
    number of bytes timed the same way: the floor at that size, launch and tail included."""
    big = 1 << (22 if args.smoke else 28)
    copy_gbs = big / copy_ms(args, timer, big) / 1e6
    batch, least = (4, 1) if args.smoke else (256, 1 << 20)
    rows = []
    for name in ("lenet5", "vgg_small"):
        program, step = bound_step(build(MODELS[name](), "fused-train"), args.backend, batch)
        seen = set()
        for launch, bound in zip(program.program.launches, step.launches):
            kargs = bound[3]
            if launch.spec.template not in MEMORY_BOUND or launch.spec.name in seen:
                continue
            seen.add(launch.spec.name)
            nbytes = moved_bytes(launch.spec, kargs)
            if nbytes < least:
                continue
            ms = kernel_ms(program, bound, timer)
            same = nbytes / copy_ms(args, timer, nbytes) / 1e6
            rows.append({"model": name, "kernel": launch.spec.name, "MB": nbytes / 1e6, "GB_s": nbytes / ms / 1e6,
                         "of_copy": nbytes / ms / 1e6 / copy_gbs, "copy_same_GB_s": same,
                         "of_same_copy": nbytes / ms / 1e6 / same})
    return {"copy_GB_s": copy_gbs, "kernels": rows}


def profile(args, name, batch, repeats=20):
    """Each kernel of a model's bound training step, timed alone (20 launches of it replayed from one
    captured graph, median of `repeats`): where the step's time goes. Their sum is comparable with the
    captured step's time (each was timed by an earlier version as 5 Python launches between two
    events, which inflated every kernel of a few microseconds to CuPy's launch time)."""
    graph = build(MODELS[name](), "fused-train")
    program, step = bound_step(graph, args.backend, batch, args.tf32)
    timer = Timer(args.backend, repeats, 3, 5)
    rows = []
    for launch, bound in zip(program.program.launches, step.launches):
        kernel, grid, block, kargs = bound
        ms = kernel_ms(program, bound, timer)
        node = graph.node(launch.node)
        rows.append({"kernel": launch.spec.name, "template": launch.spec.template, "node": launch.node,
                     "layer": node.layer, "stage": node.stage,
                     "ms": ms, "grid": [int(g) for g in grid], "block": [int(b) for b in block],
                     "registers": getattr(kernel, "registers", None)})     # of the cubin timed (cuda)
    return sorted(rows, key=lambda r: -r["ms"])


# (layer, channels, size, stride) of MobileNet-v1-like 3 x 3 depthwise layers (padding 1), timed by
# --depthwise: no bundled model has one
DEPTHWISE = [("dw 112x112x32", 32, 112, 1), ("dw 56x56x128", 128, 56, 1), ("dw 56x56x128 s2", 128, 56, 2),
             ("dw 14x14x512", 512, 14, 1), ("dw 7x7x1024", 1024, 7, 1)]


def depthwise_graph(c, size, stride):
    """1x1 conv (so the layer's backward includes its input gradient) -> the depthwise conv "conv" ->
    ReLU -> global average pool -> classifier."""
    g = gc.Graph("layer")
    h = g.conv2d(g.input("x", ("N", c, size, size)), c, 1, name="pre")
    h = g.relu(g.conv2d(h, c, 3, stride=stride, padding=1, groups=c, name="conv"))
    g.output(g.linear(g.flatten(g.global_avg_pool(h)), 10, name="fc"))
    return g


def depthwise(args, timer, say, attempt, with_torch):
    """Each DEPTHWISE layer at batch 64 and 256, forward and backward: the depthwise kernels (session
    10), the implicit GEMM they replaced (depthwise.ENABLED = False), the backward with the weight
    gradient's one-buffer kernel (depthwise.WGRAD_BUFFERS = 1, before session 11) and PyTorch eager
    (cuDNN)."""
    rows = []
    for layer, c, size, stride in DEPTHWISE:
        for batch in (4,) if args.smoke else (64, 256):
            graph = build(depthwise_graph(c, size, stride), "fused-train")
            ours = attempt(f"depthwise {layer} {batch}", lambda: layer_ms(args, graph, batch, timer), {})
            gemm = attempt(f"depthwise {layer} {batch} as the GEMM", lambda: under(
                {"depthwise.ENABLED": False}, lambda: layer_ms(args, graph, batch, timer)), {})
            one = attempt(f"depthwise {layer} {batch}, one buffer", lambda: under(
                {"depthwise.WGRAD_BUFFERS": 1}, lambda: layer_ms(args, graph, batch, timer)), {})
            eager = attempt(f"eager depthwise {layer} {batch}", lambda: torch_depthwise(c, size, stride, batch, timer),
                            {}) if with_torch else {}
            out = -(-size // stride)
            for phase in ("forward", "backward"):
                # forward: x read, y written; backward: dy read (twice: dx and dw), x read, dx written
                planes = size * size + out * out if phase == "forward" else 2 * (size * size + out * out)
                moved = 4 * batch * c * planes
                row = {"layer": layer, "batch": batch, "phase": phase, "MB": moved / 1e6,
                       "graphconv_ms": ours.get(phase, {}).get("ms"), "gemm_ms": gemm.get(phase, {}).get("ms"),
                       "one_buffer_ms": one.get(phase, {}).get("ms") if phase == "backward" else None,
                       "eager_ms": eager.get(phase, {}).get("ms"), "kernels": ours.get(phase, {}).get("kernels")}
                rows.append(row)
                one_text = f", one buffer {ms_text(row['one_buffer_ms'])}" if phase == "backward" else ""
                say(f"{layer} batch {batch} {phase}: {ms_text(row['graphconv_ms'])} ms (the GEMM "
                    f"{ms_text(row['gemm_ms'])}{one_text}, eager {ms_text(row['eager_ms'])}; "
                    f"{ratio_text(row['graphconv_ms'], row['eager_ms'])} eager, "
                    f"{moved / 1e6 / (row['graphconv_ms'] or float('inf')):.0f} GB/s of its least bytes)")
    return rows


def torch_depthwise(c, size, stride, batch, timer):
    import torch
    return torch_module_ms(torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, stride, 1, groups=c), torch.nn.ReLU()),
                           (batch, c, size, size), True, timer, False)


# earlier rules of the GEMM lowering, each timed against the current one by --variants
VARIANTS = {# opt-in (session 7, never timed): 3 x 3 convolutions by Winograd F(2x2, 3x3), first so that a
            # short lease times it on the worst layer before anything else
            "Winograd F(2x2, 3x3) for 3 x 3 convolutions": {"direct.WINOGRAD": True},
            "Winograd, 64 cells a block": {"direct.WINOGRAD": True, "winograd.CELLS_PER_BLOCK": 64},
            "Winograd, direct for gathered inputs": {"direct.WINOGRAD": True, "winograd.GATHERED": False},
            # session 14 (never timed): a reduction's chunks added by the last block to arrive, in the
            # same kernel, against a finish kernel of its own (one launch more per reduction)
            "reductions: a finish kernel of their own": {"reduce.LAST_BLOCK_FINISHES": False},
            "split-K chunks >= 2048 terms": {"SPLIT_BLOCKS": 0, "SPLIT_LEAST": 2048},
            "no register prefetch": {"PREFETCH": False},
            "GEMM: one shared buffer per operand": {"DOUBLE_BUFFER": False},
            "implicit GEMM, no direct conv": {"DIRECT": False},
            "k digits divided out per slot": {"HOIST": False},
            "scalar shared loads": {"VECTOR": False},
            "4 x 4 tiles for split GEMMs": {"WIDE": False},
            "GEMM rules of session 2": {"HOIST": False, "VECTOR": False, "WIDE": False},
            "direct: staging in one rolled loop": {"direct.STAGE_LOADS": 0, "direct.PIPELINE": False},
            "8 x 8 planes as the GEMM": {"GEMM_PLANE_MOST": 64},
            "direct: one buffer, staged through registers": {"direct.PIPELINE": False},
            "direct: one block per image of a small plane": {"direct.SPLIT_SMALL_PLANES": False},
            "direct rules of session 3": {"direct.PIPELINE": False, "direct.SPLIT_SMALL_PLANES": False,
                                          "GEMM_PLANE_MOST": 64},
            "weight gradients as the im2col GEMM": {"direct_wgrad.ENABLED": False},
            "direct weight gradients: half the blocks": {"direct_wgrad.THREADS_PER_SM": 256},
            "direct weight gradients: double-buffered tiles": {"direct_wgrad.PIPELINE": True},
            # TF32 only (--tf32; the FP32 rows' kernels do not change): the session-6 direct kernels on the
            # tensor cores against the FP32 direct kernels they replace, and against one buffer
            "TF32: direct convolutions on the FP32 cores": {"direct.TF32": False},
            "TF32 direct: one buffer": {"direct_tf32.PIPELINE": False},
            "TF32: weight gradients on the FP32 cores": {"direct_wgrad.TF32": False}}


def rule_place(name):
    """(module, attribute) of a VARIANTS rule: "direct.X" is the direct family's X, "direct_wgrad.X" the
    direct weight gradient's, "direct_tf32.X" the TF32 direct convolution's, "winograd.X" the Winograd
    convolution's, "reduce.X" the reductions', a bare name the GEMM's."""
    from codegen.lowering import depthwise, direct, direct_tf32, direct_wgrad, gemm, reduce, winograd
    module, _, attribute = name.rpartition(".")
    return ({"direct": direct, "direct_wgrad": direct_wgrad, "direct_tf32": direct_tf32, "winograd": winograd,
             "depthwise": depthwise, "reduce": reduce, "": gemm}[module], attribute)


def layer_sources(args, c_in, c_out, size, k, pad, input_grad) -> frozenset:
    """The timed layer's kernels (source and launch shape) under the rules as they are set now (no
    compile): a rule that changes only the classifier's or the 1x1 conv's kernels changes no row."""
    from codegen.program import Program
    graph = build(layer_graph(c_in, c_out, size, k, pad, input_grad), "fused-train")
    return kernel_set(launch.spec for launch in Program(graph, tf32=args.tf32).launches if layer_phase(graph, launch))


def kernel_set(specs) -> frozenset:
    """Kernels as compared by the variants runs: source and launch shape."""
    return frozenset((spec.source, str(spec.grid), str(spec.block)) for spec in specs)


def under(rule, fn):
    """fn() with the VARIANTS rule's settings in place, restored after."""
    saved = {name: getattr(*rule_place(name)) for name in rule}
    try:
        for name, value in rule.items():
            setattr(*rule_place(name), value)
        return fn()
    finally:
        for name, value in saved.items():
            setattr(*rule_place(name), value)


def variants(args, timer, say):
    """The layers at batch 64 and 256 under each rule of VARIANTS and under the current rules. A rule
    that leaves a layer's kernels as they are now (the 8 x 8 rule on a 28 x 28 layer) is not timed again:
    its row repeats now's (a lease's minutes go to the rows that differ)."""
    rows = []
    timer = Timer(args.backend, min(timer.repeats, 20), timer.warmup, timer.inner)   # ~100 builds: 20 samples each
    # the worst layer first, then the steps' biggest: a lease that ends early keeps the rows that decide most
    first = ("conv3_2", "conv2", "conv2_2", "conv1_2", "conv1")
    for model, layer, c_in, c_out, size, k, pad in sorted(LAYERS, key=lambda l: first.index(l[1]) if l[1] in first
                                                          else len(first)):
        input_grad = layer != "conv1"
        shape = (c_in, c_out, size, k, pad, input_grad)
        now_sources = layer_sources(args, *shape)
        same = {label for label, rule in VARIANTS.items()
                if under(rule, lambda: layer_sources(args, *shape)) == now_sources}
        for batch in (64, 256):
            row = {"layer": layer, "batch": batch, "same_as_now": sorted(same)}
            row["now"] = {phase: value["ms"] for phase, value in
                          graphconv_layer(args, c_in, c_out, size, k, pad, batch, input_grad, timer).items()}
            for label, rule in VARIANTS.items():
                row[label] = dict(row["now"]) if label in same else {
                    phase: value["ms"] for phase, value in
                    under(rule, lambda: graphconv_layer(args, c_in, c_out, size, k, pad, batch, input_grad, timer)).items()}
            rows.append(row)
            now = row["now"]
            say(f"variants {layer} batch {batch}: now forward {now['forward']:.4f} backward {now['backward']:.4f} ms; "
                + "; ".join(f"{label}: " + ("same kernels" if label in same else
                                            f"{row[label]['forward']:.4f} / {row[label]['backward']:.4f}")
                            for label in VARIANTS))
    return rows


# rules timed on whole training steps too: the layer rows' weight gradients are all gathered through
# the ReLU/pool, while vgg_small's (batch norm between conv and ReLU) read a plain dy, which only
# those rows exercise (the double-buffered tiles need a plain g); the GEMM's shared buffers change
# only the classifiers' kernels (fc1 of LeNet-5: forward, backward-data, backward-weight)
STEP_RULES = ("Winograd F(2x2, 3x3) for 3 x 3 convolutions", "reductions: a finish kernel of their own",
              "weight gradients as the im2col GEMM",
              "direct weight gradients: half the blocks", "direct weight gradients: double-buffered tiles",
              "GEMM: one shared buffer per operand")
# and with --tf32: the session-6 tensor-core kernels against the FP32 ones (vgg_small's plain-dy weight
# gradients are the only TF32 ones: the layer rows' are gathered through the ReLU/pool)
TF32_STEP_RULES = ("TF32: weight gradients on the FP32 cores", "TF32: direct convolutions on the FP32 cores")


def step_sources(args, name) -> frozenset:
    from codegen.program import Program
    return kernel_set(Program(build(MODELS[name](), "fused-train"), tf32=args.tf32).kernels)


def step_variants(args, timer, say, batch=256, attempt=None, in_budget=lambda what: True):
    """vgg_small's and LeNet-5's captured steps at batch 256 now and under each STEP_RULES rule (and
    TF32_STEP_RULES with --tf32) that changes their kernels; each build is its own `attempt` within the
    budget (a rule that fails, or a kernel that faults, leaves the rows before it), the double-buffered
    tiles (never run on a GPU) last."""
    attempt = attempt or (lambda what, fn, default=None: fn())
    rules = STEP_RULES + (TF32_STEP_RULES if args.tf32 else ())
    rows = []
    timer = Timer(args.backend, min(timer.repeats, 20), timer.warmup, timer.inner)

    def step_ms():
        _, step = bound_step(build(MODELS[name](), "fused-train"), args.backend, batch, args.tf32)
        return timer(step.replay)
    for name in ("vgg_small", "lenet5"):
        if not in_budget(f"step variants {name}"):
            continue
        now_sources = step_sources(args, name)
        row = {"model": name, "batch": batch, "now": attempt(f"step {name} now", step_ms, "failed")}
        rows.append(row)
        for label in rules:
            changed = under(VARIANTS[label], lambda: step_sources(args, name)) != now_sources
            if not changed:
                row[label] = "same kernels"
            elif in_budget(f"step {name} {label}"):
                row[label] = attempt(f"step {name} {label}", lambda: under(VARIANTS[label], step_ms), "failed")
            else:
                row[label] = "over budget"
        text = lambda v: v if isinstance(v, str) else f"{v:.3f}"   # noqa: E731
        say(f"step variants {name} batch {batch}: now {text(row['now'])} ms; "
            + "; ".join(f"{label}: {text(row[label])}" for label in rules))
    return rows


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


def ms_text(ms):
    return f"{ms:.4f}" if ms else "-"


def ratio_text(ours, theirs):
    return f"{theirs / ours:.2f}x" if ours and theirs else "-"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--smoke", action="store_true", help="host backend, batch 4, no PyTorch: the plumbing only")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/gpu-<device>.json and .md")
    ap.add_argument("--out", help="also write the JSON, the table and the log lines into this folder")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="skip the torch.compile rows that would start after this many seconds")
    ap.add_argument("--tf32", action="store_true", help="TF32 on both sides: compile(tf32=True), PyTorch allow_tf32")
    ap.add_argument("--profile", action="store_true", help="time each kernel of the lenet5 and vgg_small steps")
    ap.add_argument("--variants", action="store_true", help="each layer under the earlier rules that change its kernels (VARIANTS), "
                    "then vgg_small's and LeNet-5's steps under the Winograd and weight-gradient rules (STEP_RULES; with "
                         "--tf32 also TF32_STEP_RULES: the FP32 kernels the tensor-core ones replace)")
    ap.add_argument("--depthwise", action="store_true", help="time MobileNet-like depthwise layers (DEPTHWISE) "
                    "against the GEMM they used before session 10 and PyTorch eager")
    ap.add_argument("--no-main", action="store_true",
                    help="skip the layer, step, bandwidth and torch.compile rows (with --profile / --variants)")
    args = ap.parse_args()
    args.backend = "host" if args.smoke else "cuda"
    with_torch = not args.smoke
    started = time.time()
    if with_torch:
        import torch
        torch.backends.cudnn.allow_tf32 = args.tf32      # matched precision (PyTorch's default is TF32 convs)
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = True
    timer = Timer(args.backend, 3 if args.smoke else args.repeats, 1 if args.smoke else 10, 1 if args.smoke else 10)
    precision = "tf32 (tensor cores on both sides)" if args.tf32 else "fp32 (tf32 off on both sides)"
    result = {"device": device_info(args.backend), "precision": precision,
              "timing": f"median of {timer.repeats} samples of {timer.inner} back-to-back calls, CUDA events; "
                        "kernels alone (bandwidth, profile): 20 launches replayed from one captured graph",
              "layers": [], "steps": [], "errors": []}
    log = []

    def say(text):
        print(text, flush=True)
        log.append(text)

    def attempt(what, fn, default=None):
        """Run one measurement; a failure is recorded and reported, and the run goes on."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure and keeps measuring
            say(f"FAILED {what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            result["errors"].append({"what": what, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            return default

    def in_budget(what):
        if time.time() - started < args.budget_s:
            return True
        result["errors"].append({"what": what, "error": "skipped: over --budget-s"})
        return False

    batches = (4,) if args.smoke else (64, 128, 256)
    if args.no_main:
        batches, with_torch = (), False
    # pass 1: graphconv and eager, every layer and step
    for model, layer, c_in, c_out, size, k, pad in LAYERS:
        for batch in batches:
            input_grad = layer != "conv1"
            ours = attempt(f"graphconv {layer} batch {batch}",
                           lambda: graphconv_layer(args, c_in, c_out, size, k, pad, batch, input_grad, timer))
            eager = attempt(f"eager {layer} batch {batch}", lambda: torch_layer(
                c_in, c_out, size, k, pad, batch, input_grad, timer, False), {}) if with_torch else {}
            for phase in ("forward", "backward"):
                row = {"model": model, "layer": layer, "batch": batch, "phase": phase, "input_grad": input_grad,
                       "flops": 2 * batch * c_out * size * size * c_in * k * k * (1 if phase == "forward" else 1 + input_grad),
                       "graphconv_ms": ours[phase]["ms"] if ours else None,
                       "kernels": ours[phase]["kernels"] if ours else None,
                       "eager_ms": (eager or {}).get(phase, {}).get("ms"), "compile_ms": None}
                result["layers"].append(row)
            say(f"{model} {layer} batch {batch}: " + ", ".join(
                f"{r['phase']} {r['graphconv_ms'] or 0:.4f} ms (eager {r['eager_ms'] or 0:.4f})"
                for r in result["layers"][-2:]))
    steps = {"lenet5": (64, 256), "vgg_small": (64, 256)} if not args.smoke else {"lenet5": (4,), "vgg_small": (4,)}
    for name, sizes in steps.items() if not args.no_main else ():
        for batch in sizes:
            row = {"model": name, "batch": batch}
            row.update(attempt(f"graphconv step {name} {batch}", lambda: graphconv_step(args, name, batch, timer), {}))
            if with_torch:
                row.update(attempt(f"eager step {name} {batch}",
                                   lambda: torch_steps(name, batch, timer, ("eager", "eager_cuda_graph")), {}))
            result["steps"].append(row)
            say(f"step {name} batch {batch}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith("_ms")))
    if not args.no_main:
        result["bandwidth"] = attempt("bandwidth", lambda: bandwidth(args, timer), {"copy_GB_s": None, "kernels": []})
        write(args, result, log)
    if args.profile:
        for name in ("lenet5", "vgg_small"):
            rows = attempt(f"profile {name}", lambda: profile(args, name, 4 if args.smoke else 256), [])
            result.setdefault("profile", {})[name] = rows
            total = sum(r["ms"] for r in rows)
            say(f"kernels of the {name} step at batch {4 if args.smoke else 256}, each alone (sum {total:.3f} ms):")
            for r in rows[:12]:
                regs = f" {r['registers']} regs" if r.get("registers") else ""
                say(f"  {r['ms']:.4f} ms {r['ms'] / total * 100:4.1f}%  {r['kernel'][:72]}  grid {r['grid']} block {r['block'][0]}{regs}")
            by_template = {}
            for r in rows:
                by_template[r["template"]] = by_template.get(r["template"], 0.0) + r["ms"]
            say("  by template: " + ", ".join(f"{t.split('.')[0]} {ms:.3f} ms" for t, ms in
                                              sorted(by_template.items(), key=lambda kv: -kv[1])))
        write(args, result, log)
    if args.depthwise:
        result["depthwise"] = attempt("depthwise", lambda: depthwise(args, timer, say, attempt, not args.smoke), [])
        write(args, result, log)
    if args.variants:
        result["variants"] = attempt("variants", lambda: variants(args, timer, say), [])
        write(args, result, log)
        result["step_variants"] = attempt("step variants", lambda: step_variants(
            args, timer, say, batch=4 if args.smoke else 256, attempt=attempt, in_budget=in_budget), [])
        write(args, result, log)
    if with_torch:
        # pass 2: torch.compile, as far as the budget goes: every layer at batch 256 first (the targets'
        # rows), then 64, then 128, then the steps, LeNet-5's at 256 first
        for batch in sorted(batches, key=lambda b: (b != 256, b != 64, b)):
            for model, layer, c_in, c_out, size, k, pad in LAYERS:
                if not in_budget(f"compile {layer} {batch}"):
                    continue
                comp = attempt(f"compile {layer} batch {batch}", lambda: torch_layer(
                    c_in, c_out, size, k, pad, batch, layer != "conv1", timer, True), {})
                for row in result["layers"]:
                    if (row["layer"], row["batch"]) == (layer, batch):
                        row["compile_ms"] = comp.get(row["phase"], {}).get("ms")
        for row in sorted(result["steps"], key=lambda r: (r["batch"] != 256, r["model"] != "lenet5")):
            if in_budget(f"compile step {row['model']} {row['batch']}"):
                row.update(attempt(f"compile step {row['model']} {row['batch']}",
                                   lambda: torch_steps(row["model"], row["batch"], timer, ("compile",)), {}))
    report(args, result, say)
    write(args, result, log)


def report(args, result, say):
    lines = ["| layer | batch | phase | graphconv ms | eager ms | compile ms | vs eager | vs compile | TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    speedups = {"eager": [], "compile": []}
    for row in result["layers"]:
        ms, e, c = row["graphconv_ms"], row["eager_ms"], row["compile_ms"]
        row["tflops"] = row["flops"] / ms / 1e9 if ms else None
        if ms and e:
            speedups["eager"].append(e / ms)
        if ms and c:
            speedups["compile"].append(c / ms)
        lines.append(f"| {row['model']} {row['layer']} | {row['batch']} | {row['phase']} | {ms_text(ms)} | "
                     f"{ms_text(e)} | {ms_text(c)} | {ratio_text(ms, e)} | {ratio_text(ms, c)} | "
                     f"{row['tflops'] or 0:.2f} |")
    result["table"] = lines
    for line in lines:
        say(line)
    for row in result["steps"]:
        ours = row.get("graphconv_graph_ms")
        others = {k: v for k, v in row.items() if k.startswith("torch_")}
        text = ", ".join(f"{k[6:-3]} {v:.3f} ms ({v / ours:.2f}x)" for k, v in others.items() if ours)
        say(f"training step {row['model']} batch {row['batch']}: graphconv (one graph, {row.get('launches')} "
            f"kernels) {ours or 0:.3f} ms" + (f"; {text}" if text else ""))
        if row.get("graphconv_trainer_ms"):
            say(f"  Trainer.step (NumPy batch in, loss and scores out, state on the device): "
                f"{row['graphconv_trainer_ms']:.3f} ms")
    geo = {k: math.exp(statistics.mean(math.log(v) for v in vals)) for k, vals in speedups.items() if vals}
    every = speedups["eager"] + speedups["compile"]
    if every:
        worst = min(every)
        result["targets"] = {"geomean_vs_eager": geo.get("eager"), "geomean_vs_compile": geo.get("compile"),
                             "worst": worst}
        versus_compile = (f"{geo['compile']:.2f}x over torch.compile (target 1.15x; {len(speedups['compile'])} rows)"
                          if "compile" in geo else "torch.compile not measured")
        say(f"fused layers: geomean {geo.get('eager', 0):.2f}x over eager (target 1.3x), {versus_compile}, "
            f"worst {worst:.2f}x (target >= 0.95x)")
    lenet = [r for r in result["steps"] if r["model"] == "lenet5" and r["batch"] == 256]
    if lenet and lenet[0].get("torch_eager_ms") and lenet[0].get("graphconv_graph_ms"):
        r = lenet[0]["torch_eager_ms"] / lenet[0]["graphconv_graph_ms"]
        say(f"LeNet-5 training step at batch 256: {r:.2f}x eager (target 3x)")
    bw = result.get("bandwidth")
    if bw and bw.get("copy_GB_s"):
        say(f"device-to-device copy of 256 MiB: {bw['copy_GB_s']:.0f} GB/s; memory-bound kernels alone (replayed "
            f"from a graph) against it and against a copy of their own bytes (target 80%):")
        for row in bw["kernels"]:
            say(f"  {row['model']} {row['kernel'][:60]}: {row['MB']:.1f} MB, {row['GB_s']:.0f} GB/s = "
                f"{row['of_copy'] * 100:.0f}% of the copy, {row['of_same_copy'] * 100:.0f}% of a copy of "
                f"{row['MB']:.1f} MB ({row['copy_same_GB_s']:.0f} GB/s)")
        if bw["kernels"]:
            same = [r["of_same_copy"] for r in bw["kernels"]]
            big = [r for r in bw["kernels"] if r["MB"] >= 16]
            say(f"memory-bound kernels: {sum(v >= 0.8 for v in same)} of {len(same)} at >= 80% of a copy of their "
                f"bytes (median {statistics.median(same) * 100:.0f}%)" + (
                    f"; those of >= 16 MB: {sum(r['of_copy'] >= 0.8 for r in big)} of {len(big)} at >= 80% of "
                    f"the 256 MiB copy (median {statistics.median(r['of_copy'] for r in big) * 100:.0f}%)" if big else ""))
    peaks, kind = (TF32_PEAK, "TF32 tensor-core") if args.tf32 else (FP32_PEAK, "FP32")
    peak = next((v for k, v in peaks.items() if k in result["device"].get("device", "")), None)
    flops = [r["tflops"] for r in result["layers"] if r.get("tflops")]
    if peak and flops:
        say(f"best convolution layer: {max(flops):.1f} TFLOP/s = {max(flops) * 1e12 / peak * 100:.0f}% of the {kind} peak")
    for err in result["errors"]:
        say(f"not measured: {err['what']}: {err['error'].splitlines()[0]}")


def write(args, result, log):
    device = result["device"].get("device", "host").replace(" ", "-") + ("-tf32" if args.tf32 else "")
    folders = ([os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")] if args.save else []) + \
        ([args.out] if args.out else [])
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
        base = os.path.join(folder, f"gpu-{device}")
        with open(base + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(f"# GPU benchmark\n\n{json.dumps(result['device'])}\n\nprecision: {result['precision']}; "
                    f"timing: {result['timing']}\n\n```\n" + "\n".join(log) + "\n```\n")


if __name__ == "__main__":
    main()
