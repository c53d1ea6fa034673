"""Random networks, end to end: random chains of layers with random hyperparameters (including
residual adds and concats), built with the builder; forward values and every parameter gradient
of the derived backward graph against PyTorch autograd."""
import numpy as np
import pytest

import graphconv as gc
from graphconv.autodiff import derive_backward
from graphconv.training import attach_loss
from torch_oracle import evaluate_into, torch

pytestmark = pytest.mark.skipif(torch is None, reason="PyTorch not installed")


def random_network(rng, nd):
    g = gc.Graph(f"random{nd}d", "float64")
    spatial = tuple(int(v) for v in rng.integers(6, 11 if nd < 3 else 7, nd))
    h = g.input("x", ("N", int(rng.integers(1, 4)), *spatial))
    for _ in range(int(rng.integers(2, 5))):
        c = int(h.shape[1])
        choice = rng.integers(0, 6)
        size = min(int(d) for d in h.shape[2:])
        if choice <= 1 and size >= 3:        # conv, sometimes grouped / dilated / strided / padded
            groups = c if rng.random() < 0.3 else 1
            out = groups * int(rng.integers(1, 3)) if groups > 1 else int(rng.integers(2, 6))
            k = int(rng.integers(1, 4))
            h = getattr(g, f"conv{nd}d")(h, out, k, stride=int(rng.integers(1, 3)), padding=int(rng.integers(0, 2)),
                                         dilation=1 if k * 2 > size else int(rng.integers(1, 3)), groups=groups,
                                         padding_mode=str(rng.choice(["zeros", "reflect", "replicate", "circular"]))
                                         if size > 2 else "zeros", bias=bool(rng.random() < 0.7))
        elif choice == 2 and size >= 2:      # pooling
            mode = str(rng.choice(["max", "avg"]))
            extra = {"count_include_pad": bool(rng.random() < 0.5)} if mode == "avg" else {}
            h = getattr(g, f"{mode}_pool{nd}d")(h, 2, stride=int(rng.integers(1, 3)), padding=int(rng.integers(0, 2)),
                                               ceil_mode=bool(rng.random() < 0.5), **extra)
        elif choice == 3:                    # batch norm + activation
            h = getattr(g, f"batch_norm{nd}d")(h)
            h = g.apply(str(rng.choice(["relu", "leaky_relu", "sigmoid", "tanh"])), h)
        elif choice == 4:                    # residual block
            branch = getattr(g, f"conv{nd}d")(g.relu(h), c, 3, padding=1)
            h = g.add(h, branch)
        else:                                # concat with a 1x1 conv of itself
            h = g.concat([h, getattr(g, f"conv{nd}d")(h, 2, 1)], dim=1)
    g.output(g.linear(g.tanh(g.flatten(h)), 5))
    return g


@pytest.mark.parametrize("seed", range(24))
def test_random_network_forward_and_gradients_match_torch(seed):
    rng = np.random.default_rng(seed)
    nd = (1, 2, 3)[seed % 3]
    g = attach_loss(random_network(rng, nd))
    bwd = derive_backward(g, wrt=["x"])
    params = gc.init_params(g, seed=seed)
    x = rng.standard_normal([3] + [int(d) for d in g.inputs[0].shape[1:]])
    y = rng.integers(0, 5, 3)
    ours = gc.compile(bwd).run({"x": x, "y": y}, params)
    tensors = {k: torch.tensor(v, requires_grad=g.node(k).attrs["trainable"]) for k, v in params.items()}
    tensors["x"] = torch.tensor(x, requires_grad=True)
    tensors["y"] = torch.tensor(y)
    evaluate_into(g, tensors)
    tensors["loss"].backward()
    np.testing.assert_allclose(ours["loss"], tensors["loss"].item(), rtol=1e-11)
    for target, grad in bwd.meta["grads"].items():
        np.testing.assert_allclose(ours[grad], tensors[target].grad.numpy(), rtol=1e-8, atol=1e-11,
                                   err_msg=f"{g.dump()}\n{target}")
