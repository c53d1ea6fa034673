"""Direct 2-D convolutions on TF32 tensor cores (`tf32=True`): the same tiles as direct.py (the input
tile with its halo and the filter slice in shared memory, the same epilogues), multiplied by warp-wide
mma.sync m16n8k8 instead of FP32 multiply-adds.

The product is an implicit GEMM whose im2col lives in the shared-memory addresses only: for a kernel
offset (r, s) and 8 input channels, A is the filter slice (16 output channels x 8 channels) and B the
input tile shifted by (r, s) (8 channels x 8 consecutive output columns of one row), both plain strided
views of the staged tiles, so a fragment is 4 (A) or 2 (B) shared loads with no index arithmetic. A
warp holds FM x FN tiles of 16 x 8; its n-tiles come in row pairs, so each lane's accumulators are whole
2 x 2 cells (lane 4g + t: output channels g and g + 8, columns 2t and 2t + 1 of both rows), and the
bias, activation and 2 x 2 pool run in registers as in the FP32 kernel. Operands are rounded to TF32
(cvt.rna) once, when staged; the channel strides of both tiles are 8 mod 16 words, so a fragment's 32
lanes read 32 different banks.

Eligible: 2 x 2 cells (a 2 x 2 max/avg pool, or none), at least TF32_LEAST_CHANNELS input channels (the
depth per kernel offset is padded to 8: a 1- or 3-channel first layer stays on the FP32 cores)."""
from __future__ import annotations

import re

import sympy as sp

from ..spec import Arg, KernelSpec, Lowered, Value
from . import advance_lines, digit_lines, in_batches

LEAST_CHANNELS = 8           # fewer input channels: the FP32 direct kernel (k-steps of 8 would be mostly zeros)
SHARED_BUDGET = 40 * 1024    # static shared memory per block, one buffer
MOST_HOISTED = 24           # input elements per thread and stage whose offsets stay in registers across stages
MOST_ACC = 64                # accumulator registers per lane (FM x FN x 4)
# cost model (cycles of one SM sub-scheduler): an m16n8k8 TF32 mma occupies the tensor pipe ~4 cycles;
# a warp's shared loads are served one wavefront per SM clock, shared by 4 schedulers, so each
# fragment load costs ~4 cycles of a scheduler's share; a staged element ~6 instructions of a thread
MMA_CYCLES = 4
LOAD_CYCLES = 4
STAGE_INSTRUCTIONS = 6
# stages double-buffered where a plain input's offsets stay in registers and both buffers fit in
# DOUBLE_BUDGET: the next stage's filter copies (cp.async) and input loads (into registers) are in
# flight while the current stage multiplies, one barrier per stage; a shape that cannot is charged
# SINGLE_PENALTY for the load latency its blocks then wait out (untimed guesses, both: `bench_gpu.py
# --variants --tf32` times "TF32 direct: one buffer")
PIPELINE = True
DOUBLE_BUDGET = 46 * 1024
SINGLE_PENALTY = 1.25


PLAIN_NCHW = re.compile(r"^v = (\w+)\[\(\(bimg \* (\d+) \+ c\) \* (\d+)LL \+ iy\) \* (\d+) \+ ix\];$")


def eight_mod_16(n: int) -> int:
    """The least stride >= n that is 8 mod 16 words: the 4 k-rows of a fragment 8 or 24 banks apart."""
    return n + (8 - n % 16) % 16


