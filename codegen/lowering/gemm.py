"""The GEMM family: one tiled template (gemm.cu.j2) for every op that is a matrix product,
convolutions included, as implicit GEMMs whose operands are gathered on the fly:

    op                      C[M, N]          M          N                       K
    linear                  out[b, f]        batch      features                in_features
    matmul                  out              rows       cols                    inner
    conv / fused_conv       y[b, oc, q]      oc         batch x positions       c x kernel
    conv backward-data      dx[b, c, h]      c          batch x input positions oc x kernel
    conv backward-weight    dw[oc, c, r]     oc         c x kernel              batch x positions (split)

A fused conv's columns run over (batch, pooled position, window offset), so each thread holds whole
pooling windows and the bias, activation chain and pool happen in registers. A K that grows with the
batch is split over blocks into partial sums that a second kernel adds in a fixed order.
"""
from __future__ import annotations

import itertools
import math
import re

import sympy as sp

from graphconv.ops import OPS
from graphconv.ops.conv import Conv
from graphconv.ops.fused import expression_of

from ..cprinter import c_expression, c_function_prelude, c_neg_inf
from ..spec import BATCH, Arg, KernelSpec, Lowered, Value
from . import advance_lines, c_int, digit_lines, flat, lowering, numel, short_dtype
from . import depthwise, direct, direct_wgrad
from .pointwise import operand_index
from .prologue import gather_lines, gather_shared_lines, gather_window_lines, gathered_gradient

# split K (backward-weight): blocks wanted in all (four per multiprocessor of an H100/H200) and the
# fewest terms per chunk (H200: LeNet-5 conv1's backward-weight, 98 blocks of 2048 terms, ran at 1 TFLOP/s)
SPLIT_BLOCKS = 4 * 132
SPLIT_LEAST = 512
# the next k-step's operands are loaded into registers while the current one computes (not yet timed
# on a GPU; `bench_gpu.py --variants` compares it with loading after the barrier)
PREFETCH = True
# stride-1 2-D convolutions (forward, backward-data) as direct convolutions where eligible; False: the GEMM.
# They stay direct (FP32) under tf32=True: on the H200 the TF32 implicit GEMM ran 1.3-3.5x slower than
# the FP32 direct kernels (gpu-notes.md, session 2). A forward convolution whose output plane has at most
# GEMM_PLANE_MOST pixels runs as the GEMM instead. Session 2 set 64 (vgg conv3_2, 8 x 8: GEMM 0.100 ms
# against direct 0.154 at batch 64, 0.298 against 0.277 at batch 256, when the direct kernel ran one
# block per image and waited for each stage's loads); session 4 split such planes' channels over two
# blocks and double-buffered the stages (direct.py), so 8 x 8 planes are direct again where that gives
# an image two blocks or more (direct.one_block_per_small_image), untimed: `bench_gpu.py --variants`
# times the GEMM against it ("8 x 8 planes as the GEMM").
DIRECT = True
GEMM_PLANE_MOST = 0
# a static depth (linear's in_features) is split in chunks of at least this many terms
STATIC_SPLIT_LEAST = 256
# an operand's k index, decomposed into its mixed-radix digits (image, position; channel, kernel offset),
# is kept in registers and advanced by the k-step with carries, once for every load slot of a thread
# that reads the same k, instead of divided out per slot per step (sass_mix.py: the backward-weight
# GEMMs spent 450 of ~900 instructions per step on that arithmetic); False: divided per slot
HOIST = True
# a thread's operand values read from shared memory as float4 / float2 / double2 where its rows and
# columns are contiguous (a 4 x 4 tile: 2 vector loads per k instead of 8 scalar ones; a warp's
# scalar loads cost a shared-memory wavefront each, and 8 of them per 16 multiply-adds bound the GEMMs
# at about half the FP32 peak); False: scalar loads
VECTOR = True
# split-K GEMMs (backward-weight, long linears) with 4 x 8 results per thread and 64 x 128 blocks
WIDE = True
# two shared buffers per operand (with PREFETCH): the next k-step's registers are stored into the other
# buffer after the multiply-adds, so a k-step takes one barrier instead of two (one before the stores,
# one before the reads), where both buffers fit the 48 KiB of static shared memory; False: one buffer
DOUBLE_BUFFER = True


def shared_bytes(cfg, T, params, buffers) -> int:
    """The GEMM's static shared memory: `buffers` copies of the two operand tiles (rows padded by PAD);
    on the TF32 path the results' staging tile shares that memory (it is written after the k loop)."""
    word = 4 if T == "float" else 8
    tiles = cfg["BK"] * (cfg["BM"] + params["PAD"]) + cfg["BK"] * (cfg["BN"] + params["PAD"])
    return max(buffers * word * tiles, 4 * cfg["BM"] * (cfg["BN"] + 4) if params["tf32"] else 0)


