"""3 x 3 direct convolutions by Winograd's F(2x2, 3x3) on the FP32 cores (opt-in: WINOGRAD).

A 2 x 2 output cell of a 3 x 3 convolution is A^T [ sum over channels of (G g G^T) . (B^T d B) ] A,
where d is the cell's 4 x 4 input patch, g the 3 x 3 filter and . the elementwise product of 4 x 4
matrices (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): per cell and
channel pair 16 multiply-adds instead of 36, 2.25x fewer. The sum over channels is 16 independent
products, one per element xi of the 4 x 4 transform domain: M[xi][k][p] = sum over c of U[xi][c][k]
V[xi][c][p] (k: output channel, p: cell), each a GEMM the block tiles in registers.

A small kernel transforms the filter once (U = G g G^T) into scratch, laid out as the blocks stage it
(one contiguous chunk per block of OCB output channels and stage of CC input channels), so a stage's
filter is 16-byte cp.async copies without index arithmetic. The convolution stages each input patch
through registers, transforms it (B^T d B: additions only) and stores the 16 values; per stage of CC
channels a thread holding (xi, 8 output channels, 16 cells) reads 2 + 4 float4 from shared memory for
128 multiply-adds. The stages are double-buffered: the next stage's filter copies and input loads are
in flight while this one multiplies. The epilogue gathers each (channel, cell)'s 16 sums through
shared memory (8 output channels at a time), applies A^T M A and then exactly the direct kernel's
epilogue lines: a cell is one 2 x 2 pooling window, so bias, activation, pool and argmax codes run in
registers as there.

A block covers up to 8 x 8 cells of one image, or whole small planes of several images (vgg's 8 x 8
layers: 16 cells, 2 images a block), so that each block multiplies 32 or more cells by every filter chunk it
copies (the transformed filter, 16 values per (k, c), is read by every block from L2: its traffic per
multiply-add falls with the cells per block).

Eligible: FP32 (not float64, not TF32), a 3 x 3 filter, 2 x 2 cells (a 2 x 2 pool or none), at least
LEAST_CHANNELS input and LEAST_OUTPUTS output channels. Rounding: the transforms add and subtract
(and halve) values before the products; the error stays within a few FP32 ulps of the terms' size
(tests compare with NumPy at the direct kernel's tolerance)."""
from __future__ import annotations

import re

import sympy as sp

from ..spec import Arg, KernelSpec, Lowered, Value
from . import c_int, direct_tf32

OCB = 32            # output channels per block (4 groups of 8 per transform element)
# cells per block where a block holds whole small planes (several images): each filter chunk a block
# copies from L2 serves this many cells (64: half the L2 traffic of 32, half the blocks: vgg's 8 x 8
# layers at batch 64 would run 64 blocks on 132 SMs)
CELLS_PER_BLOCK = 32
# an input gathered through a pool/activation gradient (a conv-ReLU-pool layer's backward-data) costs
# 16 gathers per patch, each element gathered by up to 4 overlapping patches (sm_90: 51% FFMA a stage
# against 75% for a plain input); False: such convolutions stay direct (the direct kernel gathers each
# element once per block). Untimed either way: `--variants` "Winograd, direct for gathered inputs"
GATHERED = True
CC = 4              # input channels per stage
LEAST_CHANNELS = 4  # fewer: the direct kernel (a stage would be mostly zeros)
LEAST_OUTPUTS = 16


def winograd_spec(ctx, name, *, C, M, pad, in_size, out_size, pooled, in_load, w_load, row_setup, window_begin,
                  element, window_end, args, prelude="", in_desc="", w_desc=""):
    """The two kernels (filter transform, convolution) of a 3 x 3 direct convolution by F(2x2, 3x3),
    or None where it does not apply."""
    OH, OW = out_size
    NCY, NCX = (OH // 2, OW // 2) if pooled else (-(-OH // 2), -(-OW // 2))
    if C < LEAST_CHANNELS or M < LEAST_OUTPUTS or NCY == 0 or NCX == 0:
        return None
    TCY, TCX = min(8, NCY), min(8, NCX)
    CELLS = TCY * TCX
    TILES_X = -(-NCX // TCX)
    TILES = TILES_X * -(-NCY // TCY)
    IMGS = max(1, CELLS_PER_BLOCK // CELLS) if TILES == 1 else 1      # small planes: several images per block
    PT = -(-CELLS * IMGS // 16)                          # groups of 16 cells (a thread's share of a row of M)
    P = 16 * PT
    threads = 64 * PT                                    # 16 transform elements x 4 channel groups x PT
    STAGES = -(-C // CC)
    MB = -(-M // OCB)
    U_STAGE, V_STAGE = 16 * CC * OCB, 16 * CC * P
    key = ctx.scratch_key("wino_filter")
    total_u = MB * STAGES * U_STAGE
    filter_spec = KernelSpec(
        name=name + "_wino_filter", template="winograd_filter.cu.j2",
        params={"C": C, "M": M, "OCB": OCB, "CC": CC, "STAGES": STAGES, "w_load": w_load, "w_desc": w_desc,
                "total": total_u, "threads": 256},
        args=[a for a in args if a.value is not None and not a.writes and _uses(a, w_load)]
        + [Arg("float*", "ut", key), Arg("int", "batch")],
        grid=(-(-total_u // 256), 1, 1), block=(256, 1, 1))
    plain = direct_tf32.PLAIN_NCHW.match(in_load[0]) if len(in_load) == 1 else None
    array = plain.group(1) if plain and [int(v) for v in plain.group(2, 3, 4)] == [C, *in_size] else None
    if array is None and not GATHERED:
        return None
    body = in_load + row_setup + window_begin + element + window_end
    reads = [a for a in args if a.value is not None and not a.writes and _uses(a, body)]
    conv_args = reads + [Arg("const float*", "ut", key)] + [a for a in args if a.writes] + [Arg("int", "batch")]
    params = {"T": "float", "ACC": "float", "winograd": True, "IMAGES": c_int(ctx.images), "C": C, "M": M, "OCB": OCB,
              "CC": CC, "STAGES": STAGES,
              "PAD_T": pad[0], "PAD_L": pad[1], "IH": in_size[0], "IW": in_size[1], "OH": OH, "OW": OW,
              "NCY": NCY, "NCX": NCX, "TCY": TCY, "TCX": TCX, "CELLS": CELLS, "TILES": TILES, "TILES_X": TILES_X,
              "IMGS": IMGS, "PT": PT, "P": P, "array": array, "threads": threads, "U_STAGE": U_STAGE, "V_STAGE": V_STAGE,
              "BUF": U_STAGE + V_STAGE, "SMEM": max(2 * (U_STAGE + V_STAGE), 16 * 8 * P), "pooled": pooled,
              "prelude": prelude, "in_load": in_load, "row_setup": row_setup, "window_begin": window_begin,
              "element": element, "window_end": window_end, "in_desc": in_desc, "w_desc": w_desc}
    conv_spec = KernelSpec(name=name + "_wino", template="winograd_conv.cu.j2", params=params, args=conv_args,
                           grid=(sp.ceiling(ctx.images / sp.Integer(IMGS)) * TILES, MB, 1), block=(threads, 1, 1),
                           barrier=True)
    return Lowered(kernels=[filter_spec, conv_spec], scratch={key: Value((total_u,), ctx.dtype)})


def _uses(arg, lines) -> bool:
    return re.search(rf"\b{arg.name}\b", " ".join(lines)) is not None
