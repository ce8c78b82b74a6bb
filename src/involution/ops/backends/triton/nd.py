"""Triton kernels of the 3-D involution (1-D runs through them on (B, C, 1, 1, L) views).

Gather kernels, one program per (batch, group, block of voxels, block of the group's channels):
every result element is written by exactly one program (deterministic, no atomics), and nothing
Kd*Kh*Kw times larger than the input is stored. The forward and grad_input accumulate over the
taps in registers; grad_weight reduces each tap's products over the group's channels. Operands
are made contiguous (NCDHW, and (B, G, Kd, Kh, Kw, D_out, H_out, W_out) kernels); float32,
float16 and bfloat16 accumulate in float32, float64 in float64.

Shapes as in :mod:`involution.ops.registration_nd`; ``stride``/``padding``/``dilation`` triples.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

Triple = tuple[int, int, int]

BLOCK_P = 64
BLOCK_C = 16


@triton.jit
def _coordinates(p, out_h, out_w):
    """(d, h, w) of the flat voxel indices ``p`` in a (D, out_h, out_w) volume."""
    return p // (out_h * out_w), (p // out_w) % out_h, p % out_w


@triton.jit
def _tile(size, C, CG, G, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's (batch * G + group, BLOCK_P positions among ``size`` and their mask,
    BLOCK_C channels of its group as int64 indices and their mask)."""
    bg, pid_p, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, g = bg // G, bg % G
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return bg, p, p < size, (b * C + g * CG + cc).to(tl.int64), cc < CG


@triton.jit
def _load_tile(ptr, channel, size, offset, ok, c_ok, ACC: tl.constexpr):
    """The (BLOCK_P, BLOCK_C) tile at positions ``offset`` of channels ``channel`` of a
    contiguous (B, C, size) tensor, 0 where ``ok`` or ``c_ok`` is false, in ``ACC``."""
    return tl.load(
        ptr + channel[None, :] * size + offset[:, None],
        mask=ok[:, None] & c_ok[None, :],
        other=0.0,
    ).to(ACC)


@triton.jit
def _store_tile(ptr, acc, channel, size, p, p_ok, c_ok):
    """Stores the (BLOCK_P, BLOCK_C) tile ``acc`` at positions ``p`` of channels ``channel`` of
    a contiguous (B, C, size) tensor."""
    tl.store(
        ptr + channel[None, :] * size + p[:, None],
        acc.to(ptr.dtype.element_ty),
        mask=p_ok[:, None] & c_ok[None, :],
    )


