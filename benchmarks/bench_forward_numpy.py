"""LeNet-5 forward at batch 64: the numpy backend against PyTorch CPU eager, as a ratio.

    python benchmarks/bench_forward_numpy.py [--batch 64] [--repeats 30]
"""
import argparse
import sys

import numpy as np

import graphconv as gc
from graphconv.models import lenet5

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import report  # noqa: E402


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

    def make_theirs():
        import torch
        fwd, tx = torch_lenet(params), torch.from_numpy(x)
        np.testing.assert_allclose(fwd(tx).numpy(), run(x, params=params), rtol=1e-4, atol=1e-5)
        return lambda: fwd(tx)

    report(f"lenet5 forward, batch {args.batch}", "forward_numpy_cpu", lambda: run(x, params=params), make_theirs,
           args.repeats, batch=args.batch)

if __name__ == "__main__":
    main()
