"""Shared by the benchmarks: the machine description and result files."""
import json
import os
import platform
from datetime import date


def machine():
    import numpy
    info = {"python": platform.python_version(), "numpy": numpy.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "date": date.today().isoformat()}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def save(name, result):
    path = os.path.join(os.path.dirname(__file__), "results", f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    return path
