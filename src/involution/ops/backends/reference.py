"""The reference backend: the plain unfold formulation of the official code.

It materialises the K*K-times-larger unfolded input, so it is slow and memory hungry, but it is
short enough to check by eye, runs on every device and dtype, and is what every fast backend is
tested against. Half-precision inputs are computed in float32.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from involution.ops.layout import Pair


def unavailable_reason(device: torch.device) -> str | None:
    return None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _unfold(input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair) -> Tensor:
    """Unfolded input as (B, G, C/G, Kh*Kw, H_out, W_out)."""
    batch, channels = input.shape[:2]
    _, groups, kh, kw, out_h, out_w = weight.shape
    cols = F.unfold(input, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    return cols.view(batch, groups, channels // groups, kh * kw, out_h, out_w)


def forward(input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair) -> Tensor:
    dtype = _compute_dtype(input.dtype)
    batch, channels = input.shape[:2]
    _, groups, kh, kw, out_h, out_w = weight.shape
    cols = _unfold(input.to(dtype), weight, stride, padding, dilation)
    kernels = weight.to(dtype).reshape(batch, groups, 1, kh * kw, out_h, out_w)
    output = (cols * kernels).sum(dim=3).view(batch, channels, out_h, out_w)
    return output.to(input.dtype)


def backward_input(
    grad_output: Tensor, input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair
) -> Tensor:
    dtype = _compute_dtype(input.dtype)
    batch, channels, height, width = input.shape
    _, groups, kh, kw, out_h, out_w = weight.shape
    kernels = weight.to(dtype).reshape(batch, groups, 1, kh * kw, out_h, out_w)
    grads = grad_output.to(dtype).reshape(batch, groups, channels // groups, 1, out_h, out_w)
    grad_cols = (kernels * grads).reshape(batch, channels * kh * kw, out_h * out_w)
    grad_input = F.fold(
        grad_cols, (height, width), (kh, kw), dilation=dilation, padding=padding, stride=stride
    )
    return grad_input.to(input.dtype)


def backward_weight(
    grad_output: Tensor, input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair
) -> Tensor:
    dtype = _compute_dtype(input.dtype)
    batch, channels = input.shape[:2]
    groups, out_h, out_w = weight.shape[1], *weight.shape[-2:]
    cols = _unfold(input.to(dtype), weight, stride, padding, dilation)
    grads = grad_output.to(dtype).reshape(batch, groups, channels // groups, 1, out_h, out_w)
    grad_weight = (cols * grads).sum(dim=2).view(weight.shape)
    return grad_weight.to(weight.dtype)


# N-d (1D as 3D with D = H = 1, and 3D): the same formulation with the taps gathered by strided
# slicing (PyTorch has no 3-D unfold). Shapes: input (B, C, *S), weight (B, G, *K, *S_out).

#: Stride, padding or dilation: one int per spatial dimension.
Ints = Sequence[int]


def _tap_slices(
    kernel: Sequence[int], out_size: Sequence[int], stride: Ints, dilation: Ints
) -> Iterator[tuple[slice, ...]]:
    """For each tap of ``kernel`` (row-major order), the slices of the padded input it reads."""
    for tap in itertools.product(*(range(k) for k in kernel)):
        yield tuple(
            slice(t * d, t * d + (o - 1) * s + 1, s)
            for t, o, s, d in zip(tap, out_size, stride, dilation, strict=True)
        )


def _unfold_nd(
    input: Tensor, weight: Tensor, stride: Ints, padding: Ints, dilation: Ints
) -> Tensor:
    """Unfolded input as (B, G, C/G, prod(K), *S_out)."""
    dims = input.dim() - 2
    batch, channels = input.shape[:2]
    groups, kernel, out_size = weight.shape[1], weight.shape[2 : 2 + dims], weight.shape[2 + dims :]
    padded = F.pad(input, [p for p in reversed(padding) for _ in range(2)])
    grouped = padded.view(batch, groups, channels // groups, *padded.shape[2:])
    taps = [grouped[(..., *s)] for s in _tap_slices(kernel, out_size, stride, dilation)]
    return torch.stack(taps, dim=3)


def forward3d(input: Tensor, weight: Tensor, stride: Ints, padding: Ints, dilation: Ints) -> Tensor:
    """(B, C, D, H, W), (B, G, Kd, Kh, Kw, D_out, H_out, W_out) -> (B, C, D_out, H_out, W_out).

    Any number of spatial dimensions in fact; ``stride``, ``padding``, ``dilation`` one int each.
    """
    dtype = _compute_dtype(input.dtype)
    dims = input.dim() - 2
    batch, channels = input.shape[:2]
    groups, out_size = weight.shape[1], weight.shape[2 + dims :]
    cols = _unfold_nd(input.to(dtype), weight, stride, padding, dilation)
    kernels = weight.to(dtype).reshape(batch, groups, 1, -1, *out_size)
    output = (cols * kernels).sum(dim=3).reshape(batch, channels, *out_size)
    return output.to(input.dtype)


def backward3d(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    stride: Ints,
    padding: Ints,
    dilation: Ints,
    needs_input: bool,
    needs_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """(grad_input (B, C, *S) or ``None``, grad_weight (B, G, *K, *S_out) or ``None``) of
    :func:`forward3d`; the input gradient scatters each tap's products back into place."""
    dtype = _compute_dtype(input.dtype)
    dims = input.dim() - 2
    batch, channels = input.shape[:2]
    groups, kernel, out_size = weight.shape[1], weight.shape[2 : 2 + dims], weight.shape[2 + dims :]
    grads = grad_output.to(dtype).reshape(batch, groups, channels // groups, 1, *out_size)
    grad_input = grad_weight = None
    if needs_input:
        padded_size = [n + 2 * p for n, p in zip(input.shape[2:], padding, strict=True)]
        grad_padded = grads.new_zeros(batch, groups, channels // groups, *padded_size)
        kernels = weight.to(dtype).reshape(batch, groups, 1, -1, *out_size)
        products = kernels * grads
        for tap, where in enumerate(_tap_slices(kernel, out_size, stride, dilation)):
            grad_padded[(..., *where)] += products[:, :, :, tap]
        inside = tuple(slice(p, p + n) for n, p in zip(input.shape[2:], padding, strict=True))
        grad_input = grad_padded[(..., *inside)].reshape(input.shape).to(input.dtype)
    if needs_weight:
        cols = _unfold_nd(input.to(dtype), weight, stride, padding, dilation)
        grad_weight = (cols * grads).sum(dim=2).reshape(weight.shape).to(weight.dtype)
    return grad_input, grad_weight
