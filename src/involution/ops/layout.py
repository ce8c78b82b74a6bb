"""Tensor layouts shared by the op's registration and its backends.

Backends import from here (never from the registration or the front doors above them): the
memory format an output follows, an empty output in it, the (B, G, Kh, Kw, H_out, W_out)
kernel layout of the span conv's output, and what tells that tensors are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: A validated (height, width) pair: stride, padding, dilation or kernel size.
Pair = tuple[int, int]

#: An int for both spatial dimensions, or (height, width): what the front doors take.
IntOrPair = int | tuple[int, int]


def pair(values: Sequence[int]) -> Pair:
    """``(int(values[0]), int(values[1]))``: the op schemas pass pairs as lists of ints."""
    return int(values[0]), int(values[1])


def memory_format_of(tensor: Tensor) -> torch.memory_format:
    """channels_last (4-D) or channels_last_3d (5-D) for tensors laid out that way (and not also
    plain contiguous), else contiguous."""
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(tensor.dim())
    if (
        channels_last is not None
        and not tensor.is_contiguous()
        and tensor.is_contiguous(memory_format=channels_last)
    ):
        return channels_last
    return torch.contiguous_format


def empty_output(input: Tensor, out_size: Sequence[int], channels: int | None = None) -> Tensor:
    """Uninitialised (B, C, H_out, W_out) output in the dtype, device and layout of ``input``
    (``channels`` instead of C when given)."""
    return torch.empty(
        (input.shape[0], input.shape[1] if channels is None else channels, *out_size),
        dtype=input.dtype,
        device=input.device,
        memory_format=memory_format_of(input),
    )


def aggregation_output(
    input: Tensor, out_size: Sequence[int], compute: Callable[[], Tensor]
) -> Tensor:
    """``compute()`` (the aggregation (B, C, *out_size)) in the memory format of ``input``;
    zeros for an empty input, without calling it (backends need not handle empty tensors)."""
    if input.numel() == 0:
        return empty_output(input, out_size).zero_()
    return compute().contiguous(memory_format=memory_format_of(input))


def tensor_states(*tensors: Tensor | None) -> tuple | None:
    """What tells whether these tensors still hold the values they held, without reading them:
    (id, data pointer, version counter) each (``None`` for ``None``). ``None`` when one is an
    inference tensor, which has no version counter."""
    try:
        return tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in tensors)
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


def generate_kernels(
    reduced: Tensor,
    span_weight: Tensor,
    span_bias: Tensor | None,
    kernel_size: Sequence[int],
    groups: int,
) -> Tensor:
    """The span conv: kernels (B, G, Kh, Kw, H_out, W_out) from ``reduced`` (B, R, H_out, W_out).

    ``span_weight`` is (G*Kh*Kw, R) or the conv layout (G*Kh*Kw, R, 1, 1), ``span_bias``
    (G*Kh*Kw,) or ``None``. Kernel channel ``g*Kh*Kw + kh*Kw + kw`` is the official order.
    """
    batch, _, out_h, out_w = reduced.shape
    if span_weight.dim() == 2:
        span_weight = span_weight[:, :, None, None]
    kernels = F.conv2d(reduced, span_weight, span_bias)
    return kernels.reshape(batch, groups, *pair(kernel_size), out_h, out_w)


def is_pixel_major(kernels: Tensor) -> bool:
    """Whether (B, G, Kh, Kw, H_out, W_out) kernels are laid out (B, H_out, W_out, G, Kh, Kw).

    That is the span conv's channels_last output viewed as kernels; the cpu backend reads the
    kernels and writes their gradient in that layout in place.
    """
    return not kernels.is_contiguous() and kernels.permute(0, 4, 5, 1, 2, 3).is_contiguous()


def kernels_like(tensor: Tensor, kernels: Tensor) -> Tensor:
    """``tensor`` (B, G, Kh, Kw, H_out, W_out) laid out like ``kernels``: pixel-major when they
    are (:func:`is_pixel_major`), else contiguous. The layout of a kernel gradient."""
    if is_pixel_major(kernels):
        return tensor.permute(0, 4, 5, 1, 2, 3).contiguous().permute(0, 3, 4, 5, 1, 2)
    return tensor.contiguous()
