import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # the oracles in tests/ import as plain modules

import pytest  # noqa: E402


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
