"""The weight gradient of a direct 2-D convolution (stride 1, dilation 1, one group, a filter at
least 3 wide), without im2col:

    dw[m, c, r, s] = sum over b, y, x of g[b, m, y, x] * x[b, c, y - pad_t + r, x - pad_l + s]

A block owns MB output channels x CB input channels x every filter offset and walks tiles of output
positions (RB rows x WB columns of one image): per tile it copies g's tile and x's tile with its halo
into shared memory, then each thread runs along the rows of its tile holding TM output channels x
RT filter rows x KW filter columns of one input channel in registers. Along a row the KW input values
a thread needs slide by one column per position, so a position costs one shared read per filter row
plus TM/4 vector reads of g for TM x RT x KW multiply-adds. The batch's tiles are split over blocks
(partial sums, added in a fixed order by the split-K reduce kernel: no float atomics). A gathered
g (a fused pool/activation gradient) is computed while its tile is loaded.

The implicit GEMM this replaces (gemm.py) gathered x's im2col columns from global memory per
k-step: its integer work (sass_mix.py: 140-250 of 500-900 main-loop instructions) held it at about
half the FP32 peak.
"""
from __future__ import annotations

import functools
import math

import sympy as sp

from ..spec import KernelSpec
from . import c_int, direct_wgrad_tf32
from .direct import plain_source

# stride-1 2-D convolutions' weight gradients by this kernel where eligible; False: the im2col GEMM
ENABLED = True
# under tf32=True, those with a plain g (not a gathered pool/activation gradient), >= 8 input channels
# and a filter of at most 9 offsets on the TF32 tensor cores (direct_wgrad_tf32.py); False: FP32 here
TF32 = True
# static shared memory per block: the two tiles, or the block's partial sums on the way out
SHARED_BUDGET = 46 * 1024
# tiles double-buffered where g is a plain copy: the next tile's cp.async copies in flight while the
# block computes the current one, each buffer in half the shared budget (shorter tiles, more halo
# copies); False: one buffer, a block waiting for its own tile while the SM's other blocks compute
# (neither timed on a GPU yet: `bench_gpu.py --variants` times the other)
PIPELINE = False
# a gathered g (a fused ReLU/max-pool gradient) staged a pooling window per gather (its code, aux and
# dy loaded once, the window's positions written from them) where the tiles can be aligned to the
# windows; False: every position of the tile gathers (4 loads and the index arithmetic each)
WINDOW_GATHER = True
# threads wanted per multiprocessor of an H100/H200 (132 of them): 16 warps, four 128-thread blocks
# (128 registers each), so that one block's copies are covered by the others' multiply-adds (a block
# waits for its own tile's copies); the splits are sized to that. More blocks each write a whole
# partial tile that the reduce kernel reads back
THREADS_PER_SM = 512
# the fewest output positions a block adds before writing its partial sums (each partial value is
# written once and read once by the reduce)
LEAST_POSITIONS = 256
# a thread's live values in the main loop at most, in 4-byte registers: accumulators, the sliding
# inputs and a position's g values (128 registers per thread in all; float64 counts twice; the
# addresses and the unrolled pass need the rest: 9-column float64 filters spilled at 128 with
# accumulators alone counted)
LIVE_MOST = 90
# less where more lives beside them: a per-position gather of g (its batch of values and the gather's
# temporaries), and float64 (64-bit addresses and pairs): a random-shape sweep spilled at 128 with
# 89 (3 x 3, gathered per position) and 88 (float64 4 x 4) live
LIVE_GATHER, LIVE_F64 = 74, 76
# the block-shape search's weights, in multiply-adds of issue: a shared read of a tile, a cp.async of one
# element from global memory (address arithmetic included), a gathered g value (3 loads, its code's
# comparison, the pooled index)
SHARED_READ_COST, COPY_COST, GATHER_COST = 2, 8, 25


def eligible(geo) -> bool:
    """2-D, stride 1, dilation 1, one group, a filter at least 3 columns wide (narrower filters
    reuse too little along a row; the GEMM takes them)."""
    return (geo["nd"] == 2 and geo["groups"] == 1 and all(s == 1 for s in geo["stride"])
            and all(d == 1 for d in geo["dil"]) and geo["Kr"][1] >= 3)


