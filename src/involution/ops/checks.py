"""Argument checks shared by the plain and the fused front doors (:mod:`involution.ops.functional`).

Every check raises ``TypeError`` (wrong kind of argument) or ``ValueError`` (wrong value or
shape) with the offending values in the message. The front doors call these in the same order:
tensors and devices, backend name, ranks, geometry, shapes, autocast, dtypes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from involution.ops.backends import BACKENDS
from involution.ops.layout import IntOrPair, Pair

__all__ = [
    "SUPPORTED_DTYPES",
    "Geometry",
    "IntOrPair",
    "Pair",
    "as_pair",
    "autocast",
    "check_backend",
    "check_dtypes",
    "check_groups",
    "check_kernel_branch",
    "check_rank",
    "check_tensors",
    "geometry",
    "geometry_nd",
    "output_size",
]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class Geometry(NamedTuple):
    """Validated convolution arguments of one call, one int per spatial dimension each (a
    (height, width) pair in 2-D)."""

    stride: Pair
    padding: Pair
    dilation: Pair
    out_size: Pair


def _join(items: list[str]) -> str:
    """``"a"``, ``"a and b"``, ``"a, b and c"``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def as_pair(name: str, value: IntOrPair) -> Pair:
    """``value`` as (height, width); ``TypeError`` naming ``name`` unless an int or two ints."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return value, value
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def output_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of one spatial dimension: ``floor((n + 2p - d(k-1) - 1) / s) + 1``."""
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def check_tensors(**tensors: Tensor | None) -> None:
    """Every named argument is a tensor (``None`` allowed) on the device of the first one."""
    given = {name: t for name, t in tensors.items() if t is not None}
    if not all(isinstance(t, Tensor) for t in given.values()):
        raise TypeError(
            f"{_join(list(given))} must be tensors, got "
            f"{_join([type(t).__name__ for t in given.values()])}"
        )
    (first_name, first), *rest = given.items()
    for name, tensor in rest:
        if tensor.device != first.device:
            raise ValueError(f"{name} is on {tensor.device} but {first_name} is on {first.device}")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown involution backend {backend!r}; choose one of {BACKENDS}")


def check_rank(name: str, tensor: Tensor, layout: tuple[str, ...]) -> None:
    """``tensor`` has one dimension per entry of ``layout`` (e.g. ``("B", "C", "H", "W")``)."""
    if tensor.dim() != len(layout):
        raise ValueError(
            f"{name} must be {len(layout)}-D ({', '.join(layout)}), got shape {tuple(tensor.shape)}"
        )


def check_groups(groups: int, channels: int, shapes: str) -> None:
    """``groups`` is a positive int dividing ``channels``; ``shapes`` describes the call."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if channels % groups != 0:
        raise ValueError(f"groups G={groups} must divide input channels C={channels} ({shapes})")


def check_kernel_branch(channels: int, group_channels: int, reduction_ratio: int) -> None:
    """An involution layer's channels split into groups of ``group_channels`` and leave at
    least one channel in the kernel branch (``channels // reduction_ratio``)."""
    if channels % group_channels != 0:
        raise ValueError(f"channels={channels} is not divisible by group_channels={group_channels}")
    if channels < reduction_ratio:
        raise ValueError(
            f"channels={channels} is smaller than reduction_ratio={reduction_ratio}, "
            "leaving no channels in the kernel branch"
        )


def geometry(
    input_size: Pair,
    kernel_size: Pair,
    stride: IntOrPair,
    padding: IntOrPair | None,
    dilation: IntOrPair,
) -> Geometry:
    """Check a 2-D call's convolution arguments (ints or pairs) and compute the output size
    (:func:`geometry_nd`)."""
    return geometry_nd(
        input_size,
        kernel_size,
        as_pair("stride", stride),
        None if padding is None else as_pair("padding", padding),
        as_pair("dilation", dilation),
    )


def geometry_nd(
    input_size: tuple[int, ...],
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...] | None,
    dilation: tuple[int, ...],
) -> Geometry:
    """Check the convolution arguments, one int per spatial dimension, and compute the output
    size. ``padding=None`` means ``d*(K-1)//2`` per dimension ("same" size for odd K and stride
    1)."""
    if min(stride) < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be positive, got {dilation}")
    if min(kernel_size) < 1:
        raise ValueError(f"kernel size must be positive, got {kernel_size}")
    if padding is None:
        padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel_size, strict=True))
    if min(padding) < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    out_size = tuple(
        output_size(*args)
        for args in zip(input_size, kernel_size, stride, padding, dilation, strict=True)
    )
    if min(out_size) < 1:
        raise ValueError(
            f"input spatial size {input_size} is too small for kernel {kernel_size} "
            f"with stride {stride}, padding {padding}, dilation {dilation}"
        )
    return Geometry(stride, padding, dilation, out_size)


def autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors cast to the autocast dtype of their device when autocast is on there.

    Meta tensors have no autocast (asking would raise). A plain comparison rather than
    ``torch.amp.is_autocast_available``, which Dynamo cannot trace in older PyTorch (2.11).
    """
    device_type = tensors[0].device.type
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def check_dtypes(**tensors: Tensor | None) -> None:
    """The first tensor has a supported dtype and every other (non-``None``) one shares it."""
    (first_name, first), *rest = tensors.items()
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{first_name} dtype must be one of {SUPPORTED_DTYPES}, got {first.dtype}")
    for name, tensor in rest:
        if tensor is not None and tensor.dtype != first.dtype:
            raise TypeError(
                f"{first_name} is {first.dtype} but {name} is {tensor.dtype}; they must match"
            )
