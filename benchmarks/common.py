"""Shared by the benchmarks: timing by median of repeats, the machine description, result files."""
import json
import os
import platform
import statistics
import sys
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


def report(title, result_name, ours, make_theirs, repeats, **extra):
    """Time `ours`; when PyTorch is installed, time it against `make_theirs()` in alternating blocks
    and print the ratio; with --save on the command line, write the result under benchmarks/results/
    (a plain run leaves the committed results alone)."""
    alone = median_time(ours, repeats)
    result = {"benchmark": title, **extra, "numpy_backend_ms": alone * 1e3, **machine()}
    print(f"{title}: numpy backend {alone * 1e3:.2f} ms")
    try:
        theirs = make_theirs()
    except ImportError:
        print("PyTorch not installed: no ratio")
    else:
        a, b = compare(ours, theirs, per_round=repeats)
        result.update(numpy_backend_ms=a * 1e3, torch_cpu_eager_ms=b * 1e3, ratio_numpy_over_torch=a / b)
        print(f"alternating blocks: numpy backend {a * 1e3:.2f} ms, PyTorch CPU eager {b * 1e3:.2f} ms "
              f"-> ratio numpy/torch = {a / b:.2f}x")
    if "--save" in sys.argv[1:]:
        print("saved", save(result_name, result))
    else:
        print("(not saved: pass --save to write benchmarks/results/" + result_name + ".json)")
    return result