def row_tiling(OW, align=1):
    """(WB, OXU, WBP): tile width (<= 32 columns, a multiple of `align`), the positions unrolled in
    one pass (8-16, the fewest padded columns, then the longest pass) and the padded tile width (a
    whole number of passes, a multiple of `align`; padded columns read g as 0); None if no pass fits."""
    tiles = -(-OW // 32)
    while True:
        WB = -(-(-(-OW // tiles)) // align) * align
        if WB <= 32 or WB <= align:
            break
        tiles += 1
    if WB <= 16:
        return WB, WB, WB
    passes = [u for u in range(8, 17) if -(-WB // u) * u % align == 0]
    if not passes:
        return None
    OXU = min(passes, key=lambda u: (-(-WB // u) * u, -u))
    return WB, OXU, -(-WB // OXU) * OXU


def thread_tiles(KH, KW, itemsize, live_most):
    """The (TM, RT) a thread may hold: output channels (4 or 8: whole vector reads of g) and filter
    rows (a divisor of KH), within live_most registers of live values (accumulators, sliding inputs,
    a position's g values); the block-shape search weighs them (fewer channels per thread can mean
    more threads where channels are few)."""
    return [(TM, RT) for TM in (8, 4) for RT in range(KH, 0, -1)
            if KH % RT == 0 and (TM * RT * KW + RT * KW + TM) * itemsize // 4 <= live_most]


def wavefronts(addresses) -> int:
    """Shared-memory wavefronts of one warp's 4-byte reads (distinct words per bank, at most)."""
    banks = {}
    for a in addresses:
        banks.setdefault(a % 32, set()).add(a)
    return max(len(v) for v in banks.values())


def block_shape(*, C, M, KH, KW, OH, OW, itemsize, buffers=1, align=(1, 1), gather=False):
    """(see _block_shape) `align`: tiles whose rows and columns are multiples of a pooling window's,
    so that a gathered g is staged a whole window per gather; None where the columns cannot be.
    `gather`: g gathered per position (fewer registers left for the thread's tile)."""
    live = min(LIVE_MOST, LIVE_GATHER if gather else LIVE_MOST, LIVE_F64 if itemsize == 8 else LIVE_MOST)
    return _block_shape(C, M, KH, KW, OH, OW, itemsize, buffers, tuple(align), SHARED_BUDGET, live)


@functools.lru_cache(maxsize=None)
def _block_shape(C, M, KH, KW, OH, OW, itemsize, buffers, align, shared_budget, live_most):
    """The block's channels, position groups and tile rows: the least estimated issue (padded
    multiply-adds, shared reads with their bank conflicts averaged over the block's warps, copies;
    blocks of fewer than 128 threads and partial warps charged for the latency they leave uncovered)
    within 256 threads and the shared budget. Threads are numbered input channel fastest, then
    filter-row group, output-channel group, position group (PG groups of threads take the tile's rows
    in turns, their sums added at the end)."""
    tiling = row_tiling(OW, align[1])
    if tiling is None:
        return None
    WB, OXU, WBP = tiling
    V = 16 // itemsize
    KK = KH * KW
    XW = WBP + KW - 1                # columns of the x tile
    XWS = XW | 1                     # its row stride, odd: threads on different rows of one channel hit different banks
    budget = shared_budget // itemsize
    best = None
    for TM, RT, MG in ((TM, RT, MG) for TM, RT in thread_tiles(KH, KW, itemsize, live_most)
                       for MG in range(1, min(-(-M // TM), 64 // TM) + 1)):
        RG = KH // RT
        MB = MG * TM
        MBP = MB + 4 if MB % 8 == 0 else MB      # (row, col) rows of g 4 words apart mod 32 (bank-free staging)
        for CB in range(1, min(C, 64) + 1):
            if MG * CB * RG > 256:
                break
            for PG in range(1, min(16, OH) + 1):
                threads = MG * CB * RG * PG
                if threads > 256:
                    break
                waste = -(-threads // 32) * 32 / threads * (1.5 if threads < 64 else 1.25 if threads < 128 else 1)
                least = -(-M // MB) * -(-C // CB) * MB * CB * KK * OH * -(-OW // WB) * WBP * waste
                if best is not None and round(least) > best[0][0]:     # its multiply-adds alone cost more
                    continue
                rows = [RB for RB in range(PG, -(-OH // align[0]) * align[0] + 1) if RB % align[0] == 0
                        and buffers * stage_size(RB * WBP * MBP + CB * xs(RB + KH - 1, XWS)) <= budget
                        and PG * MB * CB * KK <= budget]
                if not rows:
                    continue
                # rows computed per image: a position group takes every PG-th row of a tile
                RB = min(rows, key=lambda rb: (-(-OH // rb) * -(-rb // PG) * PG, -rb))
                XS = xs(RB + KH - 1, XWS)
                waves = sum(wavefronts([(t % CB) * XS + ((t // CB % RG) * RT + t // (CB * RG * MG)) * XWS
                                        for t in range(w, min(w + 32, threads))])
                            for w in range(0, threads, 32)) / -(-threads // 32)
                tiles = -(-M // MB) * -(-C // CB)
                rows_pad, cols_pad = -(-OH // RB) * -(-RB // PG) * PG, -(-OW // WB) * WBP
                fma = tiles * MB * CB * KK * rows_pad * cols_pad
                reads = fma / (TM * RT * KW) * (TM / V + RT * waves)
                copies = tiles * (-(-OH // RB)) * (-(-OW // WB)) * (RB * WBP * MB + CB * (RB + KH - 1) * XW)
                cost = (fma + SHARED_READ_COST * reads + COPY_COST * copies) * (-(-threads // 32) * 32 / threads)
                cost *= 1.5 if threads < 64 else 1.25 if threads < 128 else 1   # fewer warps to hide latency
                key = (round(cost), -TM * RT, PG, -threads, MB, CB)
                if best is None or key < best[0]:
                    best = (key, dict(TM=TM, RT=RT, RG=RG, MG=MG, MB=MB, MBP=MBP, CB=CB, PG=PG, RB=RB, WB=WB,
                                      OXU=OXU, WBP=WBP, XW=XW, XWS=XWS, XR=RB + KH - 1, XS=XS, threads=threads,
                                      V=V, cost=key[0]))
    return best[1] if best else None


def stage_size(words):
    """A buffer's elements, rounded up to 4 (16 bytes of float, 32 of double: the second buffer's g
    tile is read as vectors)."""
    return -(-words // 4) * 4


def xs(XR, XWS):
    """A channel's stride in the x tile: odd, so 32 threads reading one (row, column) of 32 channels
    hit 32 banks."""
    return XR * XWS + (1 - XR * XWS % 2)


def split_plan(images, tiles, positions, threads, blocks_mc):
    """(items, least, splits, S): the batch's tiles (`positions` each), the fewest a split takes, the
    splits wanted (blocks of `threads` for THREADS_PER_SM an SM over the `blocks_mc` channel blocks; 1
    where those are enough) and their number S in BATCH, as the template computes it."""
    items = images * tiles
    least = -(-LEAST_POSITIONS // positions)
    wanted = max(1, -(-132 * THREADS_PER_SM // (-(-threads // 32) * 32)))   # blocks in all
    splits = -(-wanted // blocks_mc)
    S = sp.Integer(1) if splits == 1 else sp.ceiling(items / sp.Max(least, sp.ceiling(items / splits)))
    return items, least, splits, S


def wgrad_spec(ctx, name, *, C, M, K, pad, in_size, out_size, g_load, g_desc, args, prelude="", g_window=None):
    """The partial-sum KernelSpec and the number of splits S (sympy, in BATCH), or None when no block
    shape fits (the caller then uses the GEMM). `g_window` (a gathered g: the pool window `k` and the
    lines setting `gcv` and `gval` of a pooled position): tiles aligned to the windows where a shape
    fits, staged a window per gather; else each position gathers (`g_load`)."""
    g_source = plain_source(g_load)       # g's address where it is a plain copy (then cp.async), else None
    if TF32 and ctx.tf32 and ctx.float_type == "float" and g_source:
        built = direct_wgrad_tf32.wgrad_tf32_spec(
            ctx, name, C=C, M=M, K=K, pad=pad, in_size=in_size, out_size=out_size, g_load=g_load, g_desc=g_desc,
            args=args, prelude=prelude, split_plan=split_plan)
        if built is not None:
            return built
    KH, KW = K
    IH, IW = in_size
    OH, OW = out_size
    itemsize = 4 if ctx.float_type == "float" else 8
    buffers = 2 if PIPELINE and g_source else 1
    shape = block_shape(C=C, M=M, KH=KH, KW=KW, OH=OH, OW=OW, itemsize=itemsize, buffers=buffers,
                        gather=not g_source)
    aligned = None
    if g_window and WINDOW_GATHER and len(g_window["k"]) == 2:
        aligned = block_shape(C=C, M=M, KH=KH, KW=KW, OH=OH, OW=OW, itemsize=itemsize, align=g_window["k"])
    # the aligned tiles where their estimated issue is at most the per-position gather's by the gathers
    # they save (a position's gather costs about GATHER_COST multiply-adds of issue; a window's k0 x k1
    # positions share one); wide windows can pad the tiles more than that
    if aligned and shape:
        k = math.prod(g_window["k"])
        saved = GATHER_COST * (1 - 1 / k) * -(-M // shape["MB"]) * -(-C // shape["CB"]) * OH * OW * shape["MB"]
        aligned = aligned if aligned["cost"] <= shape["cost"] + saved else None
    if aligned:
        shape = aligned
    else:
        g_window = None
    if shape is None:
        return None
    RB, WB, WBP, MB, CB, threads = (shape[k] for k in ("RB", "WB", "WBP", "MB", "CB", "threads"))
    bands, tiles_x = -(-OH // RB), -(-OW // WB)
    tiles = bands * tiles_x
    items, least, splits, S = split_plan(ctx.images, tiles, RB * WBP, threads, -(-M // MB) * -(-C // CB))
    SG = RB * WBP * shape["MBP"]
    SX = CB * shape["XS"]
    params = dict(shape, T=ctx.float_type, ACC=ctx.float_type, C=C, M=M, N=C * KH * KW, KH=KH, KW=KW,
                  PAD_T=pad[0], PAD_L=pad[1], IH=IH, IW=IW, OH=OH, OW=OW, TILES=tiles, TILES_X=tiles_x,
                  ITEMS=c_int(items), least=least, splits=splits, SG=SG, STAGE=stage_size(SG + SX), buffers=buffers,
                  SMEM=max(buffers * stage_size(SG + SX), shape["PG"] * MB * CB * KH * KW),
                  x_total=CB * shape["XR"] * shape["XW"], g_total=RB * -(-WBP // 8) * 8 * MB,
                  g_load=g_load, g_source=g_source, g_desc=g_desc, prelude=prelude,
                  min_blocks=max(1, 512 // (-(-threads // 32) * 32)))    # 128 registers a thread at most
    params["x_iters"] = -(-params["x_total"] // threads)
    params["g_iters"] = -(-params["g_total"] // threads)
    params["g_batch"] = min(4, params["g_iters"])     # gathered values in flight per thread (the accumulators stay live)
    params["g_window"] = g_window
    if g_window:
        k0, k1 = g_window["k"]
        PC = WBP // k1                                  # pooled columns of a tile
        params.update(k0=k0, k1=k1, PC=PC, PCQ=-(-PC // 8),
                      gw_total=RB // k0 * -(-PC // 8) * 8 * MB)
        params["gw_iters"] = -(-params["gw_total"] // threads)
        params["g_batch"] = min(4, params["gw_iters"])
    spec = KernelSpec(name=name + "_partial", template="direct_wgrad.cu.j2", params=params,
                      args=args, grid=(S, -(-C // CB), -(-M // MB)), block=(threads, 1, 1), barrier=True)
    return spec, S
