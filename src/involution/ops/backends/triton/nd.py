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

from involution.ops.backends.triton.taps import adjoint_tap, tap

Triple = tuple[int, int, int]

BLOCK_P = 64
BLOCK_C = 16


@triton.jit
def _coordinates(p, size):
    """(d, h, w) of the flat voxel indices ``p`` in a volume of ``size`` (D, H, W)."""
    return p // (size[1] * size[2]), (p // size[2]) % size[1], p % size[2]


@triton.jit
def _numel(size):
    """The voxels of a volume of ``size`` (D, H, W)."""
    return size[0] * size[1] * size[2]


@triton.jit
def _tap_offsets(
    out_voxel, valid, k, GEOMETRY: tl.constexpr, size, KH: tl.constexpr, KW: tl.constexpr
):
    """(flat offsets in a volume of ``size``, ``valid`` and inside it) of what tap ``k`` =
    (kd * KH + kh) * KW + kw of the output voxels ``out_voxel`` ((d, h, w) tensors) reads."""
    od, oh, ow = out_voxel
    id_, inside_d = tap(od, GEOMETRY, 0, k // (KH * KW), size[0])
    ih, inside_h = tap(oh, GEOMETRY, 1, (k // KW) % KH, size[1])
    iw, inside_w = tap(ow, GEOMETRY, 2, k % KW, size[2])
    return (id_ * size[1] + ih) * size[2] + iw, valid & inside_d & inside_h & inside_w


@triton.jit
def _adjoint_tap_offsets(
    in_voxel, valid, k, GEOMETRY: tl.constexpr, out_size, KH: tl.constexpr, KW: tl.constexpr
):
    """(flat offsets in an output volume of ``out_size``, 0 where none, ``valid`` and one
    exists) of the output voxels whose tap ``k`` reads the input voxels ``in_voxel``."""
    id_, ih, iw = in_voxel
    od, reads_d = adjoint_tap(id_, GEOMETRY, 0, k // (KH * KW), out_size[0])
    oh, reads_h = adjoint_tap(ih, GEOMETRY, 1, (k // KW) % KH, out_size[1])
    ow, reads_w = adjoint_tap(iw, GEOMETRY, 2, k % KW, out_size[2])
    reads = valid & reads_d & reads_h & reads_w
    return tl.where(reads, (od * out_size[1] + oh) * out_size[2] + ow, 0), reads


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


# The kernels take the input's (D, H, W) ``size``, the output's ``out_size`` and GEOMETRY,
# the (stride, padding, dilation) triples, as in :mod:`~.taps`; the taps are unrolled.
@triton.jit
def _forward_kernel(  # noqa: PLR0913  (a Triton kernel: its arguments are its schema)
    x_ptr, w_ptr, y_ptr, C, CG, G, size, out_size, GEOMETRY: tl.constexpr,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    out_numel = _numel(out_size)
    bg, p, p_ok, channel, c_ok = _tile(out_numel, C, CG, G, BLOCK_P, BLOCK_C)
    out_voxel = _coordinates(p, out_size)
    w_base = w_ptr + (bg * (KD * KH * KW)).to(tl.int64) * out_numel + p
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for k in tl.static_range(KD * KH * KW):
        offset, inside = _tap_offsets(out_voxel, p_ok, k, GEOMETRY, size, KH, KW)
        weight = tl.load(w_base + k * out_numel, mask=p_ok, other=0.0).to(ACC)
        values = _load_tile(x_ptr, channel, _numel(size), offset, inside, c_ok, ACC)
        acc += weight[:, None] * values
    _store_tile(y_ptr, acc, channel, out_numel, p, p_ok, c_ok)


@triton.jit
def _backward_input_kernel(  # noqa: PLR0913
    gy_ptr, w_ptr, gx_ptr, C, CG, G, size, out_size, GEOMETRY: tl.constexpr,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    in_numel, out_numel = _numel(size), _numel(out_size)
    bg, p, p_ok, channel, c_ok = _tile(in_numel, C, CG, G, BLOCK_P, BLOCK_C)
    in_voxel = _coordinates(p, size)
    w_base = w_ptr + (bg * (KD * KH * KW)).to(tl.int64) * out_numel
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for k in tl.static_range(KD * KH * KW):
        o, ok = _adjoint_tap_offsets(in_voxel, p_ok, k, GEOMETRY, out_size, KH, KW)
        weight = tl.load(w_base + k * out_numel + o, mask=ok, other=0.0).to(ACC)
        grads = _load_tile(gy_ptr, channel, out_numel, o, ok, c_ok, ACC)
        acc += weight[:, None] * grads
    _store_tile(gx_ptr, acc, channel, in_numel, p, p_ok, c_ok)


@triton.jit
def _backward_weight_kernel(  # noqa: PLR0913
    gy_ptr, x_ptr, gw_ptr, C, CG, G, size, out_size, GEOMETRY: tl.constexpr,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    out_numel = _numel(out_size)
    # A 2-D grid: the program reduces over all of its group's channels.
    bg, p, p_ok, _, _ = _tile(out_numel, C, CG, G, BLOCK_P, BLOCK_C)
    b, g = bg // G, bg % G
    out_voxel = _coordinates(p, out_size)
    gw_base = gw_ptr + (bg * (KD * KH * KW)).to(tl.int64) * out_numel + p
    for k in tl.static_range(KD * KH * KW):
        offset, inside = _tap_offsets(out_voxel, p_ok, k, GEOMETRY, size, KH, KW)
        total = tl.zeros((BLOCK_P,), dtype=ACC)
        for c0 in range(0, CG, BLOCK_C):
            # Recomputed per block: an int64 channel vector kept across the taps costs registers.
            cc = c0 + tl.arange(0, BLOCK_C)
            channel = (b * C + g * CG + cc).to(tl.int64)
            c_ok = cc < CG
            grads = _load_tile(gy_ptr, channel, out_numel, p, p_ok, c_ok, ACC)
            values = _load_tile(x_ptr, channel, _numel(size), offset, inside, c_ok, ACC)
            total += tl.sum(grads * values, axis=1)
        tl.store(gw_base + k * out_numel, total.to(gw_ptr.dtype.element_ty), mask=p_ok)


def _launch(kernel, grid, tensors, geometry, input: Tensor, weight: Tensor) -> None:
    """Launches ``kernel`` over ``grid`` with the sizes of ``input``/``weight`` and the
    (stride, padding, dilation) triples of ``geometry``."""
    channels, size = input.shape[1], input.shape[2:]
    groups, kernel_size, out_size = weight.shape[1], weight.shape[2:5], weight.shape[5:]
    acc = tl.float64 if input.dtype == torch.float64 else tl.float32
    kernel[grid](
        *tensors,
        channels,
        channels // groups,
        groups,
        tuple(size),
        tuple(out_size),
        tuple(tuple(triple) for triple in geometry),
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