def shapes(C, M, NCY, NCX, KH, KW, plain=True):
    """Every (cost, ...) block shape: OCB output channels (FM m-tiles per warp), a tile of RT x CT
    output positions (WR row pairs x WS runs of 8 columns per warp), CC input channels a stage, one
    or two buffers (`plain`: the input is a tensor, not a gathered gradient, so it may be pipelined)."""
    CP = -(-C // 8) * 8
    out = []
    for OCB in (16, 32, 64, 128):
        if OCB > max(16, -(-M // 16) * 16):
            continue
        for FM in (1, 2, 4):
            if OCB % (16 * FM):
                continue
            for WR, WS in ((1, 1), (2, 1), (1, 2), (4, 1), (2, 2)):
                FN = 2 * WR * WS
                if FM * FN * 4 > MOST_ACC:
                    continue
                for ny in (1, 2, 4):
                    for nx in (1, 2, 4):
                        RT, CT = 2 * WR * ny, 8 * WS * nx
                        warps = OCB // (16 * FM) * ny * nx
                        if not 2 <= warps <= 8 or RT // 2 > -(-NCY // WR) * WR or CT // 2 > -(-NCX // (4 * WS)) * 4 * WS:
                            continue
                        HH, HW = RT + KH - 1, CT + KW - 1
                        OCBP = OCB + 4               # staging stores: 8 consecutive offsets 4 banks apart
                        CSP, CWS = eight_mod_16(HH * HW), eight_mod_16(KH * KW * OCBP)
                        per8 = 8 * 4 * (CSP + CWS)
                        if per8 > SHARED_BUDGET:
                            continue
                        CC = 8 * min(CP // 8, SHARED_BUDGET // per8)
                        stages = -(-CP // CC)
                        CC = 8 * -(-CP // 8 // stages)     # stages of equal size
                        threads = 32 * warps
                        iters = -(-CC * HH * HW // threads)
                        # a plain input's offsets computed once where they are few and serve several stages
                        # (with one stage there is nothing to save, and ptxas spilled two such kernels)
                        hoisted = plain and iters <= MOST_HOISTED and stages > 1
                        buffers = 2 if PIPELINE and hoisted and 2 * CC * 4 * (CSP + CWS) <= DOUBLE_BUDGET else 1
                        tiles = -(-NCY // (RT // 2)) * -(-NCX // (CT // 2))
                        blocks = tiles * -(-M // OCB)
                        mma = blocks * (OCB // 16) * (RT * CT // 8) * (CP // 8) * KH * KW
                        loads = (4 * FM + 2 * FN) / (FM * FN)      # shared loads per mma
                        staged = blocks * CP * (HH * HW + KH * KW * OCB)
                        cost = mma * max(MMA_CYCLES, LOAD_CYCLES * loads) + staged * STAGE_INSTRUCTIONS / 32
                        cost *= SINGLE_PENALTY if buffers == 1 and stages > 1 else 1
                        out.append(((blocks < 2, cost, -warps, -OCB),
                                    dict(OCB=OCB, FM=FM, WR=WR, WS=WS, FN=FN, RT=RT, CT=CT, WARPS_M=OCB // (16 * FM),
                                         WARPS_X=nx, warps=warps, buffers=buffers, iters=iters, hoisted=hoisted, stages=stages, HH=HH, HW=HW, OCBP=OCBP, CSP=CSP, CWS=CWS, CC=CC,
                                         CP=CP, TCY=RT // 2, TCX=CT // 2, TILES_X=-(-NCX // (CT // 2)), TILES=tiles)))
    return out


def tf32_spec(ctx, name, *, C, M, K, pad, in_size, out_size, pooled, in_load, w_load, row_setup, window_begin,
              element, window_end, args, prelude="", in_desc="", w_desc=""):
    """The kernels of a direct convolution on the tensor cores (2 x 2 cells), or None where it does not
    apply (the FP32 direct kernel then): a small kernel that rearranges the filter (TF32-rounded, in
    the order a block stages it) into scratch, then the convolution, which copies its filter stages
    from there by 16-byte cp.async and stages the input tile through registers (rounded once)."""
    KH, KW = K
    OH, OW = out_size
    NCY, NCX = (OH // 2, OW // 2) if pooled else (-(-OH // 2), -(-OW // 2))
    if C < LEAST_CHANNELS or NCY == 0 or NCX == 0:
        return None
    plain = PLAIN_NCHW.match(in_load[0]) if len(in_load) == 1 else None
    plain = plain if plain and [int(v) for v in plain.group(2, 3, 4)] == [C, *in_size] else None
    candidates = shapes(C, M, NCY, NCX, KH, KW, plain is not None)
    if not candidates:
        return None
    shape = min(candidates, key=lambda c: c[0])[1]
    threads = 32 * shape["warps"]
    OCB, CC, CP, HH, HW = shape["OCB"], shape["CC"], shape["CP"], shape["HH"], shape["HW"]
    MP = -(-M // OCB) * OCB
    iters, stages = shape["iters"], shape["stages"]
    radices = (None, HH, HW)                        # the input tile, consecutive threads along its rows
    staging = {"total": CC * HH * HW, "iters": iters, "per": in_batches(iters, 16),   # at most 16 loads in flight
               "start": digit_lines("tid", radices, lambda d: f"int ind{d}"),
               "advance": advance_lines("ind", radices, threads),
               # a plain NCHW input's offsets, the same at every stage, computed once into registers
               "array": plain.group(1) if shape["hoisted"] else None}
    key = ctx.scratch_key("tf32_filter")
    total_w = MP // OCB * stages * CC * shape["CWS"]     # chunks of (output channel block, stage), as staged
    filter_spec = KernelSpec(
        name=name + "_tf32_filter", template="direct_filter_tf32.cu.j2",
        params={"tf32": True, "C": C, "M": M, "KH": KH, "KW": KW, "OCB": OCB, "OCBP": shape["OCBP"], "CWS": shape["CWS"], "CC": CC,
                "STAGES": stages, "w_load": w_load, "w_desc": w_desc, "total": total_w, "threads": 256},
        args=[a for a in args if a.value is not None and not a.writes and re.search(rf"\b{a.name}\b", " ".join(w_load))]
        + [Arg("float*", "wt", key), Arg("int", "batch")],
        grid=(-(-total_w // 256), 1, 1), block=(256, 1, 1))
    body = " ".join(in_load + row_setup + window_begin + element + window_end)
    reads = [a for a in args if a.value is not None and not a.writes and re.search(rf"\b{a.name}\b", body)]
    conv_args = reads + [Arg("const float*", "wt", key)] + [a for a in args if a.writes] + [Arg("int", "batch")]
    params = {"T": "float", "ACC": "float", "tf32": True, "C": C, "M": M, "STAGES": stages, "KH": KH, "KW": KW,
              "PAD_T": pad[0], "PAD_L": pad[1], "IH": in_size[0], "IW": in_size[1], "OH": OH, "OW": OW, "CH": 2,
              "CW": 2, "NCY": NCY, "NCX": NCX, "threads": threads, "pooled": pooled, "prelude": prelude,
              "staging": staging, "in_load": in_load, "row_setup": row_setup, "window_begin": window_begin,
              "element": element, "window_end": window_end, "in_desc": in_desc, "w_desc": w_desc, **shape}
    conv_spec = KernelSpec(name=name + "_tf32", template="direct_conv_tf32.cu.j2", params=params, args=conv_args,
                           grid=(ctx.images * shape["TILES"], sp.ceiling(sp.Integer(M) / OCB), 1),
                           block=(threads, 1, 1), barrier=True)
    return Lowered(kernels=[filter_spec, conv_spec], scratch={key: Value((total_w,), ctx.dtype)})


def ideal(C, M, NCY, NCX, KH, KW, plain=True) -> dict:
    """The chosen block shape (for tests and reports)."""
    return min(shapes(C, M, NCY, NCX, KH, KW, plain), key=lambda c: c[0])[1]

