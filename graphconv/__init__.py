"""graphconv: a symbolic graph compiler for convolutional networks."""
from .builder import Graph
from .errors import (BackendError, CheckpointError, CompileError, GraphConvError, GraphError, InputError,
                     ResourceError, ShapeError,
                     TrainingError)
from .ir import Node, Tensor
from .params import init_params
from .ops.base import as_flag as _as_flag, as_float_dtype as _as_float_dtype
from .ops.pointwise import define_activation, sigmoid, softplus
from .passes import cast, set_training
from .weights import load_state_dict, load_weights, predict, save_weights, state_dict
from .training import Optimizer, Trainer, build_train_step

__version__ = "0.1.0"

BACKENDS = ("numpy", "host", "cuda")


def compile(graph, backend="numpy", dtype=None, training=None, tf32=False, blas_threads=None, winograd=False):
    """Compile a graph into a callable: `run = gc.compile(g); y = run(x, params=params)`.

    backend  numpy: the reference interpreter; host: the generated CUDA kernels, built with g++ and
             run on the CPU; cuda: the same kernels on an NVIDIA GPU through CuPy

    dtype   cast the graph to float32 / float64 first
    training  set every batch_norm to batch statistics (True) or running statistics (False)
    tf32    host/cuda: convolutions and matrix products on TF32 tensor cores (inputs rounded to 10
            mantissa bits, FP32 sums; about 1e-3 relative error); float32 graphs only
    winograd  host/cuda, float32: 3 x 3 stride-1 convolutions (forward and input gradient) by Winograd's
            F(2x2, 3x3): 2.25x fewer multiply-adds, FP32 results within a few ulps of the direct kernel's
    blas_threads  numpy: NumPy's BLAS threads during a run (default graphconv.reference.BLAS_THREADS:
            two, or one on a one-core machine; measured, see there)
    """
    from .weights import need_graph
    need_graph(graph, "compile")
    if backend not in BACKENDS:
        raise GraphError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    tf32, winograd = _as_flag(tf32, "tf32"), _as_flag(winograd, "winograd")
    if dtype is not None and _as_float_dtype(dtype, "dtype") != graph.dtype:
        graph = cast(graph, dtype)
    if training is not None:
        graph = set_training(graph, training)
    if tf32 and backend == "numpy":
        raise GraphError("tf32=True is for the kernel backends ('host', 'cuda'); the numpy backend computes "
                         "in the graph's own precision")
    if winograd and backend == "numpy":
        raise GraphError("winograd=True is for the kernel backends ('host', 'cuda'): it picks how their kernels "
                         "compute 3 x 3 convolutions")
    if blas_threads is not None and backend != "numpy":
        raise GraphError(f"blas_threads is for the numpy backend; backend {backend!r} runs generated kernels")
    if backend == "numpy":
        from .reference import NumpyProgram
        return NumpyProgram(graph, blas_threads=blas_threads)
    from codegen.runner import CompiledProgram   # codegen sits above the IR: imported only here
    return CompiledProgram(graph, backend, tf32=tf32, winograd=winograd)


__all__ = ["Graph", "Tensor", "Node", "compile", "init_params", "cast", "set_training", "define_activation",
           "Trainer", "Optimizer", "build_train_step",
           "load_weights", "save_weights", "predict", "load_state_dict", "state_dict",
           "sigmoid", "softplus",
           "GraphConvError", "GraphError", "ShapeError", "InputError", "CheckpointError", "TrainingError",
           "ResourceError"]
