"""The ``"tiled"`` variant's kernels: channel-vector tiles for bandwidth, every operand moved once.

Design (the layout of mmcv's CARAFE and fairseq's dynamic convolution kernels, NATTEN's 2-D
query tiles, expressed in Triton):

- A program owns a 2-D tile of ``TILE_H x TILE_W`` pixels times a block of ``BLOCK_C`` channels:
  ``GB`` whole groups of ``CC`` channels each (``CC`` = C/G rounded up to a power of two, or a
  ``BLOCK_C`` slice of a wider group). On channels_last tensors each pixel's channel vector is
  one contiguous load of up to ``BLOCK_C`` elements (128 B for 64 bf16 channels), so loads and
  stores are coalesced along channels; NCHW tensors are read through the same strides.
- Tiles run over a "tall image" of ``B * H_out`` rows: a tile may straddle two images (each
  lane computes its own batch index), so a 7x7 map wastes no lanes on row padding.
- Per tap, the kernel value of each (pixel, group) is loaded once, as a (pixels, groups, 1)
  tensor broadcast in registers over the group's channels, and the shifted input tile is read
  from the tile's neighbourhood: the K*K shifted loads of one program hit the same
  (TILE_H + K - 1) x (TILE_W + K - 1) halo, which stays in L1, and neighbouring programs (tiles
  vary fastest in the launch order) share their halos in L2. Outputs are written once.
- The kernel tensor is read through its strides, so the (B, G*K*K, H, W) channels_last output
  of the span conv (a pixel-major (B, H, W, G, K, K) view) is used in place, without the copy a
  ``.contiguous()`` would make of the largest operand.
- grad_input is the adjoint gather (no atomics): an input pixel sums, over the taps that read
  it, kernel value times grad_output, at the output pixel ``(ih + p - kh*d) / s`` when that
  division is exact. grad_weight is a per-pixel dot product over each group's channels: the
  program holds its grad_output tile and, per tap, reduces grad_output * shifted input over the
  channel axis.
- The fused forward generates each tap's kernel values with two small matrix products on the
  tensor cores: (pixels, R) @ (R, 16 group slots) for the span conv of up to 16 groups, then a
  0/1 (16, BLOCK_C) matrix that copies each group's value to its channels (exact: one non-zero
  term per sum). The (B, G*K*K, H, W) kernel tensor is never written.

Strides arrive as one tuple per tensor: (b, c, h, w) for the features (``sx`` for ``x``, ...),
(b, g, kh, kw, h, w) for the kernels (``sw``); the convolution as ``geometry`` (:mod:`~.taps`).
Every output element is written by one program, without atomics: results are deterministic.
Accumulation is float32 (float64 for float64 tensors). The launchers are in :mod:`~.tiled`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from involution.ops.backends.triton.launch import autotune_configs
from involution.ops.backends.triton.taps import source, spatial_offsets, tap

#: Aggregation tilings (TILE_H, TILE_W, BLOCK_C, warps, stages): 8-32 elements per thread,
#: 64-256 B channel vectors in bf16; compiled for sm_90 with channels_last strides each uses
#: 85-126 registers without spills (ptxas -v, Triton 3.8). The kernels loop over the taps at
#: run time: unrolling the 7 columns let the compiler hoist 7 tiles of loads and spill. The
#: interpreter gets one small tile that still exercises several tiles per image, partial
#: tiles, several groups per program and groups split across programs in the test shapes.
CONFIGS = autotune_configs("tiled")
#: The fused kernel's tilings, pruned per call to those that hold whole groups.
FUSED_CONFIGS = autotune_configs("tiled_fused")

#: Autotune key: the shape and convolution parameters that change the best tiling. The
#: strides of the kernels and (added per kernel) of a feature map tell the memory layouts apart
#: (NCHW or channels_last features, contiguous or pixel-major kernels).
KEY = ["G", "CG", "H", "W", "OH", "OW", "geometry", "KH", "KW", "sw"]

#: The fused kernel's group slots: tl.dot needs N >= 16, and a program holds whole groups.
FUSED_SLOTS = 16


def fused_block_fits(block_c: int, cgp: int) -> bool:
    """Whether a fused program of ``block_c`` channels holds whole groups of ``cgp`` channels,
    at most :data:`FUSED_SLOTS` of them."""
    return cgp <= block_c <= FUSED_SLOTS * cgp


def _prune_fused(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The fused tilings that fit the call's group width (``CGP``)."""
    cgp = {**named_args, **kwargs}["CGP"]
    return [config for config in configs if fused_block_fits(config.kwargs["BLOCK_C"], cgp)]


