"""Shared by the benchmarks: timing by median of repeats, the machine description, result files."""
import json
import os
import platform
import statistics
import time
from datetime import date


def median_time(fn, repeats=30, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(ours, theirs, rounds=3, per_round=20, settle=3):
    """Median times of two functions measured in alternating blocks, so that both see the same
    machine load (a 2-core VM drifts by tens of percent over a minute). The first `settle` calls of
    a block are not counted: OpenBLAS and OpenMP worker threads keep spinning for a while after the
    other library's last call and slow the next few."""
    a, b = [], []
    for _ in range(rounds):
        for f, out in ((ours, a), (theirs, b)):
            for i in range(settle + per_round):
                start = time.perf_counter()
                f()
                if i >= settle:
                    out.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


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
