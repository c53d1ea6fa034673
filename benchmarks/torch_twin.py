"""The same model in PyTorch CPU eager, built from a graphconv graph: each op of the graph becomes
the torch.nn.functional call PyTorch users write (conv2d, batch_norm, relu, max_pool2d, linear, ...),
the parameters nn.Parameters with graphconv's initial values, so both sides compute the same
function from the same weights. For the benchmarks: forward (no_grad, eval mode) and a training
step (cross-entropy, backward, torch.optim.Adam)."""
import numpy as np
import torch
import torch.nn.functional as F


class TorchTwin(torch.nn.Module):
    def __init__(self, graph, params):
        super().__init__()
        self.graph = graph
        self.weights = torch.nn.ParameterDict()
        self.stats = {}
        for node in graph.params:
            value = torch.from_numpy(np.array(params[node.name]))
            if node.attrs["trainable"]:
                self.weights[node.name.replace(".", "__")] = torch.nn.Parameter(value)
            else:
                self.stats[node.name] = value.clone()
        self.order = [n for n in graph.topo() if n.role == "op"]

    def tensor(self, name, values):
        if name in values:
            return values[name]
        key = name.replace(".", "__")
        return self.weights[key] if key in self.weights else self.stats[name]

    def forward(self, x):
        values = {self.graph.inputs[0].name: x}
        for node in self.order:
            xs = [self.tensor(o, values) for o in self.graph.operands(node.name)]
            values[node.name] = self.op(node, xs)
        return values[self.graph.outputs[0]]

    def op(self, node, xs):
        a, op = node.attrs, node.op
        if op.startswith("conv"):
            pads = tuple(lo for lo, _ in a["padding"])
            return getattr(F, op)(xs[0], xs[1], xs[2] if len(xs) > 2 else None, stride=a["stride"], padding=pads,
                                  dilation=a["dilation"], groups=a["groups"])
        if op == "batch_norm":
            w, b = (xs[3], xs[4]) if len(xs) == 5 else (None, None)
            return F.batch_norm(xs[0], xs[1], xs[2], w, b, training=a["training"] and self.training,
                                momentum=a["momentum"], eps=a["eps"])
        if op == "relu":
            return F.relu(xs[0])
        if op in ("max_pool2d", "avg_pool2d"):
            pads = tuple(lo for lo, _ in a["padding"])
            return getattr(F, op)(xs[0], a["kernel_size"], a["stride"], pads, ceil_mode=a["ceil_mode"])
        if op == "linear":      # graphconv's weight is [in, out]: x @ W + b
            return torch.addmm(xs[2], xs[0], xs[1]) if len(xs) > 2 else xs[0] @ xs[1]
        if op == "add":
            return xs[0] + xs[1]
        if op == "flatten":
            return torch.flatten(xs[0], a["start_dim"], a["end_dim"])
        raise NotImplementedError(f"torch twin: no translation for op {op}")


def training_step(twin, lr=1e-3):
    """A function (x, y) -> loss: cross-entropy, backward, Adam."""
    opt = torch.optim.Adam(twin.parameters(), lr=lr)
    twin.train()

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(twin(x), y)
        loss.backward()
        opt.step()
        return loss
    return step


def inference(twin):
    twin.eval()

    def forward(x):
        with torch.no_grad():
            return twin(x)
    return forward
