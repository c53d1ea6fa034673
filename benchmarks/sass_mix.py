"""What the multiprocessor would execute in each kernel's main loop, read from the machine code: a
static measure of a kernel that needs no GPU, for the sessions that have none.

    python benchmarks/sass_mix.py                        # lenet5, vgg_small, resnet8 training kernels
    python benchmarks/sass_mix.py --models lenet5 --tf32 --all
    python benchmarks/sass_mix.py --save                 # benchmarks/results/sass-mix.{json,md}
    python benchmarks/sass_mix.py --winograd --save      # the opt-in Winograd kernels: sass-mix-winograd.*

Each kernel is compiled by NVRTC for sm_90 (the cubin a GPU would run), disassembled, and its main
loop's instructions counted by kind (codegen/sass.py says how and what the share of multiply-adds
bounds). Columns: registers per thread, instructions in the main loop, multiply-adds among them and
their share, global loads, shared loads (a 16-byte vector load counts once), integer and other. A
Winograd F(2x2, 3x3) kernel's multiply-adds each stand for 2.25 of a direct convolution's.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codegen import nvrtc  # noqa: E402
from codegen.sass import mix  # noqa: E402
from codegen.program import Program  # noqa: E402
from graphconv.models import MODELS  # noqa: E402
from graphconv.pipeline import build  # noqa: E402


TEMPLATES = ("gemm.cu.j2", "direct_conv.cu.j2", "direct_conv_tf32.cu.j2", "direct_wgrad.cu.j2",
             "direct_wgrad_tf32.cu.j2", "winograd_conv.cu.j2")


def kernels_of(models, stage, tf32):
    seen = set()
    for model in models:
        for spec in Program(build(MODELS[model](), stage), tf32=tf32).kernels:
            if spec.name not in seen:
                seen.add(spec.name)
                yield model, spec


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["lenet5", "vgg_small", "resnet8"])
    ap.add_argument("--stage", default="fused-train")
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--all", action="store_true", help="every kernel with a multiply-add loop (default: GEMM and direct)")
    ap.add_argument("--winograd", action="store_true", help="3 x 3 convolutions by Winograd F(2x2, 3x3) (opt-in)")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()
    if args.winograd:
        from codegen.lowering import direct
        direct.WINOGRAD = True
    picked = [(m, s) for m, s in kernels_of(args.models, args.stage, args.tf32)
              if (args.all or s.template in TEMPLATES) and (not args.winograd or s.template == "winograd_conv.cu.j2")]
    compiled = nvrtc.compile_many([(s.source, s.name) for _, s in picked])
    rows = []
    header = f"{'kernel':<88} {'regs':>4} {'loop':>5} {'fma':>5} {'share':>6} {'MAC/i':>6} {'ldg':>4} {'lds':>4} {'int':>5}"
    what = ", tf32" if args.tf32 else ", Winograd" if args.winograd else ""
    print(f"main-loop instruction mix, NVRTC {'.'.join(map(str, nvrtc.version()))}, sm_90, {args.stage}{what}\n{header}")
    for (model, spec), c in zip(picked, compiled):
        m = mix(c.cubin)
        if not m:
            continue
        rows.append({"model": model, "kernel": spec.name, "template": spec.template, "registers": c.registers, **m})
        print(f"{spec.name[:88]:<88} {c.registers:>4} {m['instructions']:>5} {m['fma'] + m['mma']:>5} "
              f"{m['fma_share']:>6.0%} {m['macs_per_instruction']:>6.2f} {m['global_loads']:>4} {m['shared_loads']:>4} "
              f"{m['integer/other']:>5}")
    if args.save:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                           "sass-mix" + ("-tf32" if args.tf32 else "") + ("-winograd" if args.winograd else ""))
        with open(out + ".json", "w") as f:
            json.dump({"nvrtc": list(nvrtc.version()), "stage": args.stage, "kernels": rows}, f, indent=1)
            f.write("\n")
        with open(out + ".md", "w") as f:
            f.write(f"# Main-loop instruction mix (static, sm_90, NVRTC {'.'.join(map(str, nvrtc.version()))}, "
                    f"{args.stage}{what.replace('tf32', 'TF32')})\n\nWritten by `benchmarks/sass_mix.py`; "
                    "what the columns mean is in its docstring.\n\n"
                    "| kernel | registers | loop instructions | multiply-add instructions | share | multiply-adds per"
                    " instruction and lane | global loads | shared loads | integer/other |\n"
                    "|---|---|---|---|---|---|---|---|---|\n")
            for r in rows:
                f.write(f"| {r['kernel']} | {r['registers']} | {r['instructions']} | {r['fma'] + r['mma']} | "
                        f"{r['fma_share']:.0%} | {r['macs_per_instruction']:.2f} | {r['global_loads']} | "
                        f"{r['shared_loads']} | {r['integer/other']} |\n")
        print("wrote", out + ".json", "and .md")


if __name__ == "__main__":
    main()
