"""The fused op's gradients without the kernel tensor: the kernels regenerated in registers.

The fused forward (:mod:`~.fused`) aggregates ``x`` (B, C, H, W) with kernels
``W = span_w . reduced + span_b`` (B, G*Kh*Kw, H_out, W_out) that it never writes. Its
backward here never writes ``W`` or its gradient ``dW`` either, in two kernels:

- :func:`span_gradients_kernel`, one program per (batch, block of output pixels), over every
  group: ``dW[g, k, p] = sum_{c in g} grad_out[c, p] * x[c, tap k of p]`` in registers, rounded
  to the tensor dtype (what the unfused backward stores), then reduced straight into
  ``grad_reduced = span_w^T . dW`` (accumulated over the groups in a float32 (float64) buffer
  that only this program touches), ``grad_span_w = dW . reduced^T`` and ``grad_span_b =
  sum_p dW``. The span parameters' gradients sum over every program: by float32 (float64)
  atomics (the summation order, so the last bits, vary between GPU runs), or, when
  ``torch.use_deterministic_algorithms`` is on, through per-program partials summed afterwards
  in a fixed order (deterministic): fewer programs then, each reducing several pixel blocks,
  so that the partials stay within :data:`PARTIALS_FRACTION` of the kernel tensor's size.
- :func:`input_gradient_kernel`, one program per (batch, group, block of input pixels): the
  aggregation's input gradient as a gather (no atomics, as :mod:`~.kernels`), each kernel value
  ``W[g, k, o]`` of the output pixels ``o`` that read the block regenerated from ``reduced`` and
  the span row ``g*Kh*Kw + k`` (rounded to the dtype, as the forward rounds it).

Matrix products use ``tl.dot`` (float32 operands in IEEE precision, as the unfused convs),
except in float64, which Triton's ``tl.dot`` lacks: there a broadcast product and sum.
The launcher is :func:`fused_backward`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from involution.ops.backends.triton import launch
from involution.ops.backends.triton.fused import kernel_taps, product, span_tile
from involution.ops.backends.triton.kernels import _accumulate_tap, _store_block, pixel_block
from involution.ops.backends.triton.launch import FusedProblem
from involution.ops.backends.triton.taps import adjoint_tap, spatial_offsets
from involution.ops.layout import memory_format_of

#: Autotune search space: (block of pixels, block of the reduced width) tilings.
CONFIGS = launch.autotune_configs("regeneration")
KEY = ["C", "CG", "R", "H", "W", "OH", "OW", "geometry", "KH", "KW"]
#: Under ``torch.use_deterministic_algorithms`` the span parameters' per-program partials are
#: kept to at most 1/PARTIALS_FRACTION of the kernel tensor's size.
PARTIALS_FRACTION = 4


@triton.jit
def _add(ptrs, values, mask, PARTIALS: tl.constexpr):
    """``*ptrs += values`` where ``mask``: by atomics, or, into a program's own partials, by a
    plain read-modify-write (deterministic)."""
    if PARTIALS:
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + values, mask=mask)
    else:
        tl.atomic_add(ptrs, values, mask=mask)


@triton.autotune(configs=CONFIGS, key=KEY, reset_to_zero=["ga_ptr", "gsw_ptr", "gsb_ptr"])
@triton.jit
def span_gradients_kernel(  # noqa: PLR0913  (a Triton kernel: one scalar per size)
    go_ptr,
    x_ptr,
    red_ptr,
    span_w_ptr,
    ga_ptr,
    gsw_ptr,
    gsb_ptr,
    B,
    C,
    G,
    CG,
    R,
    H,
    W,
    OH,
    OW,
    sg,
    sx,
    sr,
    sa,
    geometry,
    KH: tl.constexpr,
    KW: tl.constexpr,
    KK_PAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    USE_DOT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    NEEDS_WEIGHT: tl.constexpr,
    NEEDS_BIAS: tl.constexpr,
    PARTIALS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """grad_reduced (into the zeroed ``ga`` buffer), grad_span_w and grad_span_b (added into
    the zeroed ``gsw`` (G*Kh*Kw, R) and ``gsb`` (G*Kh*Kw,) buffers, or, when ``PARTIALS``, into
    this program's slice of them) for the (batch, block of output pixels) blocks
    ``pid, pid + programs, ...``: one each without ``PARTIALS``."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs_k = tl.arange(0, KK_PAD)
    mask_k = offs_k < KH * KW
    if PARTIALS:  # this program's own (G*Kh*Kw, R) and (G*Kh*Kw,) slices
        gsw_ptr += pid.to(tl.int64) * G * KH * KW * R
        gsb_ptr += pid.to(tl.int64) * G * KH * KW
    for block in range(pid, B * tl.cdiv(OH * OW, BLOCK_P), programs):
        b, _, _, _, _, oh, ow, mask_p = pixel_block(block, OH, OW, 1, 1, BLOCK_P)
        ih, iw, ok = kernel_taps(oh, ow, mask_p, geometry, H, W, KH, KW, KK_PAD)
        x_taps = x_ptr + b * sx[0] + ih * sx[2] + iw * sx[3]
        go_pixels = go_ptr + b * sg[0] + oh * sg[2] + ow * sg[3]
        red_pixels = red_ptr + b * sr[0] + spatial_offsets(sr, oh, ow)[None, :]
        ga_pixels = ga_ptr + b * sa[0] + spatial_offsets(sa, oh, ow)[None, :]
        for g in range(G):
            grad_kernel = tl.zeros((KK_PAD, BLOCK_P), dtype=ACC_DTYPE)
            for ci in range(CG):
                chan = g * CG + ci
                grad = tl.load(go_pixels + chan * sg[1], mask=mask_p, other=0.0)
                x = tl.load(x_taps + chan * sx[1], mask=ok, other=0.0)
                grad_kernel += x.to(ACC_DTYPE) * grad.to(ACC_DTYPE)[None, :]
            # The dtype the unfused backward stores dW in, and the span products' operands'.
            grad_kernel = grad_kernel.to(x_ptr.dtype.element_ty)
            rows = g * (KH * KW) + offs_k
            if NEEDS_BIAS:
                grad_bias = tl.sum(grad_kernel.to(ACC_DTYPE), axis=1)
                _add(gsb_ptr + rows, grad_bias, mask_k, PARTIALS)
            for r0 in range(0, R, BLOCK_R):
                span_w, offs_r, mask_r = span_tile(span_w_ptr, rows, mask_k, r0, R, BLOCK_R)
                mask_rp = mask_r[:, None] & mask_p[None, :]
                # This program alone reads and writes these (BLOCK_R, BLOCK_P) values.
                ga_ptrs = ga_pixels + offs_r[:, None] * sa[1]
                grad_reduced = tl.load(ga_ptrs, mask=mask_rp, other=0.0)
                grad_reduced = product(
                    tl.trans(span_w), grad_kernel, grad_reduced, USE_DOT, IEEE_DOT, DOT_IN_FP32
                )
                tl.store(ga_ptrs, grad_reduced, mask=mask_rp)
                if NEEDS_WEIGHT:
                    reduced = tl.load(red_pixels + offs_r[:, None] * sr[1], mask=mask_rp, other=0.0)
                    grad_w = tl.zeros((KK_PAD, BLOCK_R), dtype=ACC_DTYPE)
                    grad_w = product(
                        grad_kernel, tl.trans(reduced), grad_w, USE_DOT, IEEE_DOT, DOT_IN_FP32
                    )
                    grad_w_ptrs = gsw_ptr + rows[:, None] * R + offs_r[None, :]
                    _add(grad_w_ptrs, grad_w, mask_k[:, None] & mask_r[None, :], PARTIALS)


@triton.autotune(configs=CONFIGS, key=KEY)
@triton.jit
def input_gradient_kernel(  # noqa: PLR0913
    go_ptr,
    red_ptr,
    span_w_ptr,
    span_b_ptr,
    gi_ptr,
    C,
    G,
    CG,
    R,
    H,
    W,
    OH,
    OW,
    sg,
    sr,
    si,
    geometry,
    KH: tl.constexpr,
    KW: tl.constexpr,
    CG_PAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """grad_x[b, c, i] = sum over the (k, o) whose tap k of output pixel o reads input pixel i
    of W[b, g, k, o] * grad_out[b, c, o], for all C/G channels of group g; W regenerated."""
    pid = tl.program_id(0)
    b, g, _, _, _, ih, iw, mask_p = pixel_block(pid, H, W, 1, G, BLOCK_P)
    offs_c = tl.arange(0, CG_PAD)
    mask_c = offs_c < CG
    chan = g * CG + offs_c
    go_rows = go_ptr + b * sg[0] + chan[:, None] * sg[1]
    red_batch = red_ptr + b * sr[0]
    acc = tl.zeros((CG_PAD, BLOCK_P), dtype=ACC_DTYPE)
    for kh in range(KH):
        oh, reads_h = adjoint_tap(ih, geometry, 0, kh, OH)
        ok_h = mask_p & reads_h
        for kw in range(KW):
            ow, reads_w = adjoint_tap(iw, geometry, 1, kw, OW)
            ok = ok_h & reads_w
            row = g * (KH * KW) + kh * KW + kw
            red_pixels = red_batch + spatial_offsets(sr, oh, ow)[None, :]
            kernel = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                mask_r = offs_r < R
                span_w = tl.load(span_w_ptr + row * R + offs_r, mask=mask_r, other=0.0)
                reduced = tl.load(
                    red_pixels + offs_r[:, None] * sr[1],
                    mask=mask_r[:, None] & ok[None, :],
                    other=0.0,
                )
                kernel += tl.sum(span_w.to(ACC_DTYPE)[:, None] * reduced.to(ACC_DTYPE), axis=0)
            if HAS_BIAS:
                kernel += tl.load(span_b_ptr + row).to(ACC_DTYPE)
            # The forward's rounding of the kernel value to the tensor dtype.
            kernel = kernel.to(gi_ptr.dtype.element_ty).to(ACC_DTYPE)
            pixels = spatial_offsets(sg, oh, ow)
            acc = _accumulate_tap(acc, go_rows, pixels, mask_c, ok, kernel, ACC_DTYPE)
    in_pixels = spatial_offsets(si, ih, iw)
    _store_block(gi_ptr + b * si[0], chan * si[1], in_pixels, acc, mask_c, mask_p)


def fused_backward(
    grad_output: Tensor, problem: FusedProblem, needs: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor, Tensor | None, Tensor | None]:
    """(grad_input (B, C, H, W) in the input's memory format, grad_reduced (B, R, H_out,
    W_out) in the memory format of ``reduced``, grad_span_weight (G*Kh*Kw, R), grad_span_bias
    (G*Kh*Kw,)) of the fused op; ``needs``: (input, span weight, span bias), each false
    gradient ``None`` (grad_reduced is always computed)."""
    needs_input, needs_weight, needs_bias = needs
    needs_bias = needs_bias and problem.span_bias is not None
    flags = problem.flags()
    input, reduced = problem.input, problem.reduced
    span_weight = problem.span_weight.contiguous()
    # The span weight stands in for an absent bias: HAS_BIAS is then false and it is never read.
    span_bias = span_weight if problem.span_bias is None else problem.span_bias
    sizes = problem.sizes
    dtype = input.dtype
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    dims = (sizes.channels, sizes.groups, sizes.group_channels, reduced.shape[1], *sizes.spatial)
    kernel_size = {"KH": sizes.kernel_h, "KW": sizes.kernel_w}
    accumulation = launch.accumulator(dtype)
    pixels = sizes.out_h * sizes.out_w

    partials = torch.are_deterministic_algorithms_enabled()
    # Partials: one slice per program, so few programs that the slices stay a fraction of the
    # kernel tensor (B*H_out*W_out*G*Kh*Kw values), each program reducing several pixel blocks.
    slices = max(1, sizes.batch * pixels // (PARTIALS_FRACTION * reduced.shape[1]))
    slices = slices if partials else 1

    def output_programs(meta: dict) -> int:
        blocks = sizes.batch * launch.cdiv(pixels, meta["BLOCK_P"])
        return min(blocks, slices) if partials else blocks

    grad_reduced = torch.zeros_like(reduced, dtype=acc_dtype, memory_format=torch.preserve_format)
    grad_weight = input.new_zeros(
        (slices, *span_weight.shape) if needs_weight else 1, dtype=acc_dtype
    )
    grad_bias = input.new_zeros(
        (slices, span_weight.shape[0]) if needs_bias else 1, dtype=acc_dtype
    )
    launch.run_kernel(
        span_gradients_kernel,
        output_programs,
        (grad_output, input, reduced, span_weight, grad_reduced, grad_weight, grad_bias),
        (sizes.batch, *dims),
        (grad_output, input, reduced, grad_reduced),
        problem.geometry,
        **kernel_size,
        KK_PAD=max(16, launch.pow2(sizes.kernel_h * sizes.kernel_w)),
        ACC_DTYPE=accumulation,
        USE_DOT=dtype != torch.float64,
        IEEE_DOT=flags["IEEE_DOT"],
        DOT_IN_FP32=flags["DOT_IN_FP32"],
        NEEDS_WEIGHT=needs_weight,
        NEEDS_BIAS=needs_bias,
        PARTIALS=partials,
    )
    grad_input = None
    if needs_input:
        grad_input = torch.empty_like(input, memory_format=memory_format_of(input))
        input_pixels = sizes.height * sizes.width
        launch.run_kernel(
            input_gradient_kernel,
            lambda meta: sizes.batch * sizes.groups * launch.cdiv(input_pixels, meta["BLOCK_P"]),
            (grad_output, reduced, span_weight, span_bias, grad_input),
            dims,
            (grad_output, reduced, grad_input),
            problem.geometry,
            **kernel_size,
            CG_PAD=launch.pow2(sizes.group_channels),
            ACC_DTYPE=accumulation,
            HAS_BIAS=flags["HAS_BIAS"],
        )
    return (
        grad_input,
        grad_reduced.to(dtype),
        grad_weight.sum(0).to(dtype) if needs_weight else None,
        grad_bias.sum(0).to(dtype) if needs_bias else None,
    )
