"""What both runtimes do with a buffer: view the front of a byte buffer as a typed tensor."""
import numpy as np


def byte_view(buf, dtype, shape):
    """A typed tensor over the front of a byte buffer (NumPy or CuPy alike)."""
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return buf[:n].view(dtype).reshape(shape)
