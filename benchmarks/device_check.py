"""Do cubins compiled here (pip NVRTC 13.5, no GPU) load and compute right on a GPU machine's driver?

    GRAPHCONV_CACHE=.gpucache python benchmarks/device_check.py export   # here: fill the cubin cache
    GRAPHCONV_CACHE=.gpucache python benchmarks/device_check.py verify   # there: check every kernel with them

`verify` takes every cubin from the carried cache (NVRTC's version in the cache key is pinned to the
exporter's, and compiling is made an error), so what runs is exactly what NVRTC 13.5 wrote here.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from codegen import nvrtc  # noqa: E402
from codegen.cache import cache_dir  # noqa: E402
from codegen.program import Program  # noqa: E402
from graphconv.models import MODELS  # noqa: E402
from graphconv.pipeline import build  # noqa: E402

CASES = [(m, s) for m in ("lenet5", "vgg_small", "resnet8") for s in ("fused", "fused-train")]


def main(mode):
    stamp = cache_dir("nvrtc").parent / "exported_by.json"
    if mode == "export":
        for model, stage in CASES:
            program = Program(build(MODELS[model](), stage))
            nvrtc.compile_many([(s.source, s.name) for s in program.kernels])
        stamp.write_text(json.dumps({"nvrtc": list(nvrtc.version())}))
        print("exported with NVRTC", nvrtc.version(), "to", stamp.parent)
        return
    import graphconv as gc  # noqa: F401
    from codegen.check import check_kernels
    from graphconv.data import random_inputs
    from test_codegen import realistic_params
    exported = tuple(json.loads(stamp.read_text())["nvrtc"])
    print("device NVRTC", nvrtc.version(), "; cubins from NVRTC", exported)
    nvrtc.version = lambda: exported

    def refuse(*_):
        raise RuntimeError("a kernel missed the exported cache")
    nvrtc._nvrtc_compile = refuse
    failures = 0
    for model, stage in CASES:
        graph = build(MODELS[model](), stage)
        results = check_kernels(graph, random_inputs(graph, 3, 1), realistic_params(graph, 1), backend="cuda")
        bad = [r for r in results if not r.ok]
        failures += len(bad)
        print(f"{model} {stage}: {len(results) - len(bad)}/{len(results)} nodes match NumPy with exported cubins")
        for r in bad:
            print(f"   {r.node} [{r.op}] {r.kernels}: abs {r.max_abs:.3g} rel {r.max_rel:.3g} {r.note}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main(sys.argv[1])
