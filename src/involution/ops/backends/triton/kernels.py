"""The ``"gather"`` variant's aggregation kernels: forward, gradient of the input, of the weight.

Layouts: ``input``, ``output``, ``grad_output`` and ``grad_input`` are addressed through their
strides, so NCHW and channels_last tensors are read and written in place without a copy (the
channel block of a program is then contiguous for channels_last and the pixel block for NCHW).
``weight`` and ``grad_weight`` are contiguous (B, G, Kh, Kw, H_out, W_out). Each strided tensor
comes with one tuple of its (b, c, h, w) strides (``sx`` for ``x``, ...), and the convolution
as ``geometry``, ((stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w)), read by :mod:`~.taps`.

Every program owns a disjoint block of the tensor it writes and accumulates in registers
(float32, or float64 for float64 tensors), so there are no atomics and results are bitwise
reproducible. Programs are laid out on a 1-D grid with the pixel block varying fastest, so
neighbouring programs share their input halo in L2, and no grid dimension can overflow.
The forward and the gradient of the input are one kernel, :func:`aggregate_kernel`, the latter
its adjoint gather. The launchers are in :mod:`~.gather`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from involution.ops.backends.triton.launch import autotune_configs
from involution.ops.backends.triton.taps import source, spatial_offsets, tap

#: Autotune search space: (block of pixels, block of channels) tilings.
CONFIGS = autotune_configs("gather")

#: Autotune key: the shape and convolution parameters that change the best tiling.
KEY = ["C", "CG", "H", "W", "OH", "OW", "geometry", "KH", "KW"]


@triton.jit
def pixel_block(pid, ROWS, COLS, CHANNEL_BLOCKS, G, BLOCK_P: tl.constexpr):
    """Program ``pid``'s b, g, b*G + g, channel block, and its pixels (BLOCK_P,): flat
    offsets, rows, columns and in-range mask.

    Programs run over blocks of the ROWS x COLS pixels fastest, then ``CHANNEL_BLOCKS``
    channel blocks, then (batch, group).
    """
    num_p = tl.cdiv(ROWS * COLS, BLOCK_P)
    pid_bg = pid // (num_p * CHANNEL_BLOCKS)
    pid_c = (pid // num_p) % CHANNEL_BLOCKS
    offs_p = (pid % num_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    b = (pid_bg // G).to(tl.int64)
    return b, pid_bg % G, pid_bg, pid_c, offs_p, offs_p // COLS, offs_p % COLS, offs_p < ROWS * COLS


@triton.jit
def _channel_block(pid_c, g, CG, BLOCK_C: tl.constexpr):
    """Channels (BLOCK_C,) of block ``pid_c`` of group ``g``, and their in-range mask."""
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return g * CG + offs_c, offs_c < CG


@triton.jit
def _store_block(ptr, chan_offsets, pixel_offsets, acc, mask_c, mask_p):
    """Store ``acc`` (BLOCK_C, BLOCK_P) at ``ptr + chan_offsets[:, None] + pixel_offsets[None,
    :]`` in the tensor's dtype, where both masks hold."""
    ptrs = ptr + chan_offsets[:, None] + pixel_offsets[None, :]
    tl.store(ptrs, acc.to(ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


@triton.jit
def _accumulate_tap(acc, rows, pixels, mask_c, ok, kernel, ACC_DTYPE: tl.constexpr):
    """``acc`` (BLOCK_C, BLOCK_P) plus the (channel, pixel) tile at ``rows[:, None] +
    pixels[None, :]`` (zero where ``mask_c`` or ``ok`` is false) times ``kernel`` (BLOCK_P,)."""
    values = tl.load(rows + pixels[None, :], mask=mask_c[:, None] & ok[None, :], other=0.0)
    return acc + values.to(ACC_DTYPE) * kernel.to(ACC_DTYPE)[None, :]


@triton.autotune(configs=CONFIGS, key=[*KEY, "ADJOINT"])
@triton.jit
def aggregate_kernel(
    src_ptr,
    w_ptr,
    dst_ptr,
    C,
    G,
    CG,
    H,
    W,
    OH,
    OW,
    ss,
    sd,
    geometry,
    KH: tl.constexpr,
    KW: tl.constexpr,
    ADJOINT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """A (C, P) block of ``dst`` gathered from ``src`` through the taps: the forward
    out[b, c, p] = sum_{kh,kw} w[b, g, kh, kw, p] * x[b, c, tap (kh, kw) of p] (``src`` x,
    ``dst`` out), or when ``ADJOINT`` its adjoint (``src`` grad_y, ``dst`` grad_x): grad_x[b, c,
    ih, iw] = sum over the (kh, kw, oh, ow) that read it, a gather, no atomics.

    Input pixel ``ih`` is read by tap ``kh`` of output row ``oh = (ih + pad - kh * dil) / stride``
    when that division is exact and ``0 <= oh < OH`` (likewise for columns).
    """
    pid = tl.program_id(0)
    b, g, pid_bg, pid_c, offs_p, row, col, mask_p = pixel_block(
        pid, H if ADJOINT else OH, W if ADJOINT else OW, tl.cdiv(CG, BLOCK_C), G, BLOCK_P
    )
    chan, mask_c = _channel_block(pid_c, g, CG, BLOCK_C)

    src_rows = src_ptr + b * ss[0] + chan[:, None] * ss[1]
    # The kernel values of dst's own pixels, or for the adjoint those of the pixels read.
    w_base = w_ptr + pid_bg.to(tl.int64) * (KH * KW * OH * OW)
    if not ADJOINT:
        w_base += offs_p
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC_DTYPE)
    for kh in range(KH):
        src_h, reads_h = source(row, geometry, 0, kh, H, OH, ADJOINT)
        ok_h = mask_p & reads_h
        for kw in tl.static_range(KW):
            src_w, reads_w = source(col, geometry, 1, kw, W, OW, ADJOINT)
            ok = ok_h & reads_w
            w_tap = w_base + (kh * KW + kw) * OH * OW
            if ADJOINT:
                kernel = tl.load(w_tap + src_h * OW + src_w, mask=ok, other=0.0)
            else:
                kernel = tl.load(w_tap, mask=mask_p, other=0.0)
            pixels = spatial_offsets(ss, src_h, src_w)
            acc = _accumulate_tap(acc, src_rows, pixels, mask_c, ok, kernel, ACC_DTYPE)

    dst_pixels = spatial_offsets(sd, row, col)
    _store_block(dst_ptr + b * sd[0], chan * sd[1], dst_pixels, acc, mask_c, mask_p)


@triton.autotune(configs=CONFIGS, key=KEY)
@triton.jit
def backward_weight_kernel(
    go_ptr,
    x_ptr,
    gw_ptr,
    C,
    G,
    CG,
    H,
    W,
    OH,
    OW,
    sg,
    sx,
    geometry,
    KH: tl.constexpr,
    KW: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """grad_w[b, g, kh, kw, p] = sum over the C/G channels c of g of grad_y[b, c, p] * x[b, c, ...].

    One program owns (b, g, a block of output pixels) and reduces over the group's channels in
    a fixed order.
    """
    pid = tl.program_id(0)
    b, g, pid_bg, _, offs_p, oh, ow, mask_p = pixel_block(pid, OH, OW, 1, G, BLOCK_P)
    go_pixels = go_ptr + b * sg[0] + spatial_offsets(sg, oh, ow)[None, :]
    x_batch = x_ptr + b * sx[0]
    gw_base = gw_ptr + pid_bg.to(tl.int64) * (KH * KW * OH * OW) + offs_p
    for kh in range(KH):
        ih, inside_h = tap(oh, geometry, 0, kh, H)
        ok_h = mask_p & inside_h
        for kw in tl.static_range(KW):
            iw, inside_w = tap(ow, geometry, 1, kw, W)
            ok = ok_h & inside_w
            acc = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
            for c0 in range(0, CG, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mask_c = offs_c < CG
                chan = (g * CG + offs_c)[:, None]
                grad = tl.load(
                    go_pixels + chan * sg[1], mask=mask_c[:, None] & mask_p[None, :], other=0.0
                )
                x = tl.load(
                    x_batch + chan * sx[1] + spatial_offsets(sx, ih, iw)[None, :],
                    mask=mask_c[:, None] & ok[None, :],
                    other=0.0,
                )
                acc += tl.sum(grad.to(ACC_DTYPE) * x.to(ACC_DTYPE), axis=0)
            grad_w = acc.to(gw_ptr.dtype.element_ty)
            tl.store(gw_base + (kh * KW + kw) * OH * OW, grad_w, mask=mask_p)
