"""Depthwise 2-D convolutions (groups = input channels, one input channel per group; any stride,
dilation and zero padding, a channel multiplier), without the GEMM.

The implicit GEMM gives each group its own product: M = the multiplier (usually 1) rows against a
tile of at least 16, so 15 of every 16 multiply-adds were thrown away and three of every four
threads held rows past M; and its k-steps gathered each input value KH x KW times from global
memory. Here a block stages CB channels' input tile with its halo in shared memory once (coalesced
rows, zeros outside the input) and each thread computes PX outputs of one row of one channel, the
filter's KH x KW values read once per thread and used for all PX. A thread's outputs are TXT
columns apart, so a warp's shared reads at one filter offset are consecutive words (no bank
conflicts at stride 1), its stores consecutive outputs. Small planes put several channels in one
block, so that a 7 x 7 plane does not run 49-thread blocks. The input gradient is the same kernel:
at stride 1 a correlation of dy with the flipped filters; strided, each dx position gathers the
taps whose dy position is whole from a tile of dy (`gather`). The epilogue (bias, the activation
chain) is the GEMM family's, per output. Memory-bound: no tensor cores, no double buffering (each
block stages one tile; the SM's other blocks cover its loads).
"""
from __future__ import annotations

import sympy as sp

from ..spec import KernelSpec, Lowered
from . import c_int

# depthwise 2-D convolutions by this kernel; False: the implicit GEMM (gemm.py), as before session 10
ENABLED = True
THREADS_MOST = 256
SHARED_BUDGET = 40 * 1024      # bytes of static shared memory per block (48 KiB is the static limit)
PX_MOST = 4                    # outputs per thread along a row
# weight gradients: the most weight sums a thread keeps in registers (multiplier x filter offsets; more:
# the GEMM)
WGRAD_SUMS_MOST = 64
# blocks wanted in all (8 per multiprocessor of an H100/H200: each block waits for its own tiles'
# loads between two barriers, so the SM needs several; a 7 x 7 x 1024 layer at batch 64 ran 205
# blocks of 64 tiles each at the first version), and the fewest positions a thread adds before its
# block writes partial sums (the closing tree of additions is paid once per block)
WGRAD_BLOCKS = 132 * 8
WGRAD_LEAST_POSITIONS = 16
# weight gradients double-buffered where both buffers fit in SHARED_BUDGET at the one-buffer tiling:
# the next unit's tiles copied by cp.async while the block computes this one (the one-buffer kernel
# waited for its own loads between two barriers: latency-bound on small planes); 1: one buffer
WGRAD_BUFFERS = 2


def eligible(geo, pool) -> bool:
    """2-D, one input channel per group and every channel a group (depthwise, any multiplier), no
    fused pool (a pooled depthwise chain stays on the GEMM)."""
    return (ENABLED and geo["nd"] == 2 and geo["Cg"] == 1 and geo["groups"] == geo["C"] and geo["groups"] > 1
            and not pool)


def extent(outputs, K, stride, dil, gather):
    """Rows (or columns) of the staged tile for `outputs` rows of outputs: a correlation's input rows
    with the halo, or for a strided conv's input gradient (`gather`) dy's rows that reach them."""
    if gather:
        return (outputs - 1 + (K - 1) * dil + stride - 1) // stride + 1
    return (outputs - 1) * stride + (K - 1) * dil + 1


