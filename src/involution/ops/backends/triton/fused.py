"""The ``"gather"`` variant's fused forward kernel: kernel generation inside the aggregation.

For a block of output pixels of one (batch, group) the program computes the group's Kh*Kw
kernel values per pixel as a small matrix product of the span (1x1 conv) weight and the reduced
features, rounds them to the tensor dtype (exactly what the unfused span conv would store), and
aggregates the group's channels with them. The (B, G*Kh*Kw, H_out, W_out) kernel tensor is
never written to memory. The launcher is :func:`.gather.fused_forward`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from involution.ops.backends.triton.kernels import pixel_block
from involution.ops.backends.triton.launch import autotune_configs
from involution.ops.backends.triton.taps import spatial_offsets, tap

#: (block of pixels, block of the reduced width, warps, stages).
CONFIGS = autotune_configs(
    ("BLOCK_P", "BLOCK_R"),
    interpreted=[(16, 16, 1, 3)],
    fixed=[(64, 32, 4, 2)],
    tuned=[
        (32, 32, 4, 2),
        (64, 32, 4, 2),
        (64, 64, 4, 3),
        (128, 32, 8, 2),
        (32, 64, 2, 3),
        (128, 16, 4, 2),
    ],
)


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
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        span_w = tl.load(
            span_w_ptr + rows[:, None] * R + offs_r[None, :],
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        )
        reduced = tl.load(
            red_pixels + offs_r[:, None] * sr[1], mask=mask_r[:, None] & mask_p[None, :], other=0.0
        )
        if DOT_IN_FP32:
            span_w = span_w.to(tl.float32)
            reduced = reduced.to(tl.float32)
        # fp32 operands: full-precision products (not TF32) to match the unfused conv.
        if IEEE_DOT:
            kernel = tl.dot(span_w, reduced, kernel, input_precision="ieee")
        else:
            kernel = tl.dot(span_w, reduced, kernel)
    if HAS_BIAS:
        kernel += tl.load(span_b_ptr + rows, mask=mask_k, other=0.0).to(tl.float32)[:, None]
    kernel = kernel.to(out_ptr.dtype.element_ty).to(tl.float32)

    kh = offs_k // KW
    kw = offs_k % KW
    ih, inside_h = tap(oh[None, :], geometry, 0, kh[:, None], H)
    iw, inside_w = tap(ow[None, :], geometry, 1, kw[:, None], W)
    ok = mask_k[:, None] & mask_p[None, :] & inside_h & inside_w
    x_taps = x_ptr + b * sx[0] + ih * sx[2] + iw * sx[3]
    out_pixels = out_ptr + b * so[0] + oh * so[2] + ow * so[3]
    for ci in range(CG):
        chan = g * CG + ci
        x = tl.load(x_taps + chan * sx[1], mask=ok, other=0.0)
        out = tl.sum(x.to(tl.float32) * kernel, axis=0)
        tl.store(out_pixels + chan * so[1], out.to(out_ptr.dtype.element_ty), mask=mask_p)
