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

from involution.ops.backends.triton.taps import source

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
def _source_offsets(
    voxel,
    valid,
    k,
    GEOMETRY: tl.constexpr,
    size,
    out_size,
    KH: tl.constexpr,
    KW: tl.constexpr,
    ADJOINT: tl.constexpr,
):
    """(flat offsets, ``valid`` and the voxel exists) of what the voxels ``voxel`` ((d, h, w)
    tensors) read through tap ``k`` = (kd * KH + kh) * KW + kw: for output voxels the input
    voxels (offsets in a volume of ``size``), or when ``ADJOINT``, for input voxels, the output
    voxels whose tap ``k`` reads them (offsets in a volume of ``out_size``, 0 where none)."""
    d, h, w = voxel
    src_d, inside_d = source(d, GEOMETRY, 0, k // (KH * KW), size[0], out_size[0], ADJOINT)
    src_h, inside_h = source(h, GEOMETRY, 1, (k // KW) % KH, size[1], out_size[1], ADJOINT)
    src_w, inside_w = source(w, GEOMETRY, 2, k % KW, size[2], out_size[2], ADJOINT)
    ok = valid & inside_d & inside_h & inside_w
    if ADJOINT:
        return tl.where(ok, (src_d * out_size[1] + src_h) * out_size[2] + src_w, 0), ok
    return (src_d * size[1] + src_h) * size[2] + src_w, ok


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
def _aggregate_kernel(  # noqa: PLR0913  (a Triton kernel: its arguments are its schema)
    src_ptr, w_ptr, dst_ptr, C, CG, G, size, out_size, GEOMETRY: tl.constexpr,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, ADJOINT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # The forward (src x, dst y: output voxels gather over their taps) or, when ADJOINT, the
    # gradient of the input (src grad_y, dst grad_x: input voxels gather over the output voxels
    # whose taps read them).
    in_numel, out_numel = _numel(size), _numel(out_size)
    dst_numel = in_numel if ADJOINT else out_numel
    bg, p, p_ok, channel, c_ok = _tile(dst_numel, C, CG, G, BLOCK_P, BLOCK_C)
    voxel = _coordinates(p, size if ADJOINT else out_size)
    w_base = w_ptr + (bg * (KD * KH * KW)).to(tl.int64) * out_numel
    if not ADJOINT:
        w_base += p
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for k in tl.static_range(KD * KH * KW):
        offset, ok = _source_offsets(voxel, p_ok, k, GEOMETRY, size, out_size, KH, KW, ADJOINT)
        # The kernel value of dst's own voxel, or for the adjoint that of the voxel read.
        if ADJOINT:
            weight = tl.load(w_base + k * out_numel + offset, mask=ok, other=0.0).to(ACC)
        else:
            weight = tl.load(w_base + k * out_numel, mask=p_ok, other=0.0).to(ACC)
        src_numel = out_numel if ADJOINT else in_numel
        acc += weight[:, None] * _load_tile(src_ptr, channel, src_numel, offset, ok, c_ok, ACC)
    _store_tile(dst_ptr, acc, channel, dst_numel, p, p_ok, c_ok)


@triton.jit
def _backward_weight_kernel(  # noqa: PLR0913
    gy_ptr, x_ptr, gw_ptr, C, CG, G, size, out_size, GEOMETRY: tl.constexpr,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    out_numel = _numel(out_size)
    # One channel block: the program reduces over all of its group's channels.
    bg, p, p_ok, _, _ = _tile(out_numel, C, CG, G, BLOCK_P, BLOCK_C)
    b, g = bg // G, bg % G
    out_voxel = _coordinates(p, out_size)
    gw_base = gw_ptr + (bg * (KD * KH * KW)).to(tl.int64) * out_numel + p
    for k in tl.static_range(KD * KH * KW):
        offset, inside = _source_offsets(
            out_voxel, p_ok, k, GEOMETRY, size, out_size, KH, KW, False
        )
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


def _launch(
    kernel: triton.JITFunction,
    tensors: tuple[Tensor, Tensor, Tensor],
    geometry: tuple[Triple, Triple, Triple],
    input: Tensor,
    weight: Tensor,
    **constexprs: bool,
) -> Tensor:
    """Launches ``kernel`` on ``tensors`` (two operands, then the result it writes, returned)
    with the sizes of ``input``/``weight``, the (stride, padding, dilation) triples of
    ``geometry`` and ``constexprs``: a program per (batch and group, block of the result's
    voxels, block of the group's channels), the grad_weight kernel's programs each reducing
    over all of their group's channels."""
    channels, size = input.shape[1], input.shape[2:]
    groups, kernel_size, out_size = weight.shape[1], weight.shape[2:5], weight.shape[5:]
    acc = tl.float64 if input.dtype == torch.float64 else tl.float32
    reduces = kernel is _backward_weight_kernel
    grid = (
        input.shape[0] * groups,
        triton.cdiv(tensors[-1].shape[-3:].numel(), BLOCK_P),
        1 if reduces else triton.cdiv(channels // groups, BLOCK_C),
    )
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
        **constexprs,
    )
    return tensors[-1]


def forward3d(
    input: Tensor, weight: Tensor, stride: Triple, padding: Triple, dilation: Triple
) -> Tensor:
    """(B, C, D, H, W), (B, G, Kd, Kh, Kw, D_out, H_out, W_out) -> (B, C, D_out, H_out, W_out)."""
    input, weight = input.contiguous(), weight.contiguous()
    output = input.new_empty(*input.shape[:2], *weight.shape[5:])
    geometry = (stride, padding, dilation)
    return _launch(
        _aggregate_kernel, (input, weight, output), geometry, input, weight, ADJOINT=False
    )


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
    geometry = (stride, padding, dilation)
    grad_input = grad_weight = None
    if needs_input:
        tensors = (grad_output, weight, torch.empty_like(input))
        grad_input = _launch(_aggregate_kernel, tensors, geometry, input, weight, ADJOINT=True)
    if needs_weight:
        tensors = (grad_output, input, torch.empty_like(weight))
        grad_weight = _launch(_backward_weight_kernel, tensors, geometry, input, weight)
    return grad_input, grad_weight
