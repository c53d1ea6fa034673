"""Every kernel family's lowering module; importing this fills LOWERINGS."""
from . import gemm, loss, pointwise, reduce, views, window  # noqa: F401
