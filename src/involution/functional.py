"""The functional front door of the involution operator."""

from __future__ import annotations

import torch
from torch import Tensor

from involution import custom_ops
from involution.backends import BACKENDS, resolve_backend

IntOrPair = int | tuple[int, int]

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _as_pair(name: str, value: IntOrPair) -> tuple[int, int]:
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
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(
            f"input and weight must be tensors, got {type(input).__name__} "
            f"and {type(weight).__name__}"
        )
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (B, C, H, W), got shape {tuple(input.shape)}")
    if weight.dim() != 6:
        raise ValueError(
            f"weight must be 6-D (B, G, Kh, Kw, H_out, W_out), got shape {tuple(weight.shape)}"
        )
    if input.device != weight.device:
        raise ValueError(f"input is on {input.device} but weight is on {weight.device}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown involution backend {backend!r}; choose one of {BACKENDS}")

    # Meta tensors have no autocast (asking would raise). A plain comparison rather than
    # torch.amp.is_autocast_available, which Dynamo cannot trace in older PyTorch (2.11).
    device_type = input.device.type
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        autocast_dtype = torch.get_autocast_dtype(device_type)
        input, weight = input.to(autocast_dtype), weight.to(autocast_dtype)
    if input.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"input dtype must be one of {_SUPPORTED_DTYPES}, got {input.dtype}")
    if input.dtype != weight.dtype:
        raise TypeError(f"input is {input.dtype} but weight is {weight.dtype}; they must match")

    stride_hw = _as_pair("stride", stride)
    dilation_hw = _as_pair("dilation", dilation)
    batch, channels, height, width = input.shape
    w_batch, groups, kernel_h, kernel_w, out_h, out_w = weight.shape
    if min(stride_hw) < 1:
        raise ValueError(f"stride must be positive, got {stride_hw}")
    if min(dilation_hw) < 1:
        raise ValueError(f"dilation must be positive, got {dilation_hw}")
    if kernel_h < 1 or kernel_w < 1:
        raise ValueError(f"kernel size must be positive, got {(kernel_h, kernel_w)}")
    if padding is None:
        padding_hw = (
            dilation_hw[0] * (kernel_h - 1) // 2,
            dilation_hw[1] * (kernel_w - 1) // 2,
        )
    else:
        padding_hw = _as_pair("padding", padding)
    if min(padding_hw) < 0:
        raise ValueError(f"padding must be non-negative, got {padding_hw}")
    if w_batch != batch:
        raise ValueError(
            f"weight batch {w_batch} does not match input batch {batch} "
            f"(input {tuple(input.shape)}, weight {tuple(weight.shape)})"
        )
    if groups < 1 or channels % groups != 0:
        raise ValueError(
            f"weight groups G={groups} must divide input channels C={channels} "
            f"(input {tuple(input.shape)}, weight {tuple(weight.shape)})"
        )
    expected = tuple(
        output_size(n, k, s, p, d)
        for n, k, s, p, d in zip(
            (height, width), (kernel_h, kernel_w), stride_hw, padding_hw, dilation_hw, strict=True
        )
    )
    if min(expected) < 1:
        raise ValueError(
            f"input spatial size {(height, width)} is too small for kernel {(kernel_h, kernel_w)} "
            f"with stride {stride_hw}, padding {padding_hw}, dilation {dilation_hw}"
        )
    if (out_h, out_w) != expected:
        raise ValueError(
            f"weight spatial size {(out_h, out_w)} does not match the output size {expected} of "
            f"input {(height, width)} with kernel {(kernel_h, kernel_w)}, stride {stride_hw}, "
            f"padding {padding_hw}, dilation {dilation_hw}"
        )

    concrete = resolve_backend(backend, input.device)
    args = (input, weight, stride_hw, padding_hw, dilation_hw, concrete)
    if custom_ops.use_eager_path(input, weight):
        return custom_ops.EagerInvolution2d.apply(*args)
    return custom_ops.involution2d_op(*args)
