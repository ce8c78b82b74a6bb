"""The ``"tiled"`` Triton variant: channel-vector tiles for bandwidth, every operand moved once.

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

Every output element is written by one program, without atomics: results are deterministic.
Accumulation is float32 (float64 for float64 tensors).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import knobs

from involution.ops.backends.triton import (
    accumulator,
    autotune_enabled,
    device_guard,
    interpreter_enabled,
)
from involution.ops.layout import Pair, empty_output, memory_format_of


def _configs(rows: tuple[tuple[int, ...], ...], names: tuple[str, ...]) -> list[triton.Config]:
    """``triton.Config`` objects from (value..., num_warps[, num_stages]) rows."""
    configs = []
    for row in rows:
        kwargs = dict(zip(names, row[: len(names)], strict=True))
        warps, *stages = row[len(names) :]
        configs.append(triton.Config(kwargs, num_warps=warps, num_stages=(stages or [2])[0]))
    return configs


_TILE = ("TILE_H", "TILE_W", "BLOCK_C")

#: Aggregation tilings (TILE_H, TILE_W, BLOCK_C, warps[, stages]): 8-32 elements per thread,
#: 64-256 B channel vectors in bf16; compiled for sm_90 with channels_last strides each uses
#: 85-126 registers without spills (ptxas -v, Triton 3.8). The kernels loop over the taps at
#: run time: unrolling the 7 columns let the compiler hoist 7 tiles of loads and spill. The
#: interpreter gets one small tile that still exercises several tiles per image, partial
#: tiles, several groups per program and groups split across programs in the test shapes.
if knobs.runtime.interpret:
    CONFIGS = _configs(((4, 4, 8, 1),), _TILE)
    FUSED_CONFIGS = _configs(((4, 4, 16, 1),), _TILE)
elif not autotune_enabled():
    CONFIGS = _configs(((8, 8, 64, 4),), _TILE)
    FUSED_CONFIGS = _configs(((8, 8, 64, 4, 2),), _TILE)
else:
    CONFIGS = _configs(
        (
            (8, 8, 64, 4),
            (8, 8, 64, 8),
            (4, 16, 64, 4),
            (4, 8, 64, 4),
            (2, 32, 64, 8),
            (8, 8, 128, 8),
            (4, 8, 128, 4),
            (8, 16, 32, 4),
        ),
        _TILE,
    )
    FUSED_CONFIGS = _configs(
        (
            (8, 8, 64, 4, 2),
            (4, 8, 128, 4, 2),
            (4, 8, 256, 8, 2),
            (8, 8, 128, 8, 3),
            (8, 16, 64, 8, 2),
        ),
        _TILE,
    )

#: Autotune key: the shape and convolution parameters that change the best tiling. A channel
#: stride and a kernel-tap stride tell the memory layouts apart (NCHW or channels_last
#: features, contiguous or pixel-major kernels).
KEY = ["G", "CG", "H", "W", "OH", "OW", "stride_h", "stride_w", "KH", "KW", "sw_kw"]

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
def _tile_pixels(pid_tile, ROWS, COLS, ROWS_PER_IMAGE, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """(batch, row, column, in-range) of the TILE_H*TILE_W lanes of tile ``pid_tile``.

    Tiles cover a tall image of ``ROWS`` = B * ROWS_PER_IMAGE rows and ``COLS`` columns.
    """
    tiles_w = tl.cdiv(COLS, TILE_W)
    lane = tl.arange(0, TILE_H * TILE_W)
    tall_row = (pid_tile // tiles_w) * TILE_H + lane // TILE_W
    col = (pid_tile % tiles_w) * TILE_W + lane % TILE_W
    valid = (tall_row < ROWS) & (col < COLS)
    batch = (tall_row // ROWS_PER_IMAGE).to(tl.int64)
    return batch, tall_row % ROWS_PER_IMAGE, col, valid


@triton.jit
def _channel_block(pid_c, G, CG, CC: tl.constexpr, GB: tl.constexpr):
    """Groups (GB,) and channels-within-group (CC,) of channel block ``pid_c``, with masks.

    A block is GB consecutive groups times CC channels of each; a group wider than CC is split
    over ceil(CG / CC) blocks.
    """
    chunks = tl.cdiv(CG, CC)
    group = (pid_c // chunks) * GB + tl.arange(0, GB)
    within = (pid_c % chunks) * CC + tl.arange(0, CC)
    return group, within, group < G, within < CG


@triton.autotune(configs=CONFIGS, key=[*KEY, "sx_c"])
@triton.jit
def forward_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    G,
    CG,
    H,
    W,
    OH,
    OW,
    ROWS,
    sx_b,
    sx_c,
    sx_h,
    sx_w,
    sw_b,
    sw_g,
    sw_kh,
    sw_kw,
    sw_h,
    sw_w,
    so_b,
    so_c,
    so_h,
    so_w,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    CGP: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[b, c, p] = sum_{kh,kw} w[b, g(c), kh, kw, p] * x[b, c, tap (kh, kw) of p]."""
    CC: tl.constexpr = CGP if CGP < BLOCK_C else BLOCK_C
    GB: tl.constexpr = BLOCK_C // CC
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(ROWS, TILE_H) * tl.cdiv(OW, TILE_W)
    b, oh, ow, valid = _tile_pixels(pid % n_tiles, ROWS, OW, OH, TILE_H, TILE_W)
    group, within, ok_g, ok_c = _channel_block(pid // n_tiles, G, CG, CC, GB)
    chan = group[:, None] * CG + within[None, :]  # (GB, CC)
    ok_gc = (ok_g[:, None] & ok_c[None, :])[None, :, :]

    x_chan = (x_ptr + b * sx_b)[:, None, None] + (chan * sx_c)[None, :, :]
    w_pix = (w_ptr + b * sw_b + oh * sw_h + ow * sw_w)[:, None] + (group * sw_g)[None, :]
    acc = tl.zeros((TILE_H * TILE_W, GB, CC), dtype=ACC_DTYPE)
    for kh in range(KH):
        ih = oh * stride_h - pad_h + kh * dil_h
        ok_h = valid & (ih >= 0) & (ih < H)
        for kw in range(KW):
            iw = ow * stride_w - pad_w + kw * dil_w
            ok = ok_h & (iw >= 0) & (iw < W)
            # One kernel value per (pixel, group), broadcast over the group's channels.
            kernel = tl.load(
                w_pix + kh * sw_kh + kw * sw_kw, mask=ok[:, None] & ok_g[None, :], other=0.0
            )
            x = tl.load(
                x_chan + (ih * sx_h + iw * sx_w)[:, None, None],
                mask=ok[:, None, None] & ok_gc,
                other=0.0,
            )
            acc += x.to(ACC_DTYPE) * kernel.to(ACC_DTYPE)[:, :, None]

    out = (out_ptr + b * so_b + oh * so_h + ow * so_w)[:, None, None] + (chan * so_c)[None, :, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None, None] & ok_gc)


