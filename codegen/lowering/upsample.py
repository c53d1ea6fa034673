"""upsample and its gradient: one thread per element, the per-axis index and weight tables of
graphconv.ops.upsample.axis_table baked into read-only device arrays (the same numbers the NumPy reference
uses), a corner sum forward and a CSR gather backward (no atomics)."""
from __future__ import annotations

import itertools

import sympy as sp

from graphconv.ops.upsample import axis_reads, axis_table

from ..spec import Arg, KernelSpec, Lowered
from . import c_int, flat, lowering, numel, short_dtype
from .pointwise import MAX_BLOCKS
from .window import literal

THREADS = 256
TABLE_BYTES = 256 * 1024     # past this the generated source itself would be unwieldy


@lowering("upsample", "upsample_backward")
def lower_upsample(ctx):
    a = ctx.attrs
    T = ctx.float_type
    backward = ctx.node.op == "upsample_backward"
    mode, corners_on = a["mode"], a["align_corners"]
    S_out = list(a["size"])
    S_in = list(a["input_size"]) if backward else [int(d) for d in ctx.ins[0].shape[2:]]
    nd = len(S_out)
    tag = f"{mode}{'_ac' if corners_on else ''}"
    name = (f"{ctx.node.op}_{tag}_{short_dtype(ctx.dtype)}_c{c_int(ctx.ins[0].shape[1])}"
            f"_i{'x'.join(map(str, S_in))}_o{'x'.join(map(str, S_out))}")
    prefix = "t"
    rows = [axis_table(i, o, mode, corners_on) for i, o in zip(S_in, S_out)]
    tables = []
    if backward:
        # per input index s of axis k: the outputs o that read it and their weights (CSR)
        for k, (n_in, n_out) in enumerate(zip(S_in, S_out)):
            entries = [[] for _ in range(n_in)]
            for o, src, ws in axis_reads(n_in, n_out, mode, corners_on, backward=True):
                entries[src].append((o, ws))
            start = [0]
            for e in entries:
                start.append(start[-1] + len(e))
            pairs = [e for row in entries for e in row] or [(0, 0.0)]
            tables += [{"ctype": "int", "name": f"{prefix}_start{k}", "data": start},
                       {"ctype": "int", "name": f"{prefix}_o{k}", "data": [o for o, _ in pairs]}]
            if mode != "nearest":
                tables.append({"ctype": T, "name": f"{prefix}_wt{k}", "data": [literal(v, T) for _, v in pairs]})
        gather = flat([f"{prefix}_o{k}[e{k}]" for k in range(nd)], S_out)
        weights = "".join(f"{prefix}_wt{k}[e{k}] * " for k in range(nd)) if mode != "nearest" else ""
        params = {"gather_index": gather, "weight_product": weights}
        here, there, total = S_in, S_out, numel(ctx.ins[0].shape[:2]) * numel(S_in)
        args = [ctx.arg_in(0, "dy"), ctx.arg_out(0, "dx"), Arg("int", "batch")]
    else:
        for k, (i0, i1, w) in enumerate(rows):
            tables += [{"ctype": "int", "name": f"{prefix}_i0{k}", "data": i0}]
            if mode != "nearest":
                tables += [{"ctype": "int", "name": f"{prefix}_i1{k}", "data": i1},
                           {"ctype": T, "name": f"{prefix}_w{k}", "data": [literal(v, T) for v in w]}]
        corners = []
        for c in itertools.product((0, 1), repeat=1 if mode == "nearest" else nd):
            if mode == "nearest":
                corners.append({"index": flat([f"{prefix}_i0{k}[p{k}]" for k in range(nd)], S_in)})
                break
            weight = " * ".join(f"w{k}" if bit else f"(({T})1 - w{k})" for k, bit in enumerate(c))
            corners.append({"weight": weight,
                            "index": flat([f"{prefix}_i{bit}{k}[p{k}]" for k, bit in enumerate(c)], S_in)})
        params = {"corners": corners}
        here, there, total = S_out, S_in, numel(ctx.outs[0].shape)
        args = [ctx.arg_in(0, "x"), ctx.arg_out(0, "out"), Arg("int", "batch")]
    size = sum(len(t["data"]) * (4 if t["ctype"] in ("int", "float") else 8) for t in tables)
    if size > TABLE_BYTES:
        raise ctx.fail(f"upsampling {S_in} -> {S_out} needs {size} bytes of index tables, past the {TABLE_BYTES} "
                       f"a kernel source carries; run this graph with backend='numpy'")
    params.update(T=T, threads=THREADS, total=c_int(total), nd=nd, here=here, there_plane=numel(there),
                  tables=tables, prefix=prefix, mode=mode, align_corners=corners_on, backward=backward)
    grid = (sp.Min(sp.ceiling(sp.sympify(total) / THREADS), MAX_BLOCKS), 1, 1)
    return Lowered(kernels=[KernelSpec(name=name, template="upsample.cu.j2", params=params, args=args, grid=grid,
                                       block=(THREADS, 1, 1))])
