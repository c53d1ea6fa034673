"""LeNet-5 forward at batch 64: the numpy backend against PyTorch CPU eager, as a ratio.

    python benchmarks/bench_forward_numpy.py [--batch 64] [--repeats 30]
"""
import argparse
import sys

import numpy as np

import graphconv as gc
from graphconv.models import lenet5

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import compare, machine, median_time, save  # noqa: E402


def torch_lenet(params):
    import torch
    import torch.nn.functional as F
    t = {k: torch.from_numpy(v) for k, v in params.items()}

    def forward(x):
        with torch.no_grad():
            h = F.max_pool2d(F.relu(F.conv2d(x, t["conv1.weight"], t["conv1.bias"], padding=2)), 2)
            h = F.max_pool2d(F.relu(F.conv2d(h, t["conv2.weight"], t["conv2.bias"], padding=2)), 2)
            h = F.relu(F.linear(h.flatten(1), t["fc1.weight"].T, t["fc1.bias"]))
            return F.linear(h, t["fc2.weight"].T, t["fc2.bias"])
    return forward


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    g = lenet5()
    params = gc.init_params(g, seed=0)
    x = np.random.default_rng(0).standard_normal((args.batch, 1, 28, 28)).astype(np.float32)
    run = gc.compile(g)
    ours = median_time(lambda: run(x, params=params), args.repeats)
    result = {"benchmark": "lenet5 forward", "batch": args.batch, "numpy_backend_ms": ours * 1e3, **machine()}
    print(f"lenet5 forward, batch {args.batch}: numpy backend {ours * 1e3:.2f} ms")
    try:
        import torch
    except ImportError:
        print("PyTorch not installed: no ratio")
    else:
        fwd = torch_lenet(params)
        tx = torch.from_numpy(x)
        np.testing.assert_allclose(fwd(tx).numpy(), run(x, params=params), rtol=1e-4, atol=1e-5)
        ours, theirs = compare(lambda: run(x, params=params), lambda: fwd(tx), per_round=args.repeats)
        result.update(numpy_backend_ms=ours * 1e3, torch_cpu_eager_ms=theirs * 1e3, ratio_numpy_over_torch=ours / theirs)
        print(f"alternating rounds: numpy backend {ours * 1e3:.2f} ms, PyTorch CPU eager {theirs * 1e3:.2f} ms "
              f"-> ratio numpy/torch = {ours / theirs:.2f}x")
    print("saved", save("forward_numpy_cpu", result))


if __name__ == "__main__":
    main()
