"""The machine code of a generated kernel, read without a GPU: the cubin NVRTC wrote for sm_90,
disassembled by nvdisasm (pip nvidia-cuda-nvdisasm, in the `test` extra), and its main loop's
instructions counted by kind.

The main loop is the backward branch whose body holds the most multiply-adds (FFMA, DFMA or the tensor
cores' HMMA). The share of multiply-adds among its instructions bounds the fraction of the FP32 peak the
loop can reach when nothing stalls (one instruction issues per scheduler per cycle): it is the static
measure the GEMM's index hoisting and vector shared loads are judged by (benchmarks/sass_mix.py prints
it for every kernel; a test keeps it). Multiply-adds per instruction and lane compare the FP32 and TF32
loops (an HMMA.1688 is 16 x 8 x 8 multiply-adds, 32 per lane; the FP32 path's ceiling is 1). An upper bound per pass (branches skipped at run time count) that
says nothing of memory latency: bench_gpu.py times, on a GPU."""
from __future__ import annotations

import collections
import glob
import os
import re
import shutil
import subprocess
import tempfile

from graphconv.errors import BackendError

from .nvrtc import cuda_homes, nvidia_roots

MMA_SHAPES = {"1688": 16 * 8 * 8, "16816": 16 * 8 * 16, "884": 8 * 8 * 4}      # HMMA.<shape>: m x n x k
MULTIPLY_ADDS = frozenset({"FFMA", "DFMA", "HMMA"})     # HMMA: a 16 x 8 x 8 tile per instruction
KINDS = {"FFMA": "fma", "DFMA": "fma", "HMMA": "mma", "FMUL": "float", "FADD": "float", "FSEL": "float",
         "FSETP": "float", "FMNMX": "float", "LDG": "global load", "LDS": "shared load", "STS": "shared store",
         "LDGSTS": "async copy", "LDSM": "shared load", "BAR": "barrier", "BRA": "branch", "BSSY": "branch",
         "BSYNC": "branch"}
LINE = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\S*)\s*(.*?);")
LABEL = re.compile(r"^(\.L_x_\d+):")
TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def tool(name):
    """A CUDA binary tool (nvdisasm, cuobjdump): on PATH, from its pip wheel, or in a CUDA toolkit;
    None when absent."""
    candidates = [shutil.which(name)]
    candidates += [p for root in nvidia_roots() for p in sorted(glob.glob(os.path.join(root, "*", "bin", name)))]
    candidates += [os.path.join(home, "bin", name) for home in cuda_homes()]
    return next((p for p in candidates if p and os.path.exists(p)), None)


def nvdisasm() -> str:
    found = tool("nvdisasm")
    if found is None:
        raise BackendError("nvdisasm not found: pip install nvidia-cuda-nvdisasm (the 'test' extra has it)")
    return found


def disassemble(cubin: bytes) -> list[str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm(), "-c", f.name], check=True, capture_output=True, text=True).stdout.splitlines()


def parse(lines):
    """[(label or None, opcode, modifiers, operands)] in address order; labels as their own rows."""
    rows = []
    for line in lines:
        if m := LABEL.match(line.strip()):
            rows.append((m.group(1), None, "", ""))
        elif m := LINE.search(line):
            rows.append((None, m.group(2), m.group(3), m.group(4)))
    return rows


def main_loop(rows):
    """(start, end) row indices of the backward branch whose body holds the most multiply-adds."""
    where = {label: i for i, (label, *_rest) in enumerate(rows) if label}
    best, best_fmas = None, 0
    for i, (_, op, _, operands) in enumerate(rows):
        if op != "BRA" or not (m := TARGET.search(operands)) or where.get(m.group(1), i + 1) > i:
            continue
        start = where[m.group(1)]
        fmas = sum(1 for _, o, _, _ in rows[start:i + 1] if o in MULTIPLY_ADDS)
        if fmas > best_fmas:
            best, best_fmas = (start, i), fmas
    return best


def mix(cubin: bytes) -> dict:
    """The main loop's instruction counts by kind; {} when the kernel has no loop with multiply-adds."""
    rows = parse(disassemble(cubin))
    loop = main_loop(rows)
    if loop is None:
        return {}
    counts, macs = collections.Counter(), 0
    for _, op, mods, _ in rows[loop[0]:loop[1] + 1]:
        if op is None or op == "NOP":
            continue
        if op in MULTIPLY_ADDS:      # per lane: one for FFMA/DFMA, m*n*k/32 for an HMMA (.1688: 16x8x8)
            shape = re.match(r"\.(\d+)", mods)
            macs += 1 if op != "HMMA" else MMA_SHAPES.get(shape[1] if shape else "", 16 * 8 * 8) // 32
        kind = KINDS.get(op, "integer/other" if op[0] in "IULSPM" or op in ("SEL", "SHF", "LEA", "MOV") else op)
        if op in ("LDG", "LDS", "STS") and (".64" in mods or ".128" in mods):
            kind += " (wide)"
        counts[kind] += 1
    total = sum(counts.values())
    fma = counts["fma"] + counts["mma"]
    loads = sum(v for k, v in counts.items() if k.startswith("global load") or k == "async copy")
    return {"instructions": total, "fma": counts["fma"], "mma": counts["mma"], "fma_share": fma / total,
            "macs_per_instruction": macs / total,
            "global_loads": loads, "shared_loads": sum(v for k, v in counts.items() if k.startswith("shared load")),
            "integer/other": counts["integer/other"], "kinds": dict(sorted(counts.items()))}


