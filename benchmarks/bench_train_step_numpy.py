"""LeNet-5 training step at batch 64 (forward, backward, Adam update): the numpy backend against
PyTorch CPU eager, as a ratio.

    python benchmarks/bench_train_step_numpy.py [--batch 64] [--repeats 20]
"""
import argparse
import os
import sys

import numpy as np

from graphconv.models import lenet5
from graphconv.training import Optimizer, Trainer

sys.path.insert(0, os.path.dirname(__file__))
from common import report  # noqa: E402


def torch_step(params):
    import torch
    import torch.nn as nn
    net = nn.Sequential(nn.Conv2d(1, 20, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5, padding=2),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2450, 500), nn.ReLU(), nn.Linear(500, 10))
    with torch.no_grad():
        for i, name in ((0, "conv1"), (3, "conv2")):
            net[i].weight.copy_(torch.from_numpy(params[f"{name}.weight"]))
            net[i].bias.copy_(torch.from_numpy(params[f"{name}.bias"]))
        for i, name in ((7, "fc1"), (9, "fc2")):
            net[i].weight.copy_(torch.from_numpy(params[f"{name}.weight"].T))
            net[i].bias.copy_(torch.from_numpy(params[f"{name}.bias"]))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step(x, y):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    trainer = Trainer(lenet5(), Optimizer("adam", lr=1e-3), seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, args.batch)

    def make_theirs():
        import torch
        step = torch_step(Trainer(lenet5(), Optimizer("adam"), seed=0).params)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        return lambda: step(tx, ty)

    report(f"lenet5 training step (adam), batch {args.batch}", "train_step_numpy_cpu", lambda: trainer.step(x, y),
           make_theirs, args.repeats, batch=args.batch)

if __name__ == "__main__":
    main()
