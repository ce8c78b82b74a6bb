"""The reference backend: the plain unfold formulation of the official code.

It materialises the K*K-times-larger unfolded input, so it is slow and memory hungry, but it is
short enough to check by eye, runs on every device and dtype, and is what every fast backend is
tested against. Half-precision inputs are computed in float32.
"""

from __future__ import annotations

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