@triton.autotune(configs=CONFIGS, key=[*KEY, "sg_c"])
@triton.jit
def backward_input_kernel(
    go_ptr,
    w_ptr,
    gi_ptr,
    G,
    CG,
    H,
    W,
    OH,
    OW,
    ROWS,
    sg_b,
    sg_c,
    sg_h,
    sg_w,
    sw_b,
    sw_g,
    sw_kh,
    sw_kw,
    sw_h,
    sw_w,
    si_b,
    si_c,
    si_h,
    si_w,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    CGP: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """grad_x[b, c, ih, iw] = sum over the taps (kh, kw) whose output pixel reads (ih, iw).

    Tiles cover the input (``ROWS`` = B * H). Output row ``oh = (ih + pad - kh * dil) / stride``
    contributes when the division is exact and ``0 <= oh < OH`` (likewise for columns).
    """
    CC: tl.constexpr = CGP if CGP < BLOCK_C else BLOCK_C
    GB: tl.constexpr = BLOCK_C // CC
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(ROWS, TILE_H) * tl.cdiv(W, TILE_W)
    b, ih, iw, valid = _tile_pixels(pid % n_tiles, ROWS, W, H, TILE_H, TILE_W)
    group, within, ok_g, ok_c = _channel_block(pid // n_tiles, G, CG, CC, GB)
    chan = group[:, None] * CG + within[None, :]
    ok_gc = (ok_g[:, None] & ok_c[None, :])[None, :, :]

    go_chan = (go_ptr + b * sg_b)[:, None, None] + (chan * sg_c)[None, :, :]
    w_batch = (w_ptr + b * sw_b)[:, None] + (group * sw_g)[None, :]
    acc = tl.zeros((TILE_H * TILE_W, GB, CC), dtype=ACC_DTYPE)
    for kh in range(KH):
        th = ih + pad_h - kh * dil_h
        oh = th // stride_h
        # th >= 0 first: the rounding of // and % on negatives does not matter then.
        ok_h = valid & (th >= 0) & (th % stride_h == 0) & (oh < OH)
        for kw in range(KW):
            tw = iw + pad_w - kw * dil_w
            ow = tw // stride_w
            ok = ok_h & (tw >= 0) & (tw % stride_w == 0) & (ow < OW)
            kernel = tl.load(
                w_batch + (kh * sw_kh + kw * sw_kw + oh * sw_h + ow * sw_w)[:, None],
                mask=ok[:, None] & ok_g[None, :],
                other=0.0,
            )
            grad = tl.load(
                go_chan + (oh * sg_h + ow * sg_w)[:, None, None],
                mask=ok[:, None, None] & ok_gc,
                other=0.0,
            )
            acc += grad.to(ACC_DTYPE) * kernel.to(ACC_DTYPE)[:, :, None]

    gi = (gi_ptr + b * si_b + ih * si_h + iw * si_w)[:, None, None] + (chan * si_c)[None, :, :]
    tl.store(gi, acc.to(gi_ptr.dtype.element_ty), mask=valid[:, None, None] & ok_gc)


@triton.autotune(configs=CONFIGS, key=[*KEY, "sx_c"])
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
    sg_b,
    sg_c,
    sg_h,
    sg_w,
    sx_b,
    sx_c,
    sx_h,
    sx_w,
    sw_b,
    sw_g,
    sw_kh,
    sw_kw,
    sw_h,
    sw_w,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
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
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(ROWS, TILE_H) * tl.cdiv(OW, TILE_W)
    b, oh, ow, valid = _tile_pixels(pid % n_tiles, ROWS, OW, OH, TILE_H, TILE_W)
    group = (pid // n_tiles) * GB + tl.arange(0, GB)
    ok_g = group < G
    within = tl.arange(0, CC)

    go_pix = (go_ptr + b * sg_b + oh * sg_h + ow * sg_w)[:, None, None]
    x_batch = (x_ptr + b * sx_b)[:, None, None]
    gw_pix = (gw_ptr + b * sw_b + oh * sw_h + ow * sw_w)[:, None] + (group * sw_g)[None, :]
    if ONE_CHUNK:
        chan = group[:, None] * CG + within[None, :]
        ok_gc = (ok_g[:, None] & (within < CG)[None, :])[None, :, :]
        grad = tl.load(
            go_pix + (chan * sg_c)[None, :, :], mask=valid[:, None, None] & ok_gc, other=0.0
        ).to(ACC_DTYPE)
    for kh in range(KH):
        ih = oh * stride_h - pad_h + kh * dil_h
        ok_h = valid & (ih >= 0) & (ih < H)
        for kw in range(KW):
            iw = ow * stride_w - pad_w + kw * dil_w
            ok = (ok_h & (iw >= 0) & (iw < W))[:, None, None]
            x_pix = x_batch + (ih * sx_h + iw * sx_w)[:, None, None]
            if ONE_CHUNK:
                x = tl.load(x_pix + (chan * sx_c)[None, :, :], mask=ok & ok_gc, other=0.0)
                dot = tl.sum(grad * x.to(ACC_DTYPE), axis=2)
            else:
                dot = tl.zeros((TILE_H * TILE_W, GB), dtype=ACC_DTYPE)
                for c0 in range(0, CG, CC):
                    chan_c = group[:, None] * CG + (c0 + within)[None, :]
                    ok_c = (ok_g[:, None] & (c0 + within < CG)[None, :])[None, :, :]
                    grad_c = tl.load(
                        go_pix + (chan_c * sg_c)[None, :, :],
                        mask=valid[:, None, None] & ok_c,
                        other=0.0,
                    )
                    x = tl.load(x_pix + (chan_c * sx_c)[None, :, :], mask=ok & ok_c, other=0.0)
                    dot += tl.sum(grad_c.to(ACC_DTYPE) * x.to(ACC_DTYPE), axis=2)
            tl.store(
                gw_pix + kh * sw_kh + kw * sw_kw,
                dot.to(gw_ptr.dtype.element_ty),
                mask=valid[:, None] & ok_g[None, :],
            )


@triton.autotune(
    configs=FUSED_CONFIGS,
    key=[*KEY[:-1], "R", "sx_c"],
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
    sx_b,
    sx_c,
    sx_h,
    sx_w,
    sr_b,
    sr_c,
    sr_h,
    sr_w,
    so_b,
    so_c,
    so_h,
    so_w,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
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
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(ROWS, TILE_H) * tl.cdiv(OW, TILE_W)
    b, oh, ow, valid = _tile_pixels(pid % n_tiles, ROWS, OW, OH, TILE_H, TILE_W)
    group0 = (pid // n_tiles) * GB
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
        (red_ptr + b * sr_b + oh * sr_h + ow * sr_w)[:, None] + (offs_r * sr_c)[None, :],
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

    x_pix = (x_ptr + b * sx_b)[:, None] + (chan * sx_c)[None, :]
    span_rows = span_w_ptr + ((group0 + slot) * (KH * KW) * R)[None, :] + offs_r[:, None]
    ok_span = (offs_r < R)[:, None] & ok_slot[None, :]
    acc = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=tl.float32)
    for kh in range(KH):
        ih = oh * stride_h - pad_h + kh * dil_h
        ok_h = valid & (ih >= 0) & (ih < H)
        for kw in range(KW):
            tap = kh * KW + kw
            span = tl.load(span_rows + tap * R, mask=ok_span, other=0.0)  # (R_PAD, SLOTS)
            if DOT_IN_FP32:
                span = span.to(tl.float32)
            # fp32 operands: full-precision products (not TF32) to match the unfused conv.
            if IEEE_DOT:
                kernel = tl.dot(reduced, span, input_precision="ieee")
            else:
                kernel = tl.dot(reduced, span)
            if HAS_BIAS:
                bias = tl.load(
                    span_b_ptr + (group0 + slot) * (KH * KW) + tap, mask=ok_slot, other=0.0
                )
                kernel += bias.to(tl.float32)[None, :]
            kernel = kernel.to(out_ptr.dtype.element_ty)
            if DOT_IN_FP32:
                kernel = kernel.to(tl.float32)
            # (pixels, SLOTS) @ (SLOTS, BLOCK_C): each channel gets its group's value, exactly.
            if IEEE_DOT:
                kernel_c = tl.dot(kernel, copy, input_precision="ieee")
            else:
                kernel_c = tl.dot(kernel, copy)
            iw = ow * stride_w - pad_w + kw * dil_w
            ok = ok_h & (iw >= 0) & (iw < W)
            x = tl.load(
                x_pix + (ih * sx_h + iw * sx_w)[:, None],
                mask=ok[:, None] & ok_c[None, :],
                other=0.0,
            )
            acc += x.to(tl.float32) * kernel_c

    out = (out_ptr + b * so_b + oh * so_h + ow * so_w)[:, None] + (chan * so_c)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & ok_c[None, :])


# --- Launchers -------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _tiles(rows: int, cols: int, meta: dict) -> int:
    return triton.cdiv(rows, meta["TILE_H"]) * triton.cdiv(cols, meta["TILE_W"])


def _channel_blocks(groups: int, cg: int, meta: dict, split_groups: bool = True) -> int:
    """Programs along channels: blocks of GB groups, each group split into CC-wide chunks."""
    cc = min(_pow2(cg), meta["BLOCK_C"])
    blocks = triton.cdiv(groups, meta["BLOCK_C"] // cc)
    return blocks * (triton.cdiv(cg, cc) if split_groups else 1)


def _conv_args(stride: Pair, padding: Pair, dilation: Pair) -> tuple[int, ...]:
    return (*stride, *padding, *dilation)


def _launch(
    kernel: Any,
    first: Tensor,
    second: Tensor,
    result: Tensor,
    input: Tensor,
    weight_shape: torch.Size,
    tiling: tuple[int, int],
    geometry: tuple[Pair, Pair, Pair],
    split_groups: bool = True,
) -> None:
    """Run one of the three tiled kernels, which share their argument order: two operands and
    the result (each with its strides), the problem's sizes from ``input`` (B, C, H, W) and
    ``weight_shape`` (B, G, Kh, Kw, H_out, W_out), and stride, padding, dilation. ``tiling`` is
    (rows, columns) of the pixel grid the programs cover."""
    _, channels, height, width = input.shape
    groups, kh, kw, out_h, out_w = weight_shape[1:]
    cg = channels // groups
    rows, columns = tiling

    def grid(meta: dict) -> tuple[int]:
        return (_tiles(rows, columns, meta) * _channel_blocks(groups, cg, meta, split_groups),)

    with device_guard(input):
        kernel[grid](
            first,
            second,
            result,
            groups,
            cg,
            height,
            width,
            out_h,
            out_w,
            rows,
            *first.stride(),
            *second.stride(),
            *result.stride(),
            *_conv_args(*geometry),
            KH=kh,
            KW=kw,
            CGP=_pow2(cg),
            ACC_DTYPE=accumulator(input.dtype),
        )


def forward(input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair) -> Tensor:
    """Output (B, C, H_out, W_out), in the memory format of ``input`` (B, C, H, W).

    ``input`` and ``weight`` (B, G, Kh, Kw, H_out, W_out) are read through their strides.
    """
    out_h, out_w = weight.shape[4:]
    output = empty_output(input, (out_h, out_w))
    tiling = (input.shape[0] * out_h, out_w)
    _launch(
        forward_kernel,
        input,
        weight,
        output,
        input,
        weight.shape,
        tiling,
        (stride, padding, dilation),
    )
    return output


def backward_input(
    grad_output: Tensor, input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair
) -> Tensor:
    """Gradient (B, C, H, W) with respect to ``input``, in its memory format."""
    grad_input = torch.empty_like(input, memory_format=memory_format_of(input))
    tiling = (input.shape[0] * input.shape[2], input.shape[3])
    _launch(
        backward_input_kernel,
        grad_output,
        weight,
        grad_input,
        input,
        weight.shape,
        tiling,
        (stride, padding, dilation),
    )
    return grad_input


def backward_weight(
    grad_output: Tensor, input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair
) -> Tensor:
    """Gradient (B, G, Kh, Kw, H_out, W_out) with respect to ``weight``, contiguous."""
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    out_h, out_w = weight.shape[4:]
    tiling = (input.shape[0] * out_h, out_w)
    # Each program reduces whole groups' channels: no split along a group.
    _launch(
        backward_weight_kernel,
        grad_output,
        input,
        grad_weight,
        input,
        weight.shape,
        tiling,
        (stride, padding, dilation),
        split_groups=False,
    )
    return grad_weight


#: Largest reduced width the fused kernel holds in registers as one tl.dot operand.
FUSED_MAX_REDUCED = 256


def fused_supported(dtype: torch.dtype, channels: int, groups: int, reduced: int) -> bool:
    """Whether :func:`fused_forward` runs the fused kernel for this problem.

    It needs a dtype with a matrix-product path (not float64), the reduced width within
    :data:`FUSED_MAX_REDUCED`, and a tiling that holds whole groups (at most 16 per program).
    """
    cgp = _pow2(channels // groups)
    return (
        dtype != torch.float64
        and reduced <= FUSED_MAX_REDUCED
        and any(fused_block_fits(config.kwargs["BLOCK_C"], cgp) for config in FUSED_CONFIGS)
    )


def fused_forward(
    input: Tensor,
    reduced: Tensor,
    span_weight: Tensor,
    span_bias: Tensor | None,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> Tensor:
    """Involution output (B, C, H_out, W_out) with the kernels generated in the kernel.

    Args:
        input: (B, C, H, W), any strides.
        reduced: (B, R, H_out, W_out), the kernel branch's features before the span conv.
        span_weight: (G*Kh*Kw, R); row ``g*Kh*Kw + kh*Kw + kw``.
        span_bias: (G*Kh*Kw,) or ``None``.

    The caller checks :func:`fused_supported` first.
    """
    kh, kw = kernel_size
    batch, channels, height, width = input.shape
    rows_w, reduced_channels = span_weight.shape
    groups = rows_w // (kh * kw)
    out_h, out_w = reduced.shape[-2:]
    cg = channels // groups
    accumulator(input.dtype)  # rejects unsupported dtypes with a clear message
    span_weight = span_weight.contiguous()
    output = empty_output(input, (out_h, out_w))
    rows = batch * out_h
    # The interpreter's tl.dot mishandles bfloat16 operands (NumPy has no bfloat16); there the
    # operands are upcast, which is exact: products of bfloat16 values are exact in float32.
    upcast = input.dtype == torch.bfloat16 and interpreter_enabled()

    def grid(meta: dict) -> tuple[int]:
        return (_tiles(rows, out_w, meta) * triton.cdiv(groups, meta["BLOCK_C"] // _pow2(cg)),)

    with device_guard(input):
        fused_forward_kernel[grid](
            input,
            reduced,
            span_weight,
            span_bias if span_bias is not None else span_weight,
            output,
            groups,
            cg,
            reduced_channels,
            height,
            width,
            out_h,
            out_w,
            rows,
            *input.stride(),
            *reduced.stride(),
            *output.stride(),
            *_conv_args(stride, padding, dilation),
            KH=kh,
            KW=kw,
            CGP=_pow2(cg),
            R_PAD=max(16, _pow2(reduced_channels)),
            HAS_BIAS=span_bias is not None,
            IEEE_DOT=input.dtype == torch.float32 or upcast,
            DOT_IN_FP32=upcast,
        )
    return output
