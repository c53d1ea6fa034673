"""The weight gradient of a direct 2-D convolution on TF32 tensor cores (`tf32=True`):

    dw[m, c, r, s] = sum over b, y, x of g[b, m, y, x] * x[b, c, y - pad_t + r, x - pad_l + s]

For an offset (r, s) this is a product over output positions, A = g (output channels x positions)
and B = x shifted by (r, s) (positions x input channels). A block owns MB output x CB input channels x
every offset and walks tiles of RB rows x WBP columns of one image (WBP a multiple of 8): it stages
g's tile (output channels innermost) and x's tile with its halo (columns innermost), both rounded to
TF32, and per 8 consecutive positions of a row each warp loads its A fragment once and, for each
offset, the B fragments of its input channels straight from x's tile shifted by (r, s): im2col only
in the addresses (`gc_load_bt`: B read column-major, positions consecutive). Each warp keeps 16 output
x 16 input channels x every offset in registers (FN * KK mma tiles), so filters of at most
MOST_OFFSETS offsets (3 x 3) qualify. The batch's tiles are split over blocks as in direct_wgrad.py,
and the split reduce adds the partial sums in a fixed order.

Eligible: a plain g (not a gathered pool/activation gradient) and at least LEAST_CHANNELS input
channels; otherwise the FP32 direct weight gradient."""
from __future__ import annotations

from ..spec import KernelSpec
from . import c_int, in_batches
from .direct_tf32 import eight_mod_16

LEAST_CHANNELS = 8
MOST_OFFSETS = 9            # a warp's accumulators: 16 x 16 channels x offsets = 8 per offset and lane
SHARED_BUDGET = 46 * 1024
TILE_POSITIONS = 128        # output positions a tile aims at (its rows times its padded columns)


def four_mod_8(n: int) -> int:
    """The least stride >= n that is 4 mod 8 words: a B fragment's 8 channels x 4 positions in 32 banks."""
    return n + (4 - n % 8) % 8


def wgrad_tf32_spec(ctx, name, *, C, M, K, pad, in_size, out_size, g_load, g_desc, args, split_plan, prelude=""):
    """(the partial-sum KernelSpec, the number of splits S), or None where it does not apply;
    `split_plan`: direct_wgrad's, which sizes the splits of the FP32 kernel too."""
    KH, KW = K
    KK = KH * KW
    if C < LEAST_CHANNELS or KK > MOST_OFFSETS or len(g_load) != 1:
        return None
    IH, IW = in_size
    OH, OW = out_size
    FN = 2
    WARPS_M, WARPS_C = (2 if M > 16 else 1), (2 if C > 16 else 1)
    MB, CB = 16 * WARPS_M, 8 * FN * WARPS_C
    threads = 32 * WARPS_M * WARPS_C
    tiles_x = -(-OW // 32)
    WB = -(-OW // tiles_x)
    WBP = -(-WB // 8) * 8
    MBP = eight_mod_16(MB)

    def layout(RB):
        XR, XW = RB + KH - 1, WBP + KW - 1
        XS = four_mod_8(XR * XW)
        return XR, XW, XS, 4 * (RB * WBP * MBP + CB * XS)
    RB = max(1, min(OH, TILE_POSITIONS // WBP))
    while RB > 1 and layout(RB)[3] > SHARED_BUDGET:
        RB -= 1
    XR, XW, XS, shared = layout(RB)
    if shared > SHARED_BUDGET:
        return None
    tiles = -(-OH // RB) * tiles_x
    items, least, splits, S = split_plan(ctx.images, tiles, RB * WBP, threads, -(-M // MB) * -(-C // CB))

    def batches(total):
        iters = -(-total // threads)
        return total, iters, in_batches(iters, 8)      # at most 8 loads in flight (16 beside the 72
        # accumulators spilled 35 of 577 kernels of a review's scan at 255 registers)
    g_total, g_iters, g_per = batches(MB * RB * WBP)
    x_total, x_iters, x_per = batches(CB * XR * XW)
    params = dict(tf32=True, C=C, M=M, N=C * KK, KH=KH, KW=KW, PAD_T=pad[0], PAD_L=pad[1], IH=IH, IW=IW, OH=OH,
                  OW=OW, MB=MB, CB=CB, FN=FN, WARPS_M=WARPS_M, threads=threads, RB=RB, WB=WB, WBP=WBP, MBP=MBP,
                  XR=XR, XW=XW, XS=XS, TILES=tiles, TILES_X=tiles_x, ITEMS=c_int(items), least=least,
                  splits=splits, PG8=RB * WBP // 8, g_total=g_total, g_iters=g_iters, g_per=g_per, x_total=x_total,
                  x_iters=x_iters, x_per=x_per, g_load=g_load, g_desc=g_desc, prelude=prelude, shared=shared)
    spec = KernelSpec(name=name + "_tf32_partial", template="direct_wgrad_tf32.cu.j2", params=params, args=args,
                      grid=(S, -(-C // CB), -(-M // MB)), block=(threads, 1, 1), barrier=True)
    return spec, S
