import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # the oracles in tests/ import as plain modules

import pytest  # noqa: E402

# Under pytest-xdist (`-n logical`, the README's test command) each worker runs on its own share of the
# cores, set here before anything loads OpenMP or BLAS: their threads then never outnumber the cores
# (two workers each starting two spinning OpenMP or BLAS threads on two cores ran a numpy training
# test 6x slower), and the compile pools (codegen.cache.cores) are as wide as the worker's share.
_WORKER, _WORKERS = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKER.startswith("gw") and _WORKERS > 1 and hasattr(os, "sched_setaffinity"):
    _cpus = sorted(os.sched_getaffinity(0))
    os.environ["GRAPHCONV_TEST_CPUS"] = ",".join(map(str, _cpus))     # the cores before pinning, for a child
    if len(_cpus) > 1:    # a worker started after a crash is gw<count + k>: its slot is the number modulo count
        os.sched_setaffinity(0, _cpus[int(_WORKER[2:]) % _WORKERS % len(_cpus)::_WORKERS])


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where the cuda backend finds a device; elsewhere they skip, saying why."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    from codegen.cuda import available
    if available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with a driver and CuPy (the cuda backend); none here")
    for item in gpu_items:
        item.add_marker(skip)
