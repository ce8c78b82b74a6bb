"""The ``"gather"`` variant's fused forward kernel: kernel generation inside the aggregation.

For a block of output pixels of one (batch, group) the program computes the group's Kh*Kw
kernel values per pixel as a small matrix product of the span (1x1 conv) weight and the reduced
features, rounds them to the tensor dtype (exactly what the unfused span conv would store), and
aggregates the group's channels with them. The (B, G*Kh*Kw, H_out, W_out) kernel tensor is
never written to memory. The launcher is :func:`.gather.fused_forward`. Its kernel-generation
helpers (:func:`product`, :func:`kernel_taps`, :func:`span_tile`) serve the regenerating
backward (:mod:`~.regeneration`) as well.
"""

from __future__ import annotations

import triton
import triton.language as tl

from involution.ops.backends.triton.kernels import pixel_block
from involution.ops.backends.triton.launch import autotune_configs
from involution.ops.backends.triton.taps import spatial_offsets, tap

#: Autotune search space: (block of pixels, block of the reduced width) tilings.
CONFIGS = autotune_configs("gather_fused")


@triton.jit
def product(a, b, acc, USE_DOT: tl.constexpr, IEEE_DOT: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """``acc + a @ b`` for tiles a (M, N) and b (N, L), each dimension at least 16: by
    ``tl.dot`` (its operands upcast first when ``DOT_IN_FP32``; float32 products in full
    precision, not TF32, when ``IEEE_DOT``, to match the unfused conv), else (float64, which
    ``tl.dot`` lacks) by a broadcast product and sum."""
    if USE_DOT:
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE_DOT:
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)
    return acc + tl.sum(a[:, :, None].to(acc.dtype) * b[None, :, :].to(acc.dtype), axis=1)


@triton.jit
def kernel_taps(
    oh, ow, mask_p, geometry, H, W, KH: tl.constexpr, KW: tl.constexpr, KK_PAD: tl.constexpr
):
    """(input rows, input columns, mask), each (KK_PAD, BLOCK_P), of every tap k = kh * KW + kw
    of the output pixels (``oh``, ``ow``) (BLOCK_P,); the mask holds where k < Kh*Kw (the rest
    pads the tile for ``tl.dot``), ``mask_p`` holds and the tap lies inside the input."""
    offs_k = tl.arange(0, KK_PAD)
    ih, inside_h = tap(oh[None, :], geometry, 0, (offs_k // KW)[:, None], H)
    iw, inside_w = tap(ow[None, :], geometry, 1, (offs_k % KW)[:, None], W)
    return ih, iw, (offs_k < KH * KW)[:, None] & mask_p[None, :] & inside_h & inside_w


@triton.jit
def span_tile(span_w_ptr, rows, mask_k, r0, R, BLOCK_R: tl.constexpr):
    """(tile (KK_PAD, BLOCK_R), channels (BLOCK_R,), their mask) of the contiguous (G*Kh*Kw, R)
    span weight at ``rows`` (KK_PAD,), where ``mask_k``, and reduced channels r0 to r0+BLOCK_R."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    span_w = tl.load(
        span_w_ptr + rows[:, None] * R + offs_r[None, :],
        mask=mask_k[:, None] & mask_r[None, :],
        other=0.0,
    )
    return span_w, offs_r, mask_r


@triton.autotune(configs=CONFIGS, key=["C", "CG", "R", "H", "W", "OH", "OW", "KH", "KW"])
@triton.jit
def fused_forward_kernel(
    x_ptr,
    red_ptr,
    span_w_ptr,
    span_b_ptr,
    out_ptr,
    C,
    G,
    CG,
    R,
    H,
    W,
    OH,
    OW,
    sx,
    sr,
    so,
    geometry,
    KH: tl.constexpr,
    KW: tl.constexpr,
    KK_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[b, c, p] = sum_k kernel[k, p] * x[b, c, tap k of p], for all c of group g.

    kernel[k, p] = span_w[g*KK + k, :] . reduced[b, :, p] + span_b[g*KK + k].
    ``span_w`` is contiguous (G*Kh*Kw, R); ``reduced`` (B, R, H_out, W_out) is strided.
    """
    pid = tl.program_id(0)
    b, g, _, _, _, oh, ow, mask_p = pixel_block(pid, OH, OW, 1, G, BLOCK_P)
    offs_k = tl.arange(0, KK_PAD)
    mask_k = offs_k < KH * KW
    rows = g * (KH * KW) + offs_k

    # Kernel tile (KK_PAD, BLOCK_P) = span_w[rows, :] @ reduced[b, :, pixels], fp32 accumulation.
    kernel = tl.zeros((KK_PAD, BLOCK_P), dtype=tl.float32)
    red_pixels = red_ptr + b * sr[0] + spatial_offsets(sr, oh, ow)[None, :]
    for r0 in range(0, R, BLOCK_R):
        span_w, offs_r, mask_r = span_tile(span_w_ptr, rows, mask_k, r0, R, BLOCK_R)
        reduced = tl.load(
            red_pixels + offs_r[:, None] * sr[1], mask=mask_r[:, None] & mask_p[None, :], other=0.0
        )
        kernel = product(span_w, reduced, kernel, True, IEEE_DOT, DOT_IN_FP32)
    if HAS_BIAS:
        kernel += tl.load(span_b_ptr + rows, mask=mask_k, other=0.0).to(tl.float32)[:, None]
    kernel = kernel.to(out_ptr.dtype.element_ty).to(tl.float32)

    ih, iw, ok = kernel_taps(oh, ow, mask_p, geometry, H, W, KH, KW, KK_PAD)
    x_taps = x_ptr + b * sx[0] + ih * sx[2] + iw * sx[3]
    out_pixels = out_ptr + b * so[0] + oh * so[2] + ow * so[3]
    for ci in range(CG):
        chan = g * CG + ci
        x = tl.load(x_taps + chan * sx[1], mask=ok, other=0.0)
        out = tl.sum(x.to(tl.float32) * kernel, axis=0)
        tl.store(out_pixels + chan * so[1], out.to(out_ptr.dtype.element_ty), mask=mask_p)