def tile_config(M, N, G, wide=False):
    """Block tile, per-thread tile (TM x TN), thread grid (TY x TX) and k-step BK. A thread holds
    whole pooling windows (TN >= G); narrow products put more threads along m (at least 128 threads
    where the tile allows); BK is the deepest step with at most 8 load slots per thread and operand
    (their hoisted index arithmetic lives in registers). `wide` (a GEMM whose depth is split over
    blocks, so the split, not the tile grid, fills the multiprocessors): 8 columns per thread where
    N has them, which halves the loads per multiply-add of the operand gathered along m."""
    narrow = sp.sympify(N).is_Integer and int(N) < 128
    TN = G * -(-max(8 if wide and WIDE and not narrow else 4, G) // G)   # whole windows, >= 4 columns (G = 3: 6)
    if TN > 64:
        raise ValueError(f"a pooling window of {G} elements is too large to pool in registers (at most 64)")
    TM = 4 if TN <= 8 else (2 if TN <= 16 else 1)
    M, N = sp.sympify(M), sp.sympify(N)
    BM = 64 if not M.is_Integer else next(b for b in (16, 32, 64, 64) if b >= min(int(M), 64))
    bn_target = 128 if not N.is_Integer else max(TN, min(128, 1 << max(0, (int(N) - 1).bit_length())))
    while True:
        TM = min(TM, BM)
        TY = BM // TM
        TX = max(1, min(256 // TY, bn_target // TN))
        if TX * TY >= 128 or TM == 1:
            break
        TM //= 2
    threads = TX * TY
    BK = next(bk for bk in (16, 8, 4, 2, 1)
              if -(-bk * BM // threads) <= 8 and -(-bk * TX * TN // threads) <= 8)
    return {"BM": BM, "BN": TX * TN, "BK": BK, "TM": TM, "TN": TN, "TX": TX, "TY": TY, "G": G, "threads": TX * TY}


def tf32_params(ctx, cfg) -> dict:
    """The tensor-core variant's parameters, where the program asked for TF32 and the tile takes it:
    float32, a block tile of whole 16 x 8 mma tiles, k-steps of 8, whole warps, and the results' staging
    tile within the 48 KiB of static shared memory. Otherwise {"tf32": False}: the FP32 path."""
    BM, BN, BK, threads = cfg["BM"], cfg["BN"], cfg["BK"], cfg["threads"]
    shared = 4 * max(BK * (BM + 8) + BK * (BN + 8), BM * (BN + 4))      # the staging tile reuses the tiles'
    if not (ctx.tf32 and ctx.float_type == "float" and BM % 16 == 0 and BN % 8 == 0 and BK % 8 == 0
            and threads % 32 == 0 and shared <= 48 * 1024):
        return {"tf32": False, "PAD": 1}
    tiles_m, tiles_n, warps = BM // 16, BN // 8, threads // 32
    # each warp a WARP_MT x WARP_NT block of 16 x 8 tiles: its fragments of A and B are loaded once per
    # 8-deep step and reused across the block (4 WARP_MT + 2 WARP_NT shared loads for WARP_MT x WARP_NT
    # mma); the most warps busy, then the fewest loads per mma
    divisors = lambda n: [d for d in range(1, n + 1) if n % d == 0]   # noqa: E731
    wm, wn = min(((a, b) for a in divisors(tiles_m) for b in divisors(tiles_n) if a * b <= warps),
                 key=lambda ab: (-ab[0] * ab[1], (4 * tiles_m // ab[0] + 2 * tiles_n // ab[1])
                                 / (tiles_m // ab[0] * tiles_n // ab[1]), ab))
    return {"tf32": True, "PAD": 8, "WARPS": warps, "WARPS_M": wm, "WARPS_N": wn,
            "WARP_MT": tiles_m // wm, "WARP_NT": tiles_n // wn}


def shared_reads(cfg, T, tf32) -> dict:
    """How a thread reads its operands out of shared memory: its TM rows contiguous, its columns in
    runs of R contiguous ones (R = the pooling window where there is one, else all TN), each read VA
    and VB values at a time (16-byte vector loads at most; none where VECTOR is off), and the padding
    that keeps every tile row aligned for them (TF32: 8 words, for its fragment reads)."""
    TM, TN, G = cfg["TM"], cfg["TN"], cfg["G"]
    R = G if G > 1 else TN
    widest = 16 // (4 if T == "float" else 8)

    def width(n):
        return next(v for v in (4, 2, 1) if v <= widest and n % v == 0) if VECTOR else 1
    VA, VB = width(TM), width(R)
    return {"R": R, "VA": VA, "VB": VB, "PAD": 8 if tf32 else max(VA, VB)}


def slots(fast, rows, cfg):
    """Each thread's load slots of a BK x rows tile: (kk, rr, guard) C expressions per slot; the
    guard (or "") keeps the last slot inside the tile when threads do not divide it. Slots that read
    the same k get the same kk text (threads a multiple of BK: every slot of a thread reads its k)."""
    threads, BK = cfg["threads"], cfg["BK"]
    total = BK * rows
    out = []
    for l in range(-(-total // threads)):
        idx = f"(tid + {l * threads})" if l else "tid"
        guard = f"{idx} < {total}" if (l + 1) * threads > total else ""
        if fast == "k":
            out.append((f"tid % {BK}" if (l * threads) % BK == 0 else f"{idx} % {BK}", f"{idx} / {BK}", guard))
        else:
            out.append((f"{idx} / {rows}", f"{idx} % {rows}", guard))
    return out


def k_groups(a, b, a_slots, b_slots, BK):
    """The fetch of one k-step as groups of load slots that read the same k with the same digits: per
    group the k index, its digits (registers advanced by BK with carries, or divided out of k where
    HOIST is off), the operands' lines shared by the group's slots, then each slot's load."""
    groups = {}
    for op, operand, picked in (("a", a, a_slots), ("b", b, b_slots)):
        digits = operand.get("digits", [])
        for l, (kk, _, guard) in enumerate(picked):
            radices = tuple(r for _, r in digits)
            key = (kk, radices) if HOIST else (op, l)
            g = groups.setdefault(key, {"id": len(groups), "kk": kk, "radices": radices, "names": {},
                                        "shared": [], "slots": []})
            for j, (name, _) in enumerate(digits):
                if g["names"].setdefault(name, j) != j:
                    raise ValueError(f"digit {name} is digit {g['names'][name]} of one operand, {j} of another")
            g["shared"] += [line for line in operand.get("shared", []) if line not in g["shared"]]
            g["slots"].append({"op": op, "l": l, "guard": guard, "load": operand["load"]})
    out = []
    for g in groups.values():
        text = " ".join(g["shared"] + [line for s in g["slots"] for line in s["load"]])
        names = [(n, j) for n, j in g["names"].items() if re.search(rf"\b{n}\b", text)]   # the digits read
        gid, radices = g["id"], g["radices"]
        decl = lambda n, j: f"const {'long long' if j == 0 else 'int'} {n}"   # noqa: E731
        if HOIST:
            start = digit_lines(f"(k_begin + {g['kk']})", radices, lambda j: f"int kd{gid}_{j}")
            aliases = [f"{decl(n, j)} = kd{gid}_{j};" for n, j in names]
            advance = advance_lines(f"kd{gid}_", radices, BK)
        else:
            divided = digit_lines("k", radices, lambda j: "@")
            start, advance, aliases = [], [], [divided[j].replace("@", decl(n, j), 1) for n, j in names]
        out.append(dict(g, start=start, aliases=aliases, advance=advance))
    return out


def gemm_specs(ctx, name, *, M, N, K, a, b, row_setup, window_begin, element, window_end, args, cfg,
               groups=1, prelude="", a_desc="", b_desc="", split=False, scratch_args=(), split_least=None):
    """The GEMM KernelSpec (and, when K is split, the reduce KernelSpec and its scratch)."""
    T = ctx.float_type
    ACC = T
    params = dict(cfg, T=T, ACC=ACC, M=c_int(M), N=c_int(N), K=c_int(K), groups=groups, prelude=prelude,
                  a_desc=a_desc, b_desc=b_desc, split=False, KCH=0,
                  LA=0, a_kk=[], a_mm=[], a_setup=a["setup"], a_load=a["load"],
                  LB=0, b_kk=[], b_nn=[], b_setup=b["setup"], b_load=b["load"],
                  row_setup=row_setup, window_begin=window_begin, element=element, window_end=window_end)
    params.update(tf32_params(ctx, cfg), prefetch=PREFETCH)
    params.update(shared_reads(cfg, T, params["tf32"]))
    params["buffers"] = 2 if PREFETCH and DOUBLE_BUFFER and shared_bytes(cfg, T, params, 2) <= 48 * 1024 else 1
    params["smem_bytes"] = shared_bytes(cfg, T, params, params["buffers"])
    params["a_bytes"] = (4 if T == "float" else 8) * cfg["BK"] * (cfg["BM"] + params["PAD"])
    if params["tf32"]:
        name += "_tf32"
    a_slots, b_slots = slots(a["fast"], cfg["BM"], cfg), slots(b["fast"], cfg["BN"], cfg)
    params.update(LA=len(a_slots), a_kk=[s[0] for s in a_slots], a_mm=[s[1] for s in a_slots],
                  a_guard=[s[2] for s in a_slots],
                  LB=len(b_slots), b_kk=[s[0] for s in b_slots], b_nn=[s[1] for s in b_slots],
                  b_guard=[s[2] for s in b_slots], k_groups=k_groups(a, b, a_slots, b_slots, cfg["BK"]),
                  hoist=HOIST)
    grid_xy = (sp.ceiling(sp.sympify(N) / cfg["BN"]), sp.ceiling(sp.sympify(M) / cfg["BM"]))
    block = (cfg["threads"], 1, 1)
    if not split:
        spec = KernelSpec(name=name, template="gemm.cu.j2", params=params, args=args,
                          grid=(*grid_xy, groups), block=block, barrier=True)
        return Lowered(kernels=[spec])
    # split K: the GEMM writes partial sums, the reduce kernel adds them and runs the epilogue
    # chunks of at least SPLIT_LEAST terms; more of them where the output tile grid alone would leave
    # the multiprocessors idle (about SPLIT_BLOCKS blocks in all), fewer where the batch would need
    # more than 65535 / groups of them (grid z)
    bk = cfg["BK"]
    tiles_xy = sp.sympify(grid_xy[0] * grid_xy[1] * groups)
    splits = sp.ceiling(sp.Integer(SPLIT_BLOCKS) / tiles_xy) if SPLIT_BLOCKS else sp.Integer(1)
    terms = [bk * max(1, math.ceil((split_least or SPLIT_LEAST) / bk)), bk * sp.ceiling(sp.ceiling(sp.sympify(K) / (65535 // groups)) / bk)]
    if splits != 1:
        terms.append(bk * sp.ceiling(sp.ceiling(sp.sympify(K) / splits) / bk))
    kch = sp.Max(*terms)
    S = sp.ceiling(sp.sympify(K) / kch)
    partial_key = ctx.scratch_key("partial")
    total = groups * sp.sympify(M) * sp.sympify(N)
    params.update(split=True, KCH=c_int(kch), row_setup=[], window_begin=[], window_end=[],
                  element=[f"partial[((split * {groups} + grp) * M + m) * N + n] = c;"])
    loads = set(re.findall(r"\w+", " ".join(a["setup"] + a["load"] + b["setup"] + b["load"] + [prelude])))
    gemm_args = [a_ for a_ in args if not a_.writes and a_.value is not None and a_.name in loads] + \
                [Arg(f"{T}*", "partial", partial_key), Arg("int", "batch")]     # the epilogue's reads go to the reduce
    first = KernelSpec(name=name + "_partial", template="gemm.cu.j2", params=params, args=gemm_args,
                       grid=(*grid_xy, groups * S), block=block, barrier=True)
    used = set(re.findall(r"\w+", " ".join(element)))     # the epilogue's reads (a bias) go to the reduce too
    reduce_args = [Arg(f"const {T}*", "partial", partial_key)] + \
                  [a_ for a_ in args if a_.value is not None and (a_.writes or a_.name in used)] + [Arg("int", "batch")]
    return Lowered(kernels=[first, reduce_spec(ctx, name, M=M, N=N, K=K, S=S, groups=groups, element=element,
                                               args=reduce_args, prelude=prelude)],
                   scratch={partial_key: Value((S * total,), ctx.dtype)})


# threads an H100/H200 holds at once (132 multiprocessors x 2048): a split reduction with at least this
# many outputs fills the GPU with one thread per output
RESIDENT_THREADS = 132 * 2048


def reduce_spec(ctx, name, *, M, N, K, S, groups, element, args, prelude=""):
    """The second pass of a split reduction: `S` partial sums per output added in a fixed order, then
    the epilogue `element` (C text reading the sum `c`, the output's m, n and grp). Few outputs (a
    conv's weight gradient: thousands, each of hundreds of partials): 8 threads per output, each
    adding every 8th partial, so that enough loads are in flight. Outputs that fill the GPU by
    themselves (a linear layer's weight gradient, 2450 x 500, whose depth, the batch, is rarely split
    at all): one thread per output and no barrier; 8 would leave 7 of them idle."""
    total = groups * sp.sympify(M) * sp.sympify(N)
    outs, parts = (256, 1) if total.is_Integer and total >= RESIDENT_THREADS else (32, 8)
    return KernelSpec(name=name + "_reduce", template="splitk_reduce.cu.j2",
                      params={"M": c_int(M), "N": c_int(N), "K": c_int(K), "S": c_int(S), "groups": groups,
                              "ACC": ctx.float_type, "threads": outs * parts, "OUTS": outs, "PARTS": parts,
                              "element": element, "prelude": prelude},
                      args=args, grid=(sp.ceiling(total / outs), 1, 1), block=(outs * parts, 1, 1), barrier=parts > 1)


# ---- spatial index helpers (row-major over the spatial axes, C-ready text) -------------------------
def unflatten(var, sizes, prefix):
    """Lines defining prefix0, prefix1, ... = the row-major coordinates of flat index `var`."""
    lines = []
    for d, size in enumerate(sizes):
        inner = math.prod(sizes[d + 1:])
        text = f"{var} / {inner}" if inner != 1 else var
        text = f"({text}) % {size}" if d else f"{text}" if len(sizes) == 1 else f"({text}) % {size}"
        lines.append(f"const int {prefix}{d} = {text};")
    return lines


def in_bounds(coords, sizes) -> str:
    return " && ".join(f"{c} >= 0 && {c} < {s}" for c, s in zip(coords, sizes)) or "true"


def ints(shape):
    return [int(d) for d in shape]


# ---- padding modes other than zeros: the padded input is never built ----------------------------
# A reflect / replicate / circular padded convolution reads the input through an index map (PyTorch's
# padding_mode, pad_index in graphconv/ops/window.py); its data gradient adds, at each input
# position, what every padded position copying it received.
def mode_coord(mode, i, size) -> str:
    """C text: the input position a padded position `i` (a C variable, -pad <= i < size + pad,
    pad <= size, and < size for reflect: the op checks that) copies under padding `mode`."""
    if mode == "reflect":
        return f"{i} < 0 ? -{i} : {i} >= {size} ? {2 * size - 2} - {i} : {i}"
    if mode == "replicate":
        return f"{i} < 0 ? 0 : {i} > {size - 1} ? {size - 1} : {i}"
    if mode == "circular":
        return f"{i} < 0 ? {i} + {size} : {i} >= {size} ? {i} - {size} : {i}"
    raise ValueError(mode)


def mode_sources(mode, h, size, lo, hi) -> list:
    """[(padded position, condition)]: every position of an axis padded by (lo, hi) that copies
    input position `h` (a C variable) under reflect or circular padding, the identity first
    (condition "": always); a position outside the padded axis is left to the caller's bounds check.
    (Replicate's copies are a run an axis: padded_sources_load loops over it.)"""
    sources = [(h, "")]
    if mode == "reflect":          # -h mirrors h (not h = 0: that is h itself); so does 2(size-1) - h
        sources += [(f"-{h}", f"{h} >= 1 && {h} <= {lo}")] if lo else []
        sources += [(f"{2 * size - 2} - {h}", f"{h} <= {size - 2} && {h} >= {size - 1 - hi}")] if hi else []
    elif mode == "circular":       # h - size and h + size wrap onto h
        sources += [(f"{h} - {size}", f"{h} >= {size - lo}")] if lo else []
        sources += [(f"{h} + {size}", f"{h} < {hi}")] if hi else []
    else:
        raise ValueError(mode)
    return sources


# ---- convolution, forward (plain and fused) ---------------------------------------------------------
def conv_geometry(ctx, attrs, x, w):
    conv = Conv(len(x.shape) - 2)
    pads = conv.pads(attrs, w.shape)
    return {"mode": attrs["padding_mode"], "pad_hi": [hi for _, hi in pads],
            "nd": conv.nd, "C": int(x.shape[1]), "Si": ints(x.shape[2:]), "OC": int(w.shape[0]), "Cg": int(w.shape[1]),
            "Kr": ints(w.shape[2:]), "stride": list(attrs["stride"]), "pad": [lo for lo, _ in pads],
            "dil": list(attrs["dilation"]), "groups": int(attrs["groups"])}


def epilogue_expr(steps, z):
    value = z
    for op, items, refs in steps:
        value = expression_of(op, dict(items), [value if r == -1 else sp.Symbol(f"e{r}", real=True) for r in refs])
    return value


@lowering("conv1d", "conv2d", "conv3d", "fused_conv")
def lower_conv(ctx):
    fused = ctx.node.op == "fused_conv"
    attrs = ctx.attrs
    has_bias = attrs["bias"] if fused else len(ctx.operands) > 2
    x, w = ctx.ins[0], ctx.ins[1]
    geo = conv_geometry(ctx, attrs, x, w)
    nd, C, Si, OC, Cg, Kr = geo["nd"], geo["C"], geo["Si"], geo["OC"], geo["Cg"], geo["Kr"]
    groups = geo["groups"]
    Mg = OC // groups
    conv_out = OPS[f"conv{nd}d"].infer([ctx.graph.node(o).type for o in ctx.operands[:2]],
                                       {k: attrs[k] for k in ("stride", "padding", "dilation", "groups", "padding_mode")})
    So = ints(conv_out.shape[2:])
    steps = attrs["epilogue"] if fused else ()
    pool = attrs["pool"] if fused else ()
    save = attrs["save"] if fused else ""
    if pool:
        pool_op, pool_items = pool
        pa = dict(pool_items)
        mode = "max" if pool_op.startswith("max") else "avg"
        pk, ps = list(pa["kernel_size"]), list(pa["stride"])
        ppad = [lo for lo, _ in pa["padding"]]
        pdil = list(pa.get("dilation", (1,) * nd))
        Sp = ints(ctx.outs[0].shape[2:])
    else:
        mode, pk, ps, ppad, pdil, Sp = None, [1] * nd, [1] * nd, [0] * nd, [1] * nd, So
    G = math.prod(pk)
    P, SiN, SoN, KK = math.prod(Sp), math.prod(Si), math.prod(So), math.prod(Kr)
    n_extra = len(ctx.operands) - (3 if has_bias else 2) if fused else 0
    extra_index = 3 if has_bias else 2
    try:
        cfg = tile_config(Mg, ctx.images * P * G, G)
    except ValueError as e:
        raise ctx.fail(str(e)) from None
    T = ctx.float_type
    neg_inf = c_neg_inf(T)
    pool_may_leave = pool and (any(ppad) or any((o - 1) * s - p + (k - 1) * d >= so for o, s, p, k, d, so in
                                                zip(Sp, ps, ppad, pk, pdil, So)))

    def column_decode(var, suffix):
        """Lines: from column `var`, the image, the pooled position, the window offset, the conv-output
        position q{d} and whether it lies inside the conv output."""
        lines = []
        if G > 1:
            lines += [f"const long long pn{suffix} = {var} / {G};", f"const int woff{suffix} = {var} % {G};"]
            pn = f"pn{suffix}"
        else:
            pn = var
        lines += [f"const long long bimg{suffix} = {pn} / {P};", f"const int p{suffix} = {pn} % {P};"]
        lines += unflatten(f"p{suffix}", Sp, f"p{suffix}_")
        if G > 1:
            lines += unflatten(f"woff{suffix}", pk, f"woff{suffix}_")
            for d in range(nd):
                lines.append(f"const int q{suffix}_{d} = p{suffix}_{d} * {ps[d]} - {ppad[d]} + woff{suffix}_{d} * {pdil[d]};")
        else:
            for d in range(nd):
                lines.append(f"const int q{suffix}_{d} = p{suffix}_{d};")
        ok = in_bounds([f"q{suffix}_{d}" for d in range(nd)], So) if pool_may_leave else "true"
        lines.append(f"const bool qok{suffix} = {ok};")
        return lines

    # B: the input gathered through the window (columns: image, position; rows: channel, kernel offset)
    b_setup = column_decode("n@", "@")
    b_setup += [f"const int i0_@_{d} = q@_{d} * {geo['stride'][d]} - {geo['pad'][d]};" for d in range(nd)]
    b_setup.append(f"const long long xb@ = (bimg@ * {C} + grp * {Cg}) * {SiN}LL;")
    b_load = [f"const int i{d} = i0_@_{d} + r{d} * {geo['dil'][d]};" for d in range(nd)]
    idx = [f"i{d}" for d in range(nd)]
    if geo["mode"] == "zeros":
        b_load.append(f"if (qok@ && {in_bounds(idx, Si)}) v = x[xb@ + (long long)c * {SiN} + {flat(idx, Si)}];")
    else:
        b_load += [f"const int j{d} = {mode_coord(geo['mode'], f'i{d}', Si[d])};" for d in range(nd)]
        b_load.append(f"if (qok@) v = x[xb@ + (long long)c * {SiN} + {flat([f'j{d}' for d in range(nd)], Si)}];")
    # A: the weights, row = output channel, contiguous along k
    a = {"fast": "k", "setup": [f"const long long wrow@ = (grp * {Mg} + m@) * {Cg * KK}LL;"],
         "load": ["v = w[wrow@ + k];"]}
    b = {"fast": "n", "setup": b_setup, "load": b_load, "digits": [("c", None)] + [(f"r{d}", Kr[d]) for d in range(nd)]}

    # the epilogue: bias, the activation chain (extra operands per channel or full-size), the pool
    z, sym = sp.Symbol("z", real=True), {}
    expr = epilogue_expr(steps, z)
    names = {"z": "z"}
    loads = []
    for r in range(n_extra):
        ev = ctx.ins[extra_index + r]
        names[f"e{r}"] = f"ex{r}"
        if len(ev.shape) == 0:
            loads.append(f"const {T} ex{r} = ep{r}[0];")
        elif len(ev.shape) == 1:
            loads.append(f"const {T} ex{r} = ep{r}[mg];")
        else:
            loads.append(f"const {T} ex{r} = qok ? ep{r}[(bimg * {OC} + mg) * {SoN}LL + "
                         f"{flat([f'q_{d}' for d in range(nd)], So)}] : ({T})0;")
    temps, result, used = c_expression(expr, ctx.dtype, names)
    row_setup = [f"const long long mg = grp * {Mg} + m;"]
    if has_bias:
        row_setup.append(f"const {T} bias_m = bias[mg];")
    core = [f"const {T} z = ({T})c{' + bias_m' if has_bias else ''};"] + loads + temps + [f"const {T} v = {result};"]
    element = list(core)
    out_index = f"(bimg_w * {OC} + mg) * {P}LL + p_w"
    if not pool:
        window_begin, window_end = [], []
        element.append(f"y[(bimg * {OC} + mg) * {P}LL + p] = v;")
    elif mode == "max":
        window_begin = [f"{T} best = {neg_inf};"] + (["int code = 0;"] if save else []) + \
                       ([f"{T} best_z = 0;"] if save == "argmax_preact" else [])
        track = (" code = woff;" if save else "") + (" best_z = z;" if save == "argmax_preact" else "")
        element.append(f"if (qok && (v > best || (v != v && best == best))) {{ best = v;{track} }}   "
                       f"// the first maximum wins, a NaN first of all, as in the reference")
        window_end = [f"y[{out_index}] = best;"]
        if save:
            window_end.append(f"code_out[{out_index}] = (unsigned char)code;")
        if save == "argmax_preact":
            window_end.append(f"preact[{out_index}] = best_z;")
    else:
        divisor = pa.get("divisor_override")
        window_begin = [f"{T} sum = 0;", "int count = 0;"]
        padded = in_bounds([f"q_{d}" for d in range(nd)], So)
        if pa["count_include_pad"]:
            lo = [f"q_{d} >= -{ppad[d]} && q_{d} < {So[d] + ppad[d]}" for d in range(nd)]
            counted = " && ".join(lo)
        else:
            counted = padded
        element.append(f"if (qok) sum += v;")
        element.append(f"count += ({counted}) ? 1 : 0;")
        window_end = [f"y[{out_index}] = sum / ({T}){divisor if divisor else 'count'};"]

    stores = window_end
    window_end = (column_decode_end(G, P, Sp) + stores) if pool else []
    args = [ctx.arg_in(0, "x"), ctx.arg_in(1, "w")]
    if has_bias:
        args.append(ctx.arg_in(2, "bias"))
    args += [ctx.arg_in(extra_index + r, f"ep{r}") for r in range(n_extra)]
    args.append(ctx.arg_out(0, "y"))
    if save:
        args.append(ctx.arg_out(1, "code_out"))
    if save == "argmax_preact":
        args.append(ctx.arg_out(2, "preact"))
    args.append(Arg("int", "batch"))
    what = [f"conv{nd}d"] + [op for op, _, _ in steps] + ([pool[0]] if pool else []) + (["save"] if save else [])
    dims = f"c{C}_k{OC}_r{'x'.join(map(str, Kr))}_s{'x'.join(map(str, geo['stride']))}_p{'x'.join(map(str, geo['pad']))}"
    dims += f"_i{'x'.join(map(str, Si))}" + (f"_g{groups}" if groups > 1 else "")
    dims += "" if geo["mode"] == "zeros" else f"_{geo['mode']}"
    name = "_".join(what) + f"_{short_dtype(ctx.dtype)}_{dims}"
    if n_extra or any(items for _, items, _ in steps):
        from ..cache import digest
        name += "_" + digest(repr(steps))[:6]
    if depthwise.eligible(geo, pool) and geo["mode"] == "zeros":
        lowered = depthwise.depthwise_spec(
            ctx, name.replace(f"conv{nd}d", f"conv{nd}d_depthwise", 1), C=C, mult=OC // C, in_size=Si, out_size=So,
            K=Kr, stride=geo["stride"], dil=geo["dil"], pad=geo["pad"], row_setup=row_setup, element=element,
            args=args, prelude=c_function_prelude(used, ctx.dtype))
        if lowered is not None:
            return lowered
    direct_kernel = None
    if DIRECT and math.prod(So) > GEMM_PLANE_MOST and direct.eligible(geo, (pk, ps, ppad, pdil) if pool else None, So, Sp) and geo["mode"] == "zeros":
        direct_kernel = direct.direct_spec(
            ctx, name.replace(f"conv{nd}d", f"conv{nd}d_direct", 1), C=C, M=OC, K=Kr, pad=geo["pad"], in_size=Si,
            out_size=So, cell=tuple(pk) if pool else (2, 2), pooled=bool(pool),
            in_load=[f"v = x[((bimg * {C} + c) * {Si[0]}LL + iy) * {Si[1]} + ix];"],
            w_load=[f"v = w[((m * {C} + c) * {Kr[0]} + r) * {Kr[1]} + s];"], row_setup=row_setup,
            window_begin=window_begin, element=core + element[len(core):], window_end=stores, args=args,
            prelude=c_function_prelude(used, ctx.dtype), in_desc="in = x", w_desc="w[m, c, r, s]")
        if direct_kernel is not None and direct.one_block_per_small_image(direct_kernel):
            direct_kernel = None
    if direct_kernel is not None:
        return direct_kernel
    element = column_decode("n", "") + element
    return gemm_specs(ctx, name, M=Mg, N=ctx.images * P * G, K=Cg * KK, a=a, b=b, row_setup=row_setup,
                      window_begin=window_begin, element=element, window_end=window_end, args=args, cfg=cfg,
                      groups=groups, prelude=c_function_prelude(used, ctx.dtype),
                      a_desc=f"w[oc, c, r]", b_desc=f"x[b, c, q*stride - pad + r*dilation] " + (
                          "(0 outside)" if geo["mode"] == "zeros" else f"({geo['mode']} padding outside)"))


def column_decode_end(G, P, Sp):
    """The pooled output's image and position, from the window group's first column `nw`."""
    return [f"const long long pn_w = nw / {G};", f"const long long bimg_w = pn_w / {P};", f"const int p_w = pn_w % {P};"]


# ---- convolution, backward ----------------------------------------------------------------------
@lowering("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def lower_conv_transpose(ctx):
    """A transposed convolution is the backward-data of the conv it is the adjoint of (with the
    output size it states), plus its bias in the same store."""
    op = OPS[ctx.node.op]
    return lower_conv_backward_data(ctx, attrs=op.conv_attrs(ctx.attrs, ints(ctx.outs[0].shape[2:])),
                                    bias=len(ctx.ins) > 2, what=f"conv_transpose{op.nd}d")


@lowering("conv1d_backward_data", "conv2d_backward_data", "conv3d_backward_data")
def lower_conv_backward_data(ctx, attrs=None, bias=False, what=None):
    """dx[b, c, h] = sum over (oc, r) of w[oc, c, r] * dy[b, oc, (h + pad - r*dil) / stride] where
    that division is exact and inside dy: a GEMM over rows c, columns (b, h), depth (oc, r)."""
    dy, w = ctx.ins[:2]
    attrs = attrs or ctx.attrs
    Si = ints(attrs["input_size"])
    geo = conv_geometry(ctx, attrs, Value((dy.shape[0], int(w.shape[1]) * attrs["groups"], *Si), dy.dtype), w)
    nd, OC, Cg, Kr, groups = geo["nd"], geo["OC"], geo["Cg"], geo["Kr"], geo["groups"]
    C, So, OCg = Cg * groups, ints(dy.shape[2:]), OC // groups
    SiN, SoN, KK = math.prod(Si), math.prod(So), math.prod(Kr)
    cfg = tile_config(Cg, ctx.images * SiN, 1)
    a = {"fast": "k", "setup": [f"const long long wc@ = (long long)grp * {OCg * Cg * KK} + m@ * {KK};"],
         "digits": [("oc", None), ("r", KK)], "shared": [f"const long long wk = oc * {Cg * KK}LL + r;"],
         "load": ["v = w[wc@ + wk];"]}
    b_setup = [f"const long long bimg@ = n@ / {SiN};", f"const int h@ = n@ % {SiN};"] + unflatten("h@", Si, "h@_")
    b_setup.append(f"const long long dyb@ = (bimg@ * {OC} + grp * {OCg}) * {SoN}LL;")
    b_load = []
    conds, coords = [], []
    for d in range(nd):
        s = geo["stride"][d]
        b_load.append(f"const int t{d} = h@_{d} + {geo['pad'][d]} - r{d} * {geo['dil'][d]};")
        conds.append(f"t{d} >= 0" + (f" && t{d} % {s} == 0" if s > 1 else "") + f" && t{d} / {s} < {So[d]}")
        coords.append(f"t{d} / {s}" if s > 1 else f"t{d}")
    gathered = gathered_gradient(ctx.graph, ctx.operands[0])
    used = set()
    if gathered:   # dy is a pool/activation gradient: gather it from the pooled gradient and the codes
        lines, used = gather_lines(gathered, ctx.dtype, f"bimg@ * {OC} + grp * {OCg} + oc", coords)
        b_load += [f"if ({' && '.join(conds)}) {{"] + [f"    {line}" for line in lines] + ["}"]
    elif geo["mode"] == "zeros":
        b_load.append(f"if ({' && '.join(conds)}) v = dy[dyb@ + (long long)oc * {SoN} + {flat(coords, So)}];")
    else:          # every padded position copying h adds what it received
        sources_setup, b_load = padded_sources_load(geo, Si, So, f"dy[dyb@ + (long long)oc * {SoN} + {{}}]")
        b_setup += sources_setup
    b = {"fast": "n", "setup": b_setup, "load": b_load, "digits": [("oc", None)] + [(f"r{d}", Kr[d]) for d in range(nd)]}
    plus = " + bias[grp * {Cg} + m]".format(Cg=Cg) if bias else ""
    element = [f"const long long bimg = n / {SiN};", f"const int h = n % {SiN};",
               f"dx[(bimg * {C} + grp * {Cg} + m) * {SiN}LL + h] = c{plus};"]
    args = gather_args(ctx, gathered, 0) + [ctx.arg_in(1, "w")] + ([ctx.arg_in(2, "bias")] if bias else []) + \
        [ctx.arg_out(0, "dx"), Arg("int", "batch")]
    name = (f"{what or f'conv{nd}d_backward_data'}{gather_tag(gathered)}_{short_dtype(ctx.dtype)}_c{C}_k{OC}_r{'x'.join(map(str, Kr))}"
            f"_s{'x'.join(map(str, geo['stride']))}_p{'x'.join(map(str, geo['pad']))}_i{'x'.join(map(str, Si))}"
            + (f"_g{groups}" if groups > 1 else "") + ("" if geo["mode"] == "zeros" else f"_{geo['mode']}"))
    zeros = geo["mode"] == "zeros"        # the depthwise and direct kernels pad with zeros only
    if zeros and depthwise.eligible(geo, ()) and not gathered:
        # stride 1: a depthwise correlation of dy with the flipped filters, padded by (K - 1) x
        # dilation - pad; strided: each dx position gathers its whole dy positions' taps
        unit = all(s == 1 for s in geo["stride"])
        lowered = depthwise.depthwise_spec(
            ctx, name.replace("backward_data", "backward_data_depthwise", 1) if not what else
            name.replace(what, what + "_depthwise", 1), C=C, mult=OCg, in_size=So, out_size=Si, K=Kr,
            stride=geo["stride"], dil=geo["dil"],
            pad=[(k - 1) * d - p for k, d, p in zip(Kr, geo["dil"], geo["pad"])] if unit else geo["pad"],
            row_setup=[], element=[f"dx[(bimg * {C} + grp) * {SiN}LL + p] = c{' + bias[grp]' if bias else ''};"],
            args=args, data=True)
        if lowered is not None:
            return lowered
    if zeros and DIRECT and direct.eligible(geo):
        # stride 1: a direct convolution of dy with the flipped filter, padded by K - 1 - pad
        if gathered:
            in_load, direct_used = gather_lines(gathered, ctx.dtype, f"bimg * {OC} + c", ["iy", "ix"])
        else:
            in_load, direct_used = [f"v = dy[((bimg * {OC} + c) * {So[0]}LL + iy) * {So[1]} + ix];"], set()
        direct_kernel = direct.direct_spec(
            ctx, name.replace("backward_data", "backward_data_direct", 1) if not what else
            name.replace(what, what + "_direct", 1), C=OC, M=C, K=Kr,
            pad=[k - 1 - p for k, p in zip(Kr, geo["pad"])], in_size=So, out_size=Si, cell=(2, 2), pooled=False,
            in_load=in_load, w_load=[f"v = w[((c * {C} + m) * {Kr[0]} + ({Kr[0] - 1} - r)) * {Kr[1]} + ({Kr[1] - 1} - s)];"],
            row_setup=[], window_begin=[], element=[f"dx[(bimg * {C} + m) * {SiN}LL + p] = c{' + bias[m]' if bias else ''};"],
            window_end=[],
            args=args, prelude=c_function_prelude(direct_used, ctx.dtype),
            in_desc=("in = act'(z) * dy routed to each window's argmax, gathered from the pooled gradient and codes"
                     if gathered else "in = dy"), w_desc="w[c, m, K-1-r, K-1-s] (the flipped filter)")
        if direct_kernel is not None:
            return direct_kernel
    return gemm_specs(ctx, name, M=Cg, N=ctx.images * SiN, K=OCg * KK, a=a, b=b, row_setup=[], window_begin=[],
                      element=element, window_end=[], args=args, cfg=cfg, groups=groups,
                      prelude=c_function_prelude(used, ctx.dtype),
                      a_desc="w[oc, c, r]", b_desc="dy[b, oc, (h + pad - r*dilation) / stride] (0 off the grid)" if zeros
                      else f"the sum of dy[b, oc, (u + pad - r*dilation) / stride] (0 off the grid) over the "
                           f"positions u of the padded input that copy h ({geo['mode']} padding)")


def padded_sources_load(geo, Si, So, load) -> tuple[list, list]:
    """(B setup lines, B load lines) of a backward-data GEMM under a padding mode other than zeros:
    v = the sum over every padded position u copying the input position h@ of dy at the output
    position reading u with kernel offset r, where there is one. `load` is the dy read with {} for
    the flat output position. Replicate: the positions copying h are one run an axis (h alone inside,
    the whole padding at an edge): a loop an axis. Reflect, circular: up to 3 positions an axis,
    whether each copies h known per column (set up once, outside the k loop), all combinations
    unrolled (at most 27, in 3-D)."""
    nd = len(Si)
    conds = []
    for d in range(nd):
        s = geo["stride"][d]
        conds.append(f"t{d} >= 0" + (f" && t{d} % {s} == 0" if s > 1 else "") + f" && t{d} / {s} < {So[d]}")
    coords = [f"t{d} / {geo['stride'][d]}" if geo["stride"][d] > 1 else f"t{d}" for d in range(nd)]
    if geo["mode"] == "replicate":
        setup, lines, indent = [], [], ""
        for d in range(nd):
            setup += [f"const int ulo@_{d} = h@_{d} == 0 ? {-geo['pad'][d]} : h@_{d};",
                      f"const int uhi@_{d} = h@_{d} == {Si[d] - 1} ? {Si[d] - 1 + geo['pad_hi'][d]} : h@_{d};"]
        for d in range(nd):
            lines += [f"{indent}for (int u{d} = ulo@_{d}; u{d} <= uhi@_{d}; ++u{d}) {{",
                      f"{indent}    const int t{d} = u{d} + {geo['pad'][d]} - r{d} * {geo['dil'][d]};",
                      f"{indent}    if (!({conds[d]})) continue;"]
            indent += "    "
        lines.append(f"{indent}v += {load.format(flat(coords, So))};")
        return setup, lines + ["    " * d + "}" for d in reversed(range(nd))]
    axes, setup = [], []
    for d in range(nd):
        sources = []
        for j, (u, cond) in enumerate(mode_sources(geo["mode"], f"h@_{d}", Si[d], geo["pad"][d], geo["pad_hi"][d])):
            if cond:
                setup.append(f"const bool src@_{d}_{j} = {cond};")
            sources.append((u, f"src@_{d}_{j}" if cond else ""))
        axes.append(sources)
    lines = []
    for combo in itertools.product(*axes):
        guards = [c for _, c in combo if c]
        body = [f"const int t{d} = {u} + {geo['pad'][d]} - r{d} * {geo['dil'][d]};" for d, (u, _) in enumerate(combo)]
        lines += [f"if ({' && '.join(guards)}) {{" if guards else "{"] + [f"    {line}" for line in body] + \
                 [f"    if ({' && '.join(conds)}) v += {load.format(flat(coords, So))};", "}"]
    return setup, lines


@lowering("conv1d_backward_weight", "conv2d_backward_weight", "conv3d_backward_weight")
def lower_conv_backward_weight(ctx):
    """dw[oc, c, r] = sum over (b, o) of dy[b, oc, o] * x[b, c, o*stride - pad + r*dil]: a GEMM over
    rows oc, columns (c, r), depth (b, o), the depth split over blocks (it grows with the batch)."""
    x, dy = ctx.ins
    geo = conv_geometry(ctx, ctx.attrs, x, ctx.outs[0])
    nd, C, Si, OC, Cg, Kr, groups = geo["nd"], geo["C"], geo["Si"], geo["OC"], geo["Cg"], geo["Kr"], geo["groups"]
    So, OCg = ints(dy.shape[2:]), OC // groups
    SiN, SoN, KK = math.prod(Si), math.prod(So), math.prod(Kr)
    cfg = tile_config(OCg, Cg * KK, 1, wide=True)
    gathered = gathered_gradient(ctx.graph, ctx.operands[1])
    used = set()
    # k = (image bi, output position o0, o1, ...): digits kept in registers, shared by every slot
    digits = [("bi", None)] + [(f"o{d}", So[d]) for d in range(nd)]
    o_coords = [f"o{d}" for d in range(nd)]
    if gathered:   # dy is a pool/activation gradient: gather it from the pooled gradient and the codes
        shared, lines, used = gather_shared_lines(gathered, ctx.dtype, f"bi * {OC} + grp * {OCg} + m@", o_coords)
        a = {"fast": "k", "setup": [], "digits": digits, "shared": shared, "load": lines}
    else:
        a = {"fast": "k", "setup": [f"const long long dyc@ = (grp * {OCg} + m@) * {SoN}LL;"], "digits": digits,
             "shared": [f"const long long dyo = bi * {OC * SoN}LL + {flat(o_coords, So)};"],
             "load": ["v = dy[dyo + dyc@];"]}
    b_setup = [f"const int c@ = n@ / {KK};"] + unflatten(f"(int)(n@ % {KK})", Kr, "r@_")
    b_setup.append(f"const long long xc@ = (grp * {Cg} + c@) * {SiN}LL;")
    b_setup += [f"const int off@_{d} = r@_{d} * {geo['dil'][d]} - {geo['pad'][d]};" for d in range(nd)]
    b_shared = [f"const long long xb = bi * {C * SiN}LL;"] + \
               [f"const int os{d} = o{d} * {geo['stride'][d]};" for d in range(nd)]
    b_load = [f"const int i{d} = os{d} + off@_{d};" for d in range(nd)]
    idx = [f"i{d}" for d in range(nd)]
    if geo["mode"] == "zeros":
        b_load.append(f"if ({in_bounds(idx, Si)}) v = x[xb + xc@ + {flat(idx, Si)}];")
    else:
        b_load += [f"const int j{d} = {mode_coord(geo['mode'], f'i{d}', Si[d])};" for d in range(nd)]
        b_load.append(f"v = x[xb + xc@ + {flat([f'j{d}' for d in range(nd)], Si)}];")
    b = {"fast": "k", "setup": b_setup, "digits": digits, "shared": b_shared, "load": b_load}
    element = [f"dw[(grp * {OCg} + m) * {Cg * KK}LL + n] = c;"]
    args = [ctx.arg_in(0, "x")] + gather_args(ctx, gathered, 1) + [ctx.arg_out(0, "dw"), Arg("int", "batch")]
    name = (f"conv{nd}d_backward_weight{gather_tag(gathered)}_{short_dtype(ctx.dtype)}_c{C}_k{OC}_r{'x'.join(map(str, Kr))}"
            f"_s{'x'.join(map(str, geo['stride']))}_p{'x'.join(map(str, geo['pad']))}_i{'x'.join(map(str, Si))}"
            + (f"_g{groups}" if groups > 1 else "") + ("" if geo["mode"] == "zeros" else f"_{geo['mode']}"))
    zeros = geo["mode"] == "zeros"        # the depthwise and direct kernels pad with zeros only
    if zeros and depthwise.eligible(geo, ()) and not gathered:
        lowered = depthwise_backward_weight(ctx, name.replace("backward_weight", "backward_weight_depthwise", 1),
                                            geo, So, element)
        if lowered is not None:
            return lowered
    if zeros and DIRECT and direct_wgrad.ENABLED and direct_wgrad.eligible(geo):
        lowered = direct_backward_weight(ctx, name.replace("backward_weight", "backward_weight_direct", 1), geo,
                                         So, gathered, element)
        if lowered is not None:
            return lowered
    return gemm_specs(ctx, name, M=OCg, N=Cg * KK, K=ctx.images * SoN, a=a, b=b, row_setup=[], window_begin=[],
                      element=element, window_end=[], args=args, cfg=cfg, groups=groups, split=True,
                      prelude=c_function_prelude(used, ctx.dtype),
                      a_desc="dy[b, oc, o]", b_desc="x[b, c, o*stride - pad + r*dilation] " + (
                          "(0 outside)" if zeros else f"({geo['mode']} padding outside)"))


def direct_backward_weight(ctx, name, geo, So, gathered, element):
    """The direct weight-gradient kernel (direct_wgrad.py) and its split reduce, or None when no
    block shape fits."""
    C, OC, Kr = geo["C"], geo["OC"], geo["Kr"]
    T = ctx.float_type
    window = None
    if gathered:
        g_load, used = gather_lines(gathered, ctx.dtype, f"b * {OC} + mm", ["oy", "ox"])
        lines, _ = gather_window_lines(gathered, ctx.dtype, f"b * {OC} + mm", ["py", "px"])
        window = {"k": tuple(gathered["k"]), "lines": lines}
        g_desc = "act'(z) * dy routed to each window's argmax, gathered from the pooled gradient and codes"
    else:
        g_load, used = [f"v = dy[((b * {OC} + mm) * {So[0]}LL + oy) * {So[1]} + ox];"], set()
        g_desc = "dy"
    key = ctx.scratch_key("partial")
    args = [ctx.arg_in(0, "x")] + gather_args(ctx, gathered, 1) + [Arg(f"{T}*", "partial", key), Arg("int", "batch")]
    built = direct_wgrad.wgrad_spec(ctx, name, C=C, M=OC, K=Kr, pad=geo["pad"], in_size=geo["Si"], out_size=So,
                                    g_load=g_load, g_desc=g_desc, g_window=window, args=args,
                                    prelude=c_function_prelude(used, ctx.dtype))
    if built is None:
        return None
    first, S = built
    N = C * math.prod(Kr)
    if sp.sympify(S) == 1:       # one split at every batch (the channel blocks alone fill the GPU): no reduce
        first.name = name + ("_tf32" if first.params.get("tf32") else "")
        first.args = [a if a.name != "partial" else Arg(f"{T}*", "partial", ctx.out_key(0)) for a in first.args]
        return Lowered(kernels=[first])
    second = reduce_spec(ctx, name, M=OC, N=N, K=ctx.images * math.prod(So), S=S, groups=1, element=element,
                         args=[Arg(f"const {T}*", "partial", key), ctx.arg_out(0, "dw"), Arg("int", "batch")])
    return Lowered(kernels=[first, second], scratch={key: Value((S * OC * N,), ctx.dtype)})


def depthwise_backward_weight(ctx, name, geo, So, element):
    """The depthwise weight-gradient kernel (depthwise.py) and its split reduce, or None."""
    T, C, OC, Kr = ctx.float_type, geo["C"], geo["OC"], geo["Kr"]
    key = ctx.scratch_key("partial")
    args = [ctx.arg_in(0, "x"), ctx.arg_in(1, "dy"), Arg(f"{T}*", "partial", key), Arg("int", "batch")]
    built = depthwise.wgrad_spec(ctx, name, C=C, mult=OC // C, in_size=geo["Si"], out_size=So, K=Kr,
                                 stride=geo["stride"], dil=geo["dil"], pad=geo["pad"], args=args)
    if built is None:
        return None
    first, S = built
    second = reduce_spec(ctx, name, M=OC, N=math.prod(Kr), K=ctx.images * math.prod(So), S=S, groups=1, element=element,
                         args=[Arg(f"const {T}*", "partial", key), ctx.arg_out(0, "dw"), Arg("int", "batch")])
    return Lowered(kernels=[first, second], scratch={key: Value((S * OC * math.prod(Kr),), ctx.dtype)})


def gather_args(ctx, gathered, i):
    """The gradient operand: dy itself, or what a gathered pool/activation gradient is made from."""
    if not gathered:
        return [ctx.arg_in(i, "dy")]
    T = ctx.float_type
    return [Arg(f"const {T}*", "gdy", gathered["dpool"]), Arg("const unsigned char*", "gcode", gathered["codes"]),
            Arg(f"const {T}*", "gaux", gathered["aux"])]


def gather_tag(gathered) -> str:
    if not gathered:
        return ""
    return f"_{gathered['act'][0]}_maxpool{'x'.join(map(str, gathered['k']))}_gathered"


# ---- dense products ---------------------------------------------------------------------------------
def dense_operand(arr, rows, inner, transposed, which):
    """A[m, k] (which='a', rows=M) or B[k, n] (which='b', rows=N) of a row-major matrix, transposed or not."""
    if which == "a":
        # stored [M, K] (k contiguous) or [K, M] (m contiguous)
        return ({"fast": "m", "setup": [], "load": [f"v = {arr}[k * ({rows}) + m@];"]} if transposed else
                {"fast": "k", "setup": [f"const long long arow@ = m@ * ({inner});"], "load": [f"v = {arr}[arow@ + k];"]})
    return ({"fast": "k", "setup": [f"const long long brow@ = n@ * ({inner});"], "load": [f"v = {arr}[brow@ + k];"]}
            if transposed else {"fast": "n", "setup": [], "load": [f"v = {arr}[k * ({rows}) + n@];"]})


def dense_epilogue(ctx, steps, extra_index, width, bias, args):
    """The store of a dense GEMM (linear, matmul) with a fused epilogue: C lines reading the sum `c`
    at row m, column n of a `width`-wide result, the device functions they use and a name suffix; an
    extra operand is a scalar, per column or full-size (appended to `args`)."""
    T = ctx.float_type
    if not steps:
        return [f"out[m * {width} + n] = ({T})c{bias};"], set(), ""
    loads, names = [], {"z": "z"}
    for r in range(len(ctx.operands) - extra_index):
        names[f"e{r}"] = f"ex{r}"
        loads.append(f"const {T} ex{r} = ep{r}[{operand_index(ctx.ins[extra_index + r].shape, ctx.outs[0].shape, 'fi')}];")
        args.append(ctx.arg_in(extra_index + r, f"ep{r}"))
    temps, result, used = c_expression(epilogue_expr(steps, sp.Symbol("z", real=True)), ctx.dtype, names)
    element = [f"const long long fi = m * {width} + n;", f"const {T} z = ({T})c{bias};"] + loads + temps + \
        [f"out[fi] = {result};"]
    suffix = ""
    if len(ctx.operands) > extra_index or any(items for _, items, _ in steps):
        from ..cache import digest
        suffix = "_" + digest(repr(steps))[:6]
    return element, used, suffix


@lowering("linear", "fused_linear")
def lower_linear(ctx):
    """out[b, f] = act(x[b, :] . w[:, f] + bias[f]) (w is [in, out]; act: a fused_linear's epilogue,
    applied where the sum is stored: by the GEMM, or by the reduce of a split one): rows are
    examples, columns features (stores coalesced)."""
    fused = ctx.node.op == "fused_linear"
    x, w = ctx.ins[0], ctx.ins[1]
    In, F = int(w.shape[0]), int(w.shape[1])
    M = numel(x.shape[:-1])
    cfg = tile_config(M, F, 1, wide=In >= 4 * STATIC_SPLIT_LEAST)
    a = dense_operand("x", "M", In, False, "a")
    b = dense_operand("w", F, In, False, "b")
    has_bias = ctx.attrs["bias"] if fused else len(ctx.operands) > 2
    steps = ctx.attrs["epilogue"] if fused else ()
    args = [ctx.arg_in(0, "x"), ctx.arg_in(1, "w")] + ([ctx.arg_in(2, "bias")] if has_bias else [])
    element, used, suffix = dense_epilogue(ctx, steps, 3 if has_bias else 2, f"{F}LL",
                                           " + bias[n]" if has_bias else "", args)
    name = "_".join(["linear"] + [op for op, _, _ in steps]) + f"_{short_dtype(ctx.dtype)}_in{In}_out{F}" + \
        ("" if has_bias else "_nobias") + suffix
    args += [ctx.arg_out(0, "out"), Arg("int", "batch")]
    # a long static depth is split too when the output tiles alone would leave multiprocessors idle
    # (H200: LeNet-5's fc1, 2450 deep, ran 32 blocks at batch 256, 3.9 TFLOP/s; not yet timed split)
    return gemm_specs(ctx, name, M=M, N=F, K=In, a=a, b=b, row_setup=[], window_begin=[], element=element,
                      window_end=[], args=args, cfg=cfg, a_desc="x[m, k]", b_desc="w[k, n]",
                      prelude=c_function_prelude(used, ctx.dtype),
                      split=In >= 4 * STATIC_SPLIT_LEAST, split_least=STATIC_SPLIT_LEAST)


@lowering("matmul", "fused_matmul")
def lower_matmul(ctx):
    """out = act(op(a) @ op(b)) (op: a transpose or not; act: a fused_matmul's epilogue, applied
    where the sum is stored)."""
    A, B = ctx.ins[0], ctx.ins[1]
    ta, tb = ctx.attrs["transpose_a"], ctx.attrs["transpose_b"]
    M, K = (A.shape[1], A.shape[0]) if ta else (A.shape[0], A.shape[1])
    N = B.shape[0] if tb else B.shape[1]
    cfg = tile_config(M, N, 1, wide=sp.sympify(K).has(BATCH))
    a = dense_operand("a", c_int(M), c_int(K), ta, "a")
    b = dense_operand("b", c_int(N), c_int(K), tb, "b")
    steps = ctx.attrs["epilogue"] if ctx.node.op == "fused_matmul" else ()
    args = [ctx.arg_in(0, "a"), ctx.arg_in(1, "b")]
    if steps:
        element, used, suffix = dense_epilogue(ctx, steps, 2, "N", "", args)
    else:
        element, used, suffix = ["out[m * N + n] = c;"], set(), ""
    args += [ctx.arg_out(0, "out"), Arg("int", "batch")]
    dims = lambda d: "N" if sp.sympify(d).has(BATCH) else str(d)   # noqa: E731
    name = (f"matmul{'_ta' if ta else ''}{'_tb' if tb else ''}{''.join('_' + op for op, _, _ in steps)}_"
            f"{short_dtype(ctx.dtype)}_m{dims(M)}_n{dims(N)}_k{dims(K)}{suffix}")
    return gemm_specs(ctx, name, M=M, N=N, K=K, a=a, b=b, row_setup=[], window_begin=[], element=element,
                      window_end=[], args=args, cfg=cfg, split=sp.sympify(K).has(BATCH),
                      prelude=c_function_prelude(used, ctx.dtype),
                      a_desc="a[k, m]" if ta else "a[m, k]", b_desc="b[n, k]" if tb else "b[k, n]")
