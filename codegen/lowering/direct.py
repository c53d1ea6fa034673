"""Direct 2-D convolutions (stride 1, dilation 1, one group, zero padding): the input tile with its
halo and the filter slice staged in shared memory, a register tile of channels x positions per
thread, and the same epilogues as the GEMM family (bias, activation chain, a non-overlapping pool
with its argmax codes). Backward-data of such a convolution is one too: a direct convolution of the
output gradient with the flipped filter, which gathers a fused pool/activation gradient while
staging its input tile. Other convolutions go through the implicit GEMM (gemm.py)."""
from __future__ import annotations

import math
import re

import sympy as sp

from ..spec import KernelSpec, Lowered
from . import advance_lines, digit_lines, direct_tf32, in_batches, winograd

SHARED_BUDGET = 40 * 1024      # bytes of static shared memory per block (48 KiB is the static limit)
DOUBLE_BUDGET = 46 * 1024      # the same, double-buffered (both buffers; registers, not shared memory, bound the blocks per SM)
# staging: each thread's elements of a stage are loaded this many at a time, all in flight before any
# is stored (their (channel, row, column) advanced as digits); 0: one rolled loop, as before session 3,
# which ptxas unrolled by 4 (vgg conv2_2: 21 input elements per thread, 6 round trips to memory a stage)
STAGE_LOADS = 16
# stages double-buffered in shared memory and filled by cp.async where both tiles are plain copies of
# the tensors (not a gathered pool/activation gradient): the next input channels' tiles are in flight
# while the current ones are computed, with no registers held for them (session 3's staging still
# waited for each stage's loads before any multiply-add, with two blocks per SM to cover it); each
# buffer gets half the shared memory, so a stage holds half the channels. False: one buffer, loaded
# through registers (STAGE_LOADS)
PIPELINE = True

# where one block covers a whole image plane of at most 64 outputs (8 x 8), its output channels are split over at least
# two blocks where 128 threads per block remain: vgg's conv3 layers ran 64 blocks (one per image) on 132
# SMs at batch 64; the input tile a second block reloads is 100 values per channel against 9 x 64 filter
# values. False: the fewest padded channels, then the most threads (one block per image there)
SPLIT_SMALL_PLANES = True

# under tf32=True, direct convolutions with 2 x 2 cells (a 2 x 2 pool, or none) and at least 8 input
# channels multiply on the TF32 tensor cores (direct_tf32.py); False: they stay on the FP32 cores, as
# they did through session 5 (the TF32 implicit GEMM had been slower than the FP32 direct kernels)
TF32 = True

# FP32 3 x 3 convolutions with 2 x 2 cells by Winograd's F(2x2, 3x3) (winograd.py: 2.25x fewer
# multiply-adds, the transforms' additions and a filter kernel on top), for every compile; a compile
# asks for it alone with winograd=True (`--winograd`). Off until a GPU has timed it (`bench_gpu.py
# --variants`: "Winograd F(2x2, 3x3)")
WINOGRAD = False

PLAIN_LOAD = re.compile(r"^v = (\w+)\[([^\[\]]*)\];$")   # one array read: no brackets in its index


def plain_source(load):
    """`&array[index]` where the load lines are one plain `v = array[index];`, else None."""
    match = PLAIN_LOAD.match(load[0]) if len(load) == 1 else None
    return f"&{match.group(1)}[{match.group(2)}]" if match else None


