"""The errors graphconv raises. Every message names the user's layer first."""


class GraphConvError(Exception):
    """Base class: anything graphconv reports about the user's graph or data."""


class GraphError(GraphConvError):
    """Malformed graph: unknown op or attribute, bad attribute value, broken IR."""


class ShapeError(GraphConvError):
    """A shape rule proved that a layer cannot be applied to its inputs."""


class InputError(GraphConvError):
    """Arrays bound at run time do not match the graph (missing, shape, dtype)."""


class CheckpointError(GraphConvError):
    """A checkpoint or weights file that cannot be read, written or used with this graph."""


class TrainingError(GraphConvError):
    """Training cannot go on: a non-finite loss or state, refused before it is applied or saved."""


class ResourceError(GraphConvError):
    """The work would need more memory than the machine has; refused before allocating."""


class OpError(Exception):
    """Raised inside an op's rule; the graph turns it into a ShapeError/GraphError
    naming the layer and the chain of layers that produced the offending operand."""

    def __init__(self, message, operand=0, kind=ShapeError):
        super().__init__(message)
        self.message = message
        self.operand = operand
        self.kind = kind


class CompileError(GraphConvError):
    """Code generation could not turn a node into a kernel, or a compiler (NVRTC, g++) refused a
    generated kernel; the message names the node, its layer, the template and the compiler's words."""


class BackendError(GraphConvError):
    """A backend cannot run here (no g++ for `host`, no GPU or driver for `cuda`); the message says
    what to install or which backend to use instead."""