def tiling(C, per, out_size, K, stride, dil, itemsize, dy_planes=0, gather=False, buffers=1) -> dict | None:
    """Threads along a row (TXT), rows (TYT) and channels (CB) per block, outputs per thread (PX),
    and the staged tile (`per` staged channels per computed channel, IHT x IWT each, and
    `dy_planes` TYT x TW tiles of dy per channel for a weight gradient); None when one row's tile
    does not fit. `gather`: the outputs are a strided conv's dx, the tile dy's (see `extent`)."""
    OH, OW = out_size
    PX = min(PX_MOST, -(-OW // 32))
    columns = -(-OW // PX)               # threads a row takes; a row wider than 32 x PX_MOST: tiles of it
    TXT = -(-columns // -(-columns // 32))          # tiles of equal width (150 columns: 2 x 19 x 4, not 32 + 6)
    rows = min(OH, max(1, THREADS_MOST // TXT))
    TYT = -(-OH // -(-OH // rows))                  # and of equal height (28 rows: 4 x 7, not 9 + 9 + 9 + 1)
    CB = max(1, min(C, THREADS_MOST // (TXT * TYT)))
    TW = TXT * PX
    IWT = extent(TW, K[1], stride[1], dil[1], gather)
    while True:
        IHT = extent(TYT, K[0], stride[0], dil[0], gather)
        if buffers * CB * (per * IHT * IWT + dy_planes * TYT * TW) * itemsize <= SHARED_BUDGET:
            break
        if CB > 1:
            CB = max(1, CB // 2)
        elif TYT > 1:
            TYT = max(1, TYT // 2)
        else:
            return None
    return {"PX": PX, "TXT": TXT, "TYT": TYT, "CB": CB, "CBS": CB * per, "TW": TW, "IHT": IHT, "IWT": IWT,
            "TILES_X": -(-OW // TW), "TILES_Y": -(-OH // TYT), "NCB": -(-C // CB), "threads": CB * TYT * TXT}


def depthwise_spec(ctx, name, *, C, mult, in_size, out_size, K, stride, dil, pad, row_setup, element, args,
                   data=False, prelude=""):
    """The KernelSpec of one depthwise correlation with its epilogue (`element`: C text reading the
    sum `c`, the image `bimg`, the position `p`, its coordinates q_0, q_1 and the row setup's `mg`),
    or None when its tile does not fit in shared memory (the caller then uses the GEMM).
    Forward: C input channels x, each giving `mult` outputs. `data`: the input gradient of a
    depthwise conv, dx of C channels from dy's C x mult (each channel's `mult` planes summed); at
    stride 1 the caller gives stride 1 and padding (K - 1) x dilation - pad (a correlation with the
    flipped filters), at a larger stride the conv's own stride and padding: each dx position then
    gathers the taps whose dy position is whole (dx[y] = sum over r of w[r] dy[(y + pad - r*dil) /
    stride]), from a tile of dy, not through the GEMM (179 registers at 56 x 56, stride 2)."""
    itemsize = 4 if ctx.float_type == "float" else 8
    gather = data and any(st > 1 for st in stride)
    t = tiling(C, mult if data else 1, out_size, K, stride, dil, itemsize, gather=gather)
    if t is None:
        return None
    tiles = t["TILES_X"] * t["TILES_Y"] * t["NCB"]
    params = dict(t, T=ctx.float_type, ACC=ctx.float_type, C=C, MULT=mult, SC=C * mult if data else C,
                  SRC="dy" if data else "x", data=data, gather=gather, IH=in_size[0], IW=in_size[1], OH=out_size[0],
                  OW=out_size[1], KH=K[0], KW=K[1], SY=stride[0], SX=stride[1], DY=dil[0], DX=dil[1], PT=pad[0],
                  PL=pad[1], TILES=t["TILES_X"] * t["TILES_Y"], unroll=K[0] * K[1] * t["PX"] <= 256,
                  row_setup=row_setup, element=element, prelude=prelude)
    spec = KernelSpec(name=name, template="depthwise_conv.cu.j2", params=params, args=args,
                      grid=(sp.Integer(tiles) * ctx.images, 1, 1), block=(t["threads"], 1, 1), barrier=True)
    return Lowered(kernels=[spec])


def wgrad_spec(ctx, name, *, C, mult, in_size, out_size, K, stride, dil, pad, args):
    """The first pass of a depthwise weight gradient (partial sums per block of tiles) and the
    number of splits S (sympy, in BATCH), or None where a thread's weight sums would not fit in
    registers or the tiles in shared memory (the caller then uses the GEMM)."""
    if mult * K[0] * K[1] > WGRAD_SUMS_MOST:
        return None
    itemsize = 4 if ctx.float_type == "float" else 8
    t = tiling(C, 1, out_size, K, stride, dil, itemsize, dy_planes=mult)
    if t is None:
        return None
    buffers = 1
    if WGRAD_BUFFERS == 2 and tiling(C, 1, out_size, K, stride, dil, itemsize, dy_planes=mult, buffers=2) == t:
        buffers = 2     # both buffers fit at the same tiles (a smaller tile for them: more halo, not timed)
    tiles = t["TILES_X"] * t["TILES_Y"]
    # the batch's (image, tile) items in splits of `per` (the template computes it the same way): about
    # WGRAD_BLOCKS blocks over the channel blocks, each at least `least` items
    items = ctx.images * tiles
    least = max(1, -(-WGRAD_LEAST_POSITIONS // t["PX"]))
    splits = max(1, -(-WGRAD_BLOCKS // t["NCB"]))
    S = sp.ceiling(items / sp.Max(least, sp.ceiling(items / splits)))
    # the closing sums: every weight of a thread at once where shared memory holds them (one round)
    free = max(buffers * t["CB"] * (t["IHT"] * t["IWT"] + mult * t["TYT"] * t["TW"]), SHARED_BUDGET // itemsize)
    RJ = min(mult * K[0] * K[1], free // t["threads"])
    per_channel = t["TYT"] * t["TXT"]
    half = 1 << max(0, (per_channel - 1).bit_length() - 1)
    params = dict(t, T=ctx.float_type, ACC=ctx.float_type, C=C, MULT=mult, IH=in_size[0], IW=in_size[1],
                  OH=out_size[0], OW=out_size[1], KH=K[0], KW=K[1], SY=stride[0], SX=stride[1], DY=dil[0],
                  DX=dil[1], PT=pad[0], PL=pad[1], TILES=tiles, ITEMS=c_int(items),
                  items_text=str(items).replace("batch", "N"), least=least, splits=splits, RJ=RJ, HALF=half,
                  STEPS=half.bit_length() if per_channel > 1 else 0, buffers=buffers)
    spec = KernelSpec(name=name + "_partial", template="depthwise_wgrad.cu.j2", params=params, args=args,
                      grid=(t["NCB"] * S, 1, 1), block=(t["threads"], 1, 1), barrier=True)
    return spec, S
