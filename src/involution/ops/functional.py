"""The front doors of the involution operator: :func:`involution2d` and :func:`involution2d_fused`.

Both check their arguments (:mod:`involution.ops.checks`), apply autocast, resolve the backend
and call the registered ops (:mod:`involution.ops.registration`).
:func:`generate_kernels` is the span conv that turns reduced features into per-pixel kernels.
"""

from __future__ import annotations

from torch import Tensor

from involution.ops import registration
from involution.ops.backends import resolve_backend
from involution.ops.checks import (
    IntOrPair,
    as_pair,
    autocast,
    check_backend,
    check_dtypes,
    check_groups,
    check_rank,
    check_tensors,
    geometry,
)
from involution.ops.layout import generate_kernels

__all__ = ["generate_kernels", "involution2d", "involution2d_fused"]


def involution2d(
    input: Tensor,
    weight: Tensor,
    stride: IntOrPair = 1,
    padding: IntOrPair | None = None,
    dilation: IntOrPair = 1,
    backend: str = "auto",
) -> Tensor:
    r"""Aggregate ``input`` with spatially varying, channel-shared kernels (involution).

    .. math::
        y[b, c, i, j] = \sum_{u, v} W[b, g(c), u, v, i, j]\,
                        x[b, c, i s_h + u d_h - p_h, j s_w + v d_w - p_w]

    with zero padding and contiguous groups, ``g(c) = c // (C // G)``, as in the official code.

    Args:
        input: (B, C, H, W) features. Any memory format; channels_last gives channels_last out.
        weight: (B, G, Kh, Kw, H_out, W_out) per-pixel kernels, one per group and output pixel.
            ``G`` must divide ``C``. ``weight.view(B, G*Kh*Kw, H_out, W_out)`` is the official
            kernel-channel order ``g*K*K + kh*K + kw``.
        stride: int or (sh, sw), each >= 1.
        padding: int or (ph, pw), each >= 0. ``None`` means ``d*(K-1)//2`` per dimension.
        dilation: int or (dh, dw), each >= 1.
        backend: ``"auto"`` (by device), ``"reference"`` (unfold), ``"cpu"`` (fast CPU path) or
            ``"triton"`` (CUDA kernels).

    Returns:
        (B, C, H_out, W_out) with ``H_out = floor((H + 2p - d(K-1) - 1) / s) + 1``.

    Half-precision inputs accumulate in float32. Under autocast both tensors are cast to the
    autocast dtype. Differentiable with respect to ``input`` and ``weight``.
    """
    check_tensors(input=input, weight=weight)
    check_rank("input", input, ("B", "C", "H", "W"))
    check_rank("weight", weight, ("B", "G", "Kh", "Kw", "H_out", "W_out"))
    check_backend(backend)
    batch, channels, height, width = input.shape
    w_batch, groups, kernel_h, kernel_w, out_h, out_w = weight.shape
    shapes = f"input {tuple(input.shape)}, weight {tuple(weight.shape)}"
    geo = geometry((height, width), (kernel_h, kernel_w), stride, padding, dilation)
    if w_batch != batch:
        raise ValueError(f"weight batch {w_batch} does not match input batch {batch} ({shapes})")
    check_groups(groups, channels, shapes)
    if (out_h, out_w) != geo.out_size:
        raise ValueError(
            f"weight spatial size {(out_h, out_w)} does not match the output size {geo.out_size} "
            f"of input {(height, width)} with kernel {(kernel_h, kernel_w)}, stride "
            f"{geo.stride}, padding {geo.padding}, dilation {geo.dilation}"
        )
    input, weight = autocast(input, weight)
    check_dtypes(input=input, weight=weight)

    concrete = resolve_backend(backend, input.device)
    args = (input, weight, geo.stride, geo.padding, geo.dilation, concrete)
    if registration.use_eager_path(input, weight):
        return registration.EagerInvolution2d.apply(*args)
    return registration.involution2d_op(*args)


def involution2d_fused(
    input: Tensor,
    reduced: Tensor,
    span_weight: Tensor,
    span_bias: Tensor | None,
    kernel_size: IntOrPair,
    groups: int,
    stride: IntOrPair = 1,
    padding: IntOrPair | None = None,
    dilation: IntOrPair = 1,
    backend: str = "auto",
) -> Tensor:
    """Involution whose kernels are the span conv of ``reduced``, fused into the aggregation.

    Equal (within rounding) to ``involution2d(input, W, stride, padding, dilation)`` with
    ``W = generate_kernels(reduced, span_weight, span_bias, kernel_size, groups)``, but on a
    backend with a fused forward (``"triton"``) ``W`` is never stored, and in every case autograd
    saves only the arguments and recomputes ``W`` in the backward. Differentiable with respect to
    ``input``, ``reduced``, ``span_weight`` and ``span_bias``.

    In :class:`~involution.ops.Involution2d` the span conv turns the reduced features (C/r
    channels) into G*K*K kernel channels, about three times the activation size for K=7 and 16
    channels per group, which the unfused path writes, reads back and keeps for the backward.

    Args:
        input: (B, C, H, W) features, NCHW or channels_last.
        reduced: (B, R, H_out, W_out) kernel-branch features (after reduce, norm, activation).
        span_weight: (G*Kh*Kw, R) or the conv layout (G*Kh*Kw, R, 1, 1).
        span_bias: (G*Kh*Kw,) or ``None``.
        kernel_size: int or (Kh, Kw).
        groups: G, dividing C.
        stride, padding, dilation, backend: as in :func:`involution2d`.

    Returns:
        (B, C, H_out, W_out), in the memory format of ``input``.
    """
    check_tensors(input=input, reduced=reduced, span_weight=span_weight, span_bias=span_bias)
    check_backend(backend)
    check_rank("input", input, ("B", "C", "H", "W"))
    check_rank("reduced", reduced, ("B", "R", "H_out", "W_out"))
    if span_weight.dim() == 4 and span_weight.shape[2:] == (1, 1):
        span_weight = span_weight.flatten(1)
    kernel_hw = as_pair("kernel_size", kernel_size)
    batch, channels, height, width = input.shape
    shapes = f"input {tuple(input.shape)}, reduced {tuple(reduced.shape)}"
    geo = geometry((height, width), kernel_hw, stride, padding, dilation)
    check_groups(groups, channels, shapes)
    rows = groups * kernel_hw[0] * kernel_hw[1]
    if tuple(span_weight.shape) != (rows, reduced.shape[1]):
        raise ValueError(
            f"span_weight must have shape (G*Kh*Kw, R) = {(rows, reduced.shape[1])}, got "
            f"{tuple(span_weight.shape)}"
        )
    if span_bias is not None and tuple(span_bias.shape) != (rows,):
        raise ValueError(f"span_bias must have shape ({rows},), got {tuple(span_bias.shape)}")
    if tuple(reduced.shape) != (batch, reduced.shape[1], *geo.out_size):
        raise ValueError(
            f"reduced must have shape (B={batch}, R, H_out, W_out={geo.out_size}), "
            f"got {tuple(reduced.shape)}"
        )
    input, reduced, span_weight, span_bias = autocast(input, reduced, span_weight, span_bias)
    check_dtypes(input=input, reduced=reduced, span_weight=span_weight, span_bias=span_bias)

    return registration.involution2d_fused_op(
        input,
        reduced,
        span_weight,
        span_bias,
        kernel_hw,
        geo.stride,
        geo.padding,
        geo.dilation,
        groups,
        resolve_backend(backend, input.device),
    )
