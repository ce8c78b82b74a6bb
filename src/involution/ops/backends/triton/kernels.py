"""Triton kernels of the involution aggregation: forward, gradient of the input, of the weight.

Layouts: ``input``, ``output``, ``grad_output`` and ``grad_input`` are addressed through their
strides, so NCHW and channels_last tensors are read and written in place without a copy (the
channel block of a program is then contiguous for channels_last and the pixel block for NCHW).
``weight`` and ``grad_weight`` are contiguous (B, G, Kh, Kw, H_out, W_out).

Every program owns a disjoint block of the tensor it writes and accumulates in registers
(float32, or float64 for float64 tensors), so there are no atomics and results are bitwise
reproducible. Programs are laid out on a 1-D grid with the pixel block varying fastest, so
neighbouring programs share their input halo in L2, and no grid dimension can overflow.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

from involution.ops.backends.triton import autotune_enabled

#: Autotune search space on a GPU (block of pixels, block of channels, warps). The interpreter
#: cannot benchmark, so it gets one small config that still exercises the masking of partial
#: blocks in the tiny test shapes; with autotuning off a GPU gets one mid-sized config.
if knobs.runtime.interpret:
    CONFIGS = [triton.Config({"BLOCK_P": 32, "BLOCK_C": 4}, num_warps=1)]
elif not autotune_enabled():
    CONFIGS = [triton.Config({"BLOCK_P": 64, "BLOCK_C": 16}, num_warps=4)]
else:
    CONFIGS = [
        triton.Config({"BLOCK_P": block_p, "BLOCK_C": block_c}, num_warps=warps)
        for block_p, block_c, warps in (
            (32, 16, 2),
            (64, 8, 4),
            (64, 16, 4),
            (128, 8, 4),
            (128, 16, 8),
            (256, 4, 4),
            (256, 8, 8),
            (32, 32, 4),
        )
    ]

#: Autotune key: the shape and convolution parameters that change the best tiling.
KEY = ["C", "CG", "H", "W", "OH", "OW", "stride_h", "stride_w", "KH", "KW"]


@triton.autotune(configs=CONFIGS, key=KEY)
@triton.jit
def forward_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    C,
    G,
    CG,
    H,
    W,
    OH,
    OW,
    sx_b,
    sx_c,
    sx_h,
    sx_w,
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
    ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[b, c, p] = sum_{kh,kw} w[b, g, kh, kw, p] * x[b, c, ih, iw] for a (C, P) block."""
    pid = tl.program_id(0)
    num_p = tl.cdiv(OH * OW, BLOCK_P)
    num_c = tl.cdiv(CG, BLOCK_C)
    pid_p = pid % num_p
    pid_c = (pid // num_p) % num_c
    pid_bg = pid // (num_p * num_c)
    b = (pid_bg // G).to(tl.int64)
    g = pid_bg % G

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < OH * OW
    oh = offs_p // OW
    ow = offs_p % OW
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < CG
    chan = g * CG + offs_c

    x_rows = x_ptr + b * sx_b + chan[:, None] * sx_c
    w_base = w_ptr + pid_bg.to(tl.int64) * (KH * KW * OH * OW) + offs_p
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC_DTYPE)
    for kh in range(KH):
        ih = oh * stride_h - pad_h + kh * dil_h
        ok_h = mask_p & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = ow * stride_w - pad_w + kw * dil_w
            ok = ok_h & (iw >= 0) & (iw < W)
            kernel = tl.load(w_base + (kh * KW + kw) * OH * OW, mask=mask_p, other=0.0)
            x = tl.load(
                x_rows + (ih * sx_h + iw * sx_w)[None, :],
                mask=mask_c[:, None] & ok[None, :],
                other=0.0,
            )
            acc += x.to(ACC_DTYPE) * kernel.to(ACC_DTYPE)[None, :]

    out = out_ptr + b * so_b + chan[:, None] * so_c + (oh * so_h + ow * so_w)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


@triton.autotune(configs=CONFIGS, key=KEY)
@triton.jit
def backward_input_kernel(
    go_ptr,
    w_ptr,
    gi_ptr,
    C,
    G,
    CG,
    H,
    W,
    OH,
    OW,
    sg_b,
    sg_c,
    sg_h,
    sg_w,
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
    ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """grad_x[b, c, ih, iw] = sum over the (kh, kw, oh, ow) that read it: a gather, no atomics.

    Input pixel ``ih`` is read by tap ``kh`` of output row ``oh = (ih + pad - kh * dil) / stride``
    when that division is exact and ``0 <= oh < OH`` (likewise for columns).
    """
    pid = tl.program_id(0)
    num_p = tl.cdiv(H * W, BLOCK_P)
    num_c = tl.cdiv(CG, BLOCK_C)
    pid_p = pid % num_p
    pid_c = (pid // num_p) % num_c
    pid_bg = pid // (num_p * num_c)
    b = (pid_bg // G).to(tl.int64)
    g = pid_bg % G

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < H * W
    ih = offs_p // W
    iw = offs_p % W
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < CG
    chan = g * CG + offs_c

    go_rows = go_ptr + b * sg_b + chan[:, None] * sg_c
    w_base = w_ptr + pid_bg.to(tl.int64) * (KH * KW * OH * OW)
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC_DTYPE)
    for kh in range(KH):
        th = ih + pad_h - kh * dil_h
        oh = th // stride_h
        # th >= 0 first: the rounding of // and % on negatives does not matter then.
        ok_h = mask_p & (th >= 0) & (th % stride_h == 0) & (oh < OH)
        for kw in tl.static_range(KW):
            tw = iw + pad_w - kw * dil_w
            ow = tw // stride_w
            ok = ok_h & (tw >= 0) & (tw % stride_w == 0) & (ow < OW)
            kernel = tl.load(w_base + (kh * KW + kw) * OH * OW + oh * OW + ow, mask=ok, other=0.0)
            grad = tl.load(
                go_rows + (oh * sg_h + ow * sg_w)[None, :],
                mask=mask_c[:, None] & ok[None, :],
                other=0.0,
            )
            acc += grad.to(ACC_DTYPE) * kernel.to(ACC_DTYPE)[None, :]

    gi = gi_ptr + b * si_b + chan[:, None] * si_c + (ih * si_h + iw * si_w)[None, :]
    tl.store(gi, acc.to(gi_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


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
    sg_b,
    sg_c,
    sg_h,
    sg_w,
    sx_b,
    sx_c,
    sx_h,
    sx_w,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
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
    num_p = tl.cdiv(OH * OW, BLOCK_P)
    pid_p = pid % num_p
    pid_bg = pid // num_p
    b = (pid_bg // G).to(tl.int64)
    g = pid_bg % G

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < OH * OW
    oh = offs_p // OW
    ow = offs_p % OW
    go_pixels = go_ptr + b * sg_b + (oh * sg_h + ow * sg_w)[None, :]
    x_batch = x_ptr + b * sx_b
    gw_base = gw_ptr + pid_bg.to(tl.int64) * (KH * KW * OH * OW) + offs_p
    for kh in range(KH):
        ih = oh * stride_h - pad_h + kh * dil_h
        ok_h = mask_p & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = ow * stride_w - pad_w + kw * dil_w
            ok = ok_h & (iw >= 0) & (iw < W)
            acc = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
            for c0 in range(0, CG, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mask_c = offs_c < CG
                chan = (g * CG + offs_c)[:, None]
                grad = tl.load(
                    go_pixels + chan * sg_c, mask=mask_c[:, None] & mask_p[None, :], other=0.0
                )
                x = tl.load(
                    x_batch + chan * sx_c + (ih * sx_h + iw * sx_w)[None, :],
                    mask=mask_c[:, None] & ok[None, :],
                    other=0.0,
                )
                acc += tl.sum(grad.to(ACC_DTYPE) * x.to(ACC_DTYPE), axis=0)
            grad_w = acc.to(gw_ptr.dtype.element_ty)
            tl.store(gw_base + (kh * KW + kw) * OH * OW, grad_w, mask=mask_p)