def one_block_per_small_image(lowered) -> bool:
    """Whether a direct kernel would give each image of a small plane (<= 64 outputs) one block: too
    few blocks to fill the GPU at small batches (vgg conv3_2 at batch 64: 0.154 ms against the GEMM's
    0.100 in session 2); the GEMM then tiles the batch's positions instead."""
    p = lowered.kernels[-1].params      # the convolution (a TF32 or Winograd one follows its filter kernel)
    if p.get("winograd"):
        return False                    # its blocks hold several images' small planes, by design
    return p["NCY"] * p["NCX"] * p["CH"] * p["CW"] <= 64 and p["TILES"] == 1 and -(-p["M"] // p["OCB"]) == 1


def eligible(geo, pool_window=None, out_size=None, pooled_size=None) -> bool:
    """Stride 1, dilation 1, one group, 2-D; a pool, if any, tiles the output exactly: windows that
    do not overlap, no padding, and no ceil_mode overhang (every pooled output a whole window)."""
    if geo["nd"] != 2 or geo["groups"] != 1 or any(s != 1 for s in geo["stride"]) or any(d != 1 for d in geo["dil"]):
        return False
    if pool_window is not None:
        k, s, pad, dil = pool_window
        if list(s) != list(k) or any(pad) or any(d != 1 for d in dil) or math.prod(k) > 16:
            return False
        if pooled_size is not None and list(pooled_size) != [o // kk for o, kk in zip(out_size, k)]:
            return False
        if any(p == 0 for p in pooled_size or [1]):
            return False
    return True


def direct_spec(ctx, name, *, C, M, K, pad, in_size, out_size, cell, pooled, in_load, w_load, row_setup,
                window_begin, element, window_end, args, prelude="", in_desc="", w_desc=""):
    """The KernelSpec of one direct convolution (`cell` = (CH, CW): a pooling window, or 2 x 2),
    or None when its tiles do not fit in shared memory (the caller then uses the GEMM)."""
    if TF32 and ctx.tf32 and ctx.float_type == "float" and tuple(cell) == (2, 2):
        lowered = direct_tf32.tf32_spec(
            ctx, name, C=C, M=M, K=K, pad=pad, in_size=in_size, out_size=out_size, pooled=pooled, in_load=in_load,
            w_load=w_load, row_setup=row_setup, window_begin=window_begin, element=element, window_end=window_end,
            args=args, prelude=prelude, in_desc=in_desc, w_desc=w_desc)
        if lowered is not None:
            return lowered
    if (WINOGRAD or ctx.winograd) and not ctx.tf32 and ctx.float_type == "float" and tuple(K) == (3, 3) and tuple(cell) == (2, 2):
        lowered = winograd.winograd_spec(
            ctx, name, C=C, M=M, pad=pad, in_size=in_size, out_size=out_size, pooled=pooled, in_load=in_load,
            w_load=w_load, row_setup=row_setup, window_begin=window_begin, element=element, window_end=window_end,
            args=args, prelude=prelude, in_desc=in_desc, w_desc=w_desc)
        if lowered is not None:
            return lowered
    KH, KW = K
    IH, IW = in_size
    OH, OW = out_size
    CH, CW = cell
    NCY, NCX = (OH // CH, OW // CW) if pooled else (-(-OH // CH), -(-OW // CW))
    TCY, TCX = min(8, NCY), min(8, NCX)
    CELLS = TCY * TCX
    TOC = 8 if M >= 16 and CH * CW <= 4 else 4
    # channel groups of threads: at least 128 threads where the channels allow, at most 256, and
    # the fewest padded channels (ties: more threads)
    most = max(1, min(-(-M // TOC), 256 // CELLS))
    least = min(most, max(1, -(-128 // CELLS)))
    small_plane = NCY * NCX * CH * CW <= 64        # one block holds the image's whole plane, and it is small
    CG = min(range(least, most + 1), key=lambda g: (
        SPLIT_SMALL_PLANES and small_plane and -(-M // (TOC * g)) < 2,     # then >= 2 blocks per image
        -(-M // (TOC * g)) * TOC * g, -g))
    OCB = TOC * CG
    HH, HW = TCY * CH + KH - 1, TCX * CW + KW - 1
    itemsize = 4 if ctx.float_type == "float" else 8
    # the filter slice's rows padded by 4 or 8 values: the staging's 8 rows x 4 output channels per warp
    # land in 32 different banks, and the rows stay 16-byte aligned for the vector reads
    row_pad = 4 if (OCB // 4) % 2 == 0 else 8    # (OCB + row_pad) / 4 odd: 8 rows apart cover every bank
    OCBP = OCB + row_pad
    per_channel = (HH * HW + KH * KW * OCBP) * itemsize
    if per_channel > SHARED_BUDGET:          # a huge kernel: even one channel's tile does not fit
        return None
    sources = {"in": plain_source(in_load), "w": plain_source(w_load)}
    budget = DOUBLE_BUDGET // 2
    # both tiles copied by cp.async where both are plain; a gathered input tile (a pool/activation
    # gradient) goes through registers (STAGE_LOADS batches) while the filter slice is still copied
    buffers = 2 if (PIPELINE and sources["w"] and (sources["in"] or STAGE_LOADS) and per_channel <= budget
                    and C > 1) else 1
    CC = max(1, min(C, (budget if buffers == 2 else SHARED_BUDGET) // per_channel))
    if buffers == 2 and CC >= C:             # one stage holds every channel: nothing to overlap
        buffers, CC = 1, C
    CC = -(-C // -(-C // CC))                # stages of equal size (16 channels: 2 x 8, not 10 + 6)
    tiles_x, tiles = -(-NCX // TCX), -(-NCX // TCX) * -(-NCY // TCY)
    threads = CELLS * CG

    def batches(iters):
        per = in_batches(iters, STAGE_LOADS) if STAGE_LOADS else 0
        return {"iters": iters, "per": per, "batches": -(-iters // per) if per else 0}
    radices = (CC, HH, HW)       # the input tile, consecutive threads along its rows
    staging = {"in": {"total": math.prod(radices), **batches(-(-math.prod(radices) // threads)),
                      "start": digit_lines("tid", (None,) + radices[1:], lambda d: f"int ind{d}"),
                      "advance": advance_lines("ind", (None,) + radices[1:], threads)}}
    # the filter slice: a warp takes 8 consecutive (channel, offset) values j of 4 output channels
    J = CC * KH * KW
    total = OCB // 4 * -(-J // 8) * 32
    staging["w"] = {"jt": -(-J // 8), "total": total, "J": J, **batches(-(-total // threads))}
    params = {"T": ctx.float_type, "ACC": ctx.float_type, "C": C, "M": M, "OCBP": OCBP, "KH": KH, "KW": KW, "PAD_T": pad[0],
              "PAD_L": pad[1], "IH": IH, "IW": IW, "OH": OH, "OW": OW, "CH": CH, "CW": CW, "NCY": NCY, "NCX": NCX,
              "TCY": TCY, "TCX": TCX, "CELLS": CELLS, "TOC": TOC, "OCB": OCB, "HH": HH, "HW": HW, "CC": CC,
              "TILES": tiles, "TILES_X": tiles_x, "threads": threads, "pooled": pooled, "prelude": prelude,
              "staging": staging, "stage_loads": STAGE_LOADS, "buffers": buffers, "sources": sources,
              "in_load": in_load, "w_load": w_load, "row_setup": row_setup, "window_begin": window_begin,
              "element": element, "window_end": window_end, "in_desc": in_desc, "w_desc": w_desc}
    spec = KernelSpec(name=name, template="direct_conv.cu.j2", params=params, args=args,
                      grid=(ctx.images * tiles, sp.ceiling(sp.Integer(M) / OCB), 1), block=(CELLS * CG, 1, 1),
                      barrier=True)
    return Lowered(kernels=[spec])