@triton.jit
def _forward_kernel(  # noqa: PLR0913  (a Triton kernel: one scalar per size)
    x_ptr, w_ptr, y_ptr, C, CG, G, D, H, W, OD, OH, OW,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    out_size = OD * OH * OW
    bg, p, p_ok, channel, c_ok = _tile(out_size, C, CG, G, BLOCK_P, BLOCK_C)
    od, oh, ow = _coordinates(p, OH, OW)
    w_base = w_ptr + (bg * (KD * KH * KW)).to(tl.int64) * out_size + p
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for kd in tl.static_range(KD):
        id_ = od * SD - PD + kd * DD
        for kh in tl.static_range(KH):
            ih = oh * SH - PH + kh * DH
            for kw in tl.static_range(KW):
                iw = ow * SW - PW + kw * DW
                inside = p_ok & (id_ >= 0) & (id_ < D) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                tap = (kd * KH + kh) * KW + kw
                weight = tl.load(w_base + tap * out_size, mask=p_ok, other=0.0).to(ACC)
                offset = (id_ * H + ih) * W + iw
                values = _load_tile(x_ptr, channel, D * H * W, offset, inside, c_ok, ACC)
                acc += weight[:, None] * values
    _store_tile(y_ptr, acc, channel, out_size, p, p_ok, c_ok)


@triton.jit
def _backward_input_kernel(  # noqa: PLR0913
    gy_ptr, w_ptr, gx_ptr, C, CG, G, D, H, W, OD, OH, OW,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    in_size, out_size = D * H * W, OD * OH * OW
    bg, p, p_ok, channel, c_ok = _tile(in_size, C, CG, G, BLOCK_P, BLOCK_C)
    id_, ih, iw = _coordinates(p, H, W)
    w_base = w_ptr + (bg * (KD * KH * KW)).to(tl.int64) * out_size
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for kd in tl.static_range(KD):
        sd = id_ + PD - kd * DD
        od = sd // SD
        d_ok = (sd >= 0) & (sd % SD == 0) & (od < OD)
        for kh in tl.static_range(KH):
            sh = ih + PH - kh * DH
            oh = sh // SH
            h_ok = (sh >= 0) & (sh % SH == 0) & (oh < OH)
            for kw in tl.static_range(KW):
                sw = iw + PW - kw * DW
                ow = sw // SW
                ok = p_ok & d_ok & h_ok & (sw >= 0) & (sw % SW == 0) & (ow < OW)
                o = tl.where(ok, (od * OH + oh) * OW + ow, 0)
                tap = (kd * KH + kh) * KW + kw
                weight = tl.load(w_base + tap * out_size + o, mask=ok, other=0.0).to(ACC)
                grads = _load_tile(gy_ptr, channel, out_size, o, ok, c_ok, ACC)
                acc += weight[:, None] * grads
    _store_tile(gx_ptr, acc, channel, in_size, p, p_ok, c_ok)


@triton.jit
def _backward_weight_kernel(  # noqa: PLR0913
    gy_ptr, x_ptr, gw_ptr, C, CG, G, D, H, W, OD, OH, OW,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    bg, pid_p = tl.program_id(0), tl.program_id(1)
    b, g = bg // G, bg % G
    out_size = OD * OH * OW
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < out_size
    od, oh, ow = _coordinates(p, OH, OW)
    gw_base = gw_ptr + (bg * (KD * KH * KW)).to(tl.int64) * out_size + p
    for kd in tl.static_range(KD):
        id_ = od * SD - PD + kd * DD
        for kh in tl.static_range(KH):
            ih = oh * SH - PH + kh * DH
            for kw in tl.static_range(KW):
                iw = ow * SW - PW + kw * DW
                inside = p_ok & (id_ >= 0) & (id_ < D) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                offset = (id_ * H + ih) * W + iw
                total = tl.zeros((BLOCK_P,), dtype=ACC)
                for c0 in range(0, CG, BLOCK_C):
                    cc = c0 + tl.arange(0, BLOCK_C)
                    channel = (b * C + g * CG + cc).to(tl.int64)
                    c_ok = cc < CG
                    grads = _load_tile(gy_ptr, channel, out_size, p, p_ok, c_ok, ACC)
                    values = _load_tile(x_ptr, channel, D * H * W, offset, inside, c_ok, ACC)
                    total += tl.sum(grads * values, axis=1)
                tap = (kd * KH + kh) * KW + kw
                tl.store(gw_base + tap * out_size, total.to(gw_ptr.dtype.element_ty), mask=p_ok)


def _launch(kernel, grid, tensors, geometry, input: Tensor, weight: Tensor) -> None:
    """Launches ``kernel`` over ``grid`` with the sizes of ``input``/``weight`` and the
    (stride, padding, dilation) triples of ``geometry``."""
    stride, padding, dilation = geometry
    channels, size = input.shape[1], input.shape[2:]
    groups, kernel_size, out_size = weight.shape[1], weight.shape[2:5], weight.shape[5:]
    acc = tl.float64 if input.dtype == torch.float64 else tl.float32
    kernel[grid](
        *tensors,
        channels,
        channels // groups,
        groups,
        *size,
        *out_size,
        *stride,
        *padding,
        *dilation,
        *kernel_size,
        ACC=acc,
        BLOCK_P=BLOCK_P,
        BLOCK_C=BLOCK_C,
    )


def forward3d(
    input: Tensor, weight: Tensor, stride: Triple, padding: Triple, dilation: Triple
) -> Tensor:
    """(B, C, D, H, W), (B, G, Kd, Kh, Kw, D_out, H_out, W_out) -> (B, C, D_out, H_out, W_out)."""
    input, weight = input.contiguous(), weight.contiguous()
    batch, channels = input.shape[:2]
    groups, out_size = weight.shape[1], weight.shape[5:]
    output = input.new_empty(batch, channels, *out_size)
    grid = (
        batch * groups,
        triton.cdiv(out_size.numel(), BLOCK_P),
        triton.cdiv(channels // groups, BLOCK_C),
    )
    geometry = (stride, padding, dilation)
    _launch(_forward_kernel, grid, (input, weight, output), geometry, input, weight)
    return output


def backward3d(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    stride: Triple,
    padding: Triple,
    dilation: Triple,
    needs_input: bool,
    needs_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """(grad_input or ``None``, grad_weight or ``None``), contiguous."""
    grad_output, input, weight = grad_output.contiguous(), input.contiguous(), weight.contiguous()
    batch, channels = input.shape[:2]
    groups = weight.shape[1]
    geometry = (stride, padding, dilation)
    grad_input = grad_weight = None
    if needs_input:
        grad_input = torch.empty_like(input)
        grid = (
            batch * groups,
            triton.cdiv(input.shape[2:].numel(), BLOCK_P),
            triton.cdiv(channels // groups, BLOCK_C),
        )
        tensors = (grad_output, weight, grad_input)
        _launch(_backward_input_kernel, grid, tensors, geometry, input, weight)
    if needs_weight:
        grad_weight = torch.empty_like(weight)
        grid = (batch * groups, triton.cdiv(weight.shape[5:].numel(), BLOCK_P))
        tensors = (grad_output, input, grad_weight)
        _launch(_backward_weight_kernel, grid, tensors, geometry, input, weight)
    return grad_input, grad_weight
