"""Compile time of LeNet-5's fused training step (forward, backward, Adam): graph -> loadable
kernels, cold (empty cache) and cached, for NVRTC cubins (sm_90) and the host backend's g++
libraries, against torch.compile's cold first training step of the same model on the CPU (which
includes its Inductor C++ build), as ratios.

    python benchmarks/bench_compile.py [--save]
"""
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, save  # noqa: E402


def graphconv_compile(target):
    """Seconds from the model to loadable kernels: build the stage, lower, render, compile; as a fresh
    process would (the printers' in-memory memos emptied first; the disk caches as the caller set)."""
    from codegen import cprinter
    from graphconv.ops import fused
    cprinter._c_expression.cache_clear()
    fused._expression_memo.cache_clear()
    from codegen import nvrtc
    from codegen.program import Program
    from codegen.runner import HostRuntime
    from graphconv.models import lenet5
    from graphconv.pipeline import build
    start = time.perf_counter()
    program = Program(build(lenet5(), "fused-train"))
    if target == "nvrtc":
        nvrtc.compile_many([(s.source, s.name) for s in program.kernels])
    else:
        HostRuntime().load(program.kernels)
    return time.perf_counter() - start, len(program.kernels)


def torch_compile_first_step():
    import torch
    import torch.nn as nn
    torch._dynamo.reset()
    net = nn.Sequential(nn.Conv2d(1, 20, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5, padding=2),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2450, 500), nn.ReLU(), nn.Linear(500, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    @torch.compile
    def step(x, y):
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    start = time.perf_counter()
    step(x, y)
    opt.step()
    return time.perf_counter() - start


def main():
    result = {"benchmark": "lenet5 fused training step: compile time", **machine()}
    for target in ("nvrtc", "host"):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["GRAPHCONV_CACHE"] = cache
            cold, count = graphconv_compile(target)
            cached, _ = graphconv_compile(target)
        result[f"{target}_cold_s"], result[f"{target}_cached_s"] = cold, cached
        print(f"graphconv -> {'sm_90 cubins (NVRTC)' if target == 'nvrtc' else 'host .so (g++)'}: {count} kernels, "
              f"cold {cold:.2f} s, cached {cached:.2f} s")
    os.environ.pop("GRAPHCONV_CACHE")
    try:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            theirs = torch_compile_first_step()
    except Exception as e:  # noqa: BLE001 - no torch, or no compiler for Inductor
        print(f"torch.compile not measured: {type(e).__name__}: {e}")
    else:
        result["torch_compile_cold_first_step_s"] = theirs
        print(f"torch.compile, cold first training step (CPU, Inductor): {theirs:.2f} s")
        for target in ("nvrtc", "host"):
            ratio = result[f"{target}_cold_s"] / theirs
            result[f"ratio_{target}_cold_over_torch_compile"] = ratio
            print(f"ratio graphconv {target} cold / torch.compile cold = {ratio:.3f}x")
    if "--save" in sys.argv[1:]:
        print("saved", save("compile_time_cpu", result))
    else:
        print("(not saved: pass --save to write benchmarks/results/compile_time_cpu.json)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