@triton.jit
def _tile_pixels(pid, ROWS, COLS, ROWS_PER_IMAGE, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """(batch, row, column, in-range) of the TILE_H*TILE_W lanes of program ``pid``'s tile, and
    the program's channel block.

    Tiles cover a tall image of ``ROWS`` = B * ROWS_PER_IMAGE rows and ``COLS`` columns; they
    vary fastest in the launch order, then the channel blocks.
    """
    tiles_w = tl.cdiv(COLS, TILE_W)
    n_tiles = tl.cdiv(ROWS, TILE_H) * tiles_w
    pid_tile = pid % n_tiles
    lane = tl.arange(0, TILE_H * TILE_W)
    tall_row = (pid_tile // tiles_w) * TILE_H + lane // TILE_W
    col = (pid_tile % tiles_w) * TILE_W + lane % TILE_W
    valid = (tall_row < ROWS) & (col < COLS)
    batch = (tall_row // ROWS_PER_IMAGE).to(tl.int64)
    return batch, tall_row % ROWS_PER_IMAGE, col, valid, pid // n_tiles


@triton.jit
def _channel_block(pid_c, G, CG, CC: tl.constexpr, GB: tl.constexpr):
    """Groups (GB,), channels (GB, CC) and their masks (GB,) and (1, GB, CC) of channel block
    ``pid_c``.

    A block is GB consecutive groups times CC channels of each; a group wider than CC is split
    over ceil(CG / CC) blocks.
    """
    chunks = tl.cdiv(CG, CC)
    group = (pid_c // chunks) * GB + tl.arange(0, GB)
    within = (pid_c % chunks) * CC + tl.arange(0, CC)
    ok_g = group < G
    ok_gc = (ok_g[:, None] & (within < CG)[None, :])[None, :, :]
    return group, group[:, None] * CG + within[None, :], ok_g, ok_gc


@triton.jit
def _accumulate_tap(acc, kernel_ptrs, feature_ptrs, ok, ok_g, ok_gc, ACC_DTYPE: tl.constexpr):
    """``acc`` (pixels, GB, CC) plus one tap: the features at ``feature_ptrs`` (pixels, GB, CC)
    times the kernel value of each (pixel, group) at ``kernel_ptrs`` (pixels, GB), loaded once
    and broadcast over the group's channels; zero where ``ok`` (pixels,) is false."""
    kernel = tl.load(kernel_ptrs, mask=ok[:, None] & ok_g[None, :], other=0.0)
    features = tl.load(feature_ptrs, mask=ok[:, None, None] & ok_gc, other=0.0)
    return acc + features.to(ACC_DTYPE) * kernel.to(ACC_DTYPE)[:, :, None]


@triton.jit
def _store_tile(ptr, pixel_offsets, channel_offsets, values, mask):
    """Store ``values`` (pixels, GB, CC) at ``ptr + pixel_offsets`` (pixels,) ``+
    channel_offsets`` (GB, CC), in the tensor's dtype, where ``mask`` (pixels, GB, CC) holds."""
    ptrs = (ptr + pixel_offsets)[:, None, None] + channel_offsets[None, :, :]
    tl.store(ptrs, values.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` on the tensor cores; full-precision products (not TF32) when ``IEEE`` (float32
    operands, to match the unfused conv)."""
    return tl.dot(a, b, input_precision="ieee") if IEEE else tl.dot(a, b)


@triton.autotune(configs=CONFIGS, key=[*KEY, "ADJOINT", "ss"])
@triton.jit
def aggregate_kernel(
    src_ptr,
    w_ptr,
    dst_ptr,
    G,
    CG,
    H,
    W,
    OH,
    OW,
    ROWS,
    ss,
    sw,
    sd,
    geometry,
    KH: tl.constexpr,
    KW: tl.constexpr,
    ADJOINT: tl.constexpr,
    CGP: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """A tile of ``dst`` gathered from ``src`` through the taps: the forward out[b, c, p] =
    sum_{kh,kw} w[b, g(c), kh, kw, p] * x[b, c, tap (kh, kw) of p] (``src`` x, ``dst`` out), or
    when ``ADJOINT`` its adjoint (``src`` grad_y, ``dst`` grad_x): grad_x[b, c, ih, iw] = sum
    over the taps (kh, kw) whose output pixel reads (ih, iw).

    Tiles cover ``dst`` (``ROWS`` = B * H_out, or B * H for the adjoint). Output row ``oh = (ih
    + pad - kh * dil) / stride`` reads input row ``ih`` when the division is exact and ``0 <= oh
    < OH`` (likewise for columns).
    """
    CC: tl.constexpr = CGP if CGP < BLOCK_C else BLOCK_C
    GB: tl.constexpr = BLOCK_C // CC
    b, row, col, valid, pid_c = _tile_pixels(
        tl.program_id(0), ROWS, W if ADJOINT else OW, H if ADJOINT else OH, TILE_H, TILE_W
    )
    group, chan, ok_g, ok_gc = _channel_block(pid_c, G, CG, CC, GB)

    src_chan = (src_ptr + b * ss[0])[:, None, None] + (chan * ss[1])[None, :, :]
    # The kernel values of dst's own pixels, or for the adjoint those of the pixels read.
    w_pix = w_ptr + b * sw[0]
    if not ADJOINT:
        w_pix = w_pix + row * sw[4] + col * sw[5]
    w_pix = w_pix[:, None] + (group * sw[1])[None, :]
    acc = tl.zeros((TILE_H * TILE_W, GB, CC), dtype=ACC_DTYPE)
    for kh in range(KH):
        src_h, reads_h = source(row, geometry, 0, kh, H, OH, ADJOINT)
        ok_h = valid & reads_h
        for kw in range(KW):
            src_w, reads_w = source(col, geometry, 1, kw, W, OW, ADJOINT)
            if ADJOINT:
                kernels = w_pix + (kh * sw[2] + kw * sw[3] + src_h * sw[4] + src_w * sw[5])[:, None]
            else:
                kernels = w_pix + kh * sw[2] + kw * sw[3]
            values = src_chan + spatial_offsets(ss, src_h, src_w)[:, None, None]
            acc = _accumulate_tap(acc, kernels, values, ok_h & reads_w, ok_g, ok_gc, ACC_DTYPE)

    dst_pixels = b * sd[0] + row * sd[2] + col * sd[3]
    _store_tile(dst_ptr, dst_pixels, chan * sd[1], acc, valid[:, None, None] & ok_gc)


@triton.autotune(configs=CONFIGS, key=[*KEY, "sx"])
@triton.jit
def backward_weight_kernel(
    go_ptr,
    x_ptr,
    gw_ptr,
    G,
    CG,
    H,
    W,
    OH,
    OW,
    ROWS,
    sg,
    sx,
    sw,
    geometry,
    KH: tl.constexpr,
    KW: tl.constexpr,
    CGP: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """grad_w[b, g, kh, kw, p] = sum over the channels c of g of grad_y[b, c, p] * x[b, c, tap].

    A program owns (tile of output pixels, GB groups) and reduces over whole groups in a fixed
    order. When a group fits the block (``CGP <= BLOCK_C``) its grad_output tile is loaded once
    and kept in registers across the taps; wider groups are summed chunk by chunk per tap.
    """
    CC: tl.constexpr = CGP if CGP < BLOCK_C else BLOCK_C
    GB: tl.constexpr = BLOCK_C // CC
    ONE_CHUNK: tl.constexpr = CGP <= BLOCK_C
    b, oh, ow, valid, pid_g = _tile_pixels(tl.program_id(0), ROWS, OW, OH, TILE_H, TILE_W)
    group = pid_g * GB + tl.arange(0, GB)
    ok_g = group < G
    within = tl.arange(0, CC)

    go_pix = (go_ptr + b * sg[0] + oh * sg[2] + ow * sg[3])[:, None, None]
    x_batch = (x_ptr + b * sx[0])[:, None, None]
    gw_pix = (gw_ptr + b * sw[0] + oh * sw[4] + ow * sw[5])[:, None] + (group * sw[1])[None, :]
    if ONE_CHUNK:
        chan = group[:, None] * CG + within[None, :]
        ok_gc = (ok_g[:, None] & (within < CG)[None, :])[None, :, :]
        grad = tl.load(
            go_pix + (chan * sg[1])[None, :, :], mask=valid[:, None, None] & ok_gc, other=0.0
        ).to(ACC_DTYPE)
    for kh in range(KH):
        ih, inside_h = tap(oh, geometry, 0, kh, H)
        ok_h = valid & inside_h
        for kw in range(KW):
            iw, inside_w = tap(ow, geometry, 1, kw, W)
            ok = (ok_h & inside_w)[:, None, None]
            x_pix = x_batch + spatial_offsets(sx, ih, iw)[:, None, None]
            if ONE_CHUNK:
                x = tl.load(x_pix + (chan * sx[1])[None, :, :], mask=ok & ok_gc, other=0.0)
                dot = tl.sum(grad * x.to(ACC_DTYPE), axis=2)
            else:
                dot = tl.zeros((TILE_H * TILE_W, GB), dtype=ACC_DTYPE)
                for c0 in range(0, CG, CC):
                    chan_c = group[:, None] * CG + (c0 + within)[None, :]
                    ok_c = (ok_g[:, None] & (c0 + within < CG)[None, :])[None, :, :]
                    grad_c = tl.load(
                        go_pix + (chan_c * sg[1])[None, :, :],
                        mask=valid[:, None, None] & ok_c,
                        other=0.0,
                    )
                    x = tl.load(x_pix + (chan_c * sx[1])[None, :, :], mask=ok & ok_c, other=0.0)
                    dot += tl.sum(grad_c.to(ACC_DTYPE) * x.to(ACC_DTYPE), axis=2)
            tl.store(
                gw_pix + kh * sw[2] + kw * sw[3],
                dot.to(gw_ptr.dtype.element_ty),
                mask=valid[:, None] & ok_g[None, :],
            )


@triton.autotune(
    configs=FUSED_CONFIGS,
    key=[*KEY[:-1], "R", "sx"],
    prune_configs_by={"early_config_prune": _prune_fused},
)
@triton.jit
def fused_forward_kernel(
    x_ptr,
    red_ptr,
    span_w_ptr,
    span_b_ptr,
    out_ptr,
    G,
    CG,
    R,
    H,
    W,
    OH,
    OW,
    ROWS,
    sx,
    sr,
    so,
    geometry,
    KH: tl.constexpr,
    KW: tl.constexpr,
    CGP: tl.constexpr,
    R_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[b, c, p] = sum_k kernel[b, g(c), k, p] * x[b, c, tap k of p], kernels generated here.

    kernel[b, g, k, p] = span_w[g*KK + k, :] . reduced[b, :, p] + span_b[g*KK + k], rounded to
    the tensor dtype as the unfused span conv would store it. ``span_w`` is contiguous
    (G*Kh*Kw, R); the launcher guarantees CGP <= BLOCK_C <= 16 * CGP (whole groups, at most 16
    per program) and R <= R_PAD.
    """
    GB: tl.constexpr = BLOCK_C // CGP
    SLOTS: tl.constexpr = 16  # FUSED_SLOTS: tl.dot needs N >= 16; slots beyond GB are zero
    b, oh, ow, valid, pid_g = _tile_pixels(tl.program_id(0), ROWS, OW, OH, TILE_H, TILE_W)
    group0 = pid_g * GB
    lane_c = tl.arange(0, BLOCK_C)
    group_c = group0 + lane_c // CGP
    within = lane_c % CGP
    ok_c = (group_c < G) & (within < CG)
    chan = group_c * CG + within
    slot = tl.arange(0, SLOTS)
    ok_slot = (slot < GB) & (group0 + slot < G)

    # The reduced features of the tile, (pixels, R_PAD), loaded once.
    offs_r = tl.arange(0, R_PAD)
    reduced = tl.load(
        (red_ptr + b * sr[0] + oh * sr[2] + ow * sr[3])[:, None] + (offs_r * sr[1])[None, :],
        mask=valid[:, None] & (offs_r < R)[None, :],
        other=0.0,
    )
    # copy[s, c] = 1 where channel lane c belongs to group slot s.
    copy = (lane_c // CGP)[None, :] == slot[:, None]
    if DOT_IN_FP32:
        reduced = reduced.to(tl.float32)
        copy = copy.to(tl.float32)
    else:
        copy = copy.to(out_ptr.dtype.element_ty)

    x_pix = (x_ptr + b * sx[0])[:, None] + (chan * sx[1])[None, :]
    span_rows = span_w_ptr + ((group0 + slot) * (KH * KW) * R)[None, :] + offs_r[:, None]
    ok_span = (offs_r < R)[:, None] & ok_slot[None, :]
    acc = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=tl.float32)
    for kh in range(KH):
        ih, inside_h = tap(oh, geometry, 0, kh, H)
        ok_h = valid & inside_h
        for kw in range(KW):
            k = kh * KW + kw
            span = tl.load(span_rows + k * R, mask=ok_span, other=0.0)  # (R_PAD, SLOTS)
            if DOT_IN_FP32:
                span = span.to(tl.float32)
            kernel = _dot(reduced, span, IEEE_DOT)
            if HAS_BIAS:
                bias = tl.load(
                    span_b_ptr + (group0 + slot) * (KH * KW) + k, mask=ok_slot, other=0.0
                )
                kernel += bias.to(tl.float32)[None, :]
            kernel = kernel.to(out_ptr.dtype.element_ty)
            if DOT_IN_FP32:
                kernel = kernel.to(tl.float32)
            # (pixels, SLOTS) @ (SLOTS, BLOCK_C): each channel gets its group's value, exactly.
            kernel_c = _dot(kernel, copy, IEEE_DOT)
            iw, inside_w = tap(ow, geometry, 1, kw, W)
            x = tl.load(
                x_pix + spatial_offsets(sx, ih, iw)[:, None],
                mask=(ok_h & inside_w)[:, None] & ok_c[None, :],
                other=0.0,
            )
            acc += x.to(tl.float32) * kernel_c

    out = (out_ptr + b * so[0] + oh * so[2] + ow * so[3])[:, None] + (chan * so[1])[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & ok_c[None, :])
