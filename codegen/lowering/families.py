"""Every kernel family's lowering module; importing this fills LOWERINGS."""
from . import adaptive, dropout, gemm, loss, pointwise, reduce, softmax, upsample, views, window  # noqa: F401
