"""Every kernel family's lowering module; importing this fills LOWERINGS."""
from . import gemm, loss, pointwise, reduce, softmax, views, window  # noqa: F401
