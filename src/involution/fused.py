"""Involution with the kernel generation's last step (the span 1x1 conv) fused into the op.

In :class:`~involution.Involution2d` the span conv turns the reduced features (C/r channels)
into G*K*K kernel channels, about three times the activation size for K=7 and 16 channels per
group, which the unfused path writes, reads back, and keeps for the backward. The fused op
``involution::involution2d_fused`` takes the reduced features and the span conv's parameters
instead:

- forward on the ``"triton"`` backend: the kernel values are computed per block of output
  pixels in registers and never written to memory, and autograd saves only the op's inputs;
- backward: the kernels are recomputed by a 1x1 convolution and, with the kernel gradient, are
  materialised transiently (freed when the backward of this op returns);
- every other backend: the reference implementation (span conv, then that backend's
  aggregation), the same numbers with no memory saving.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from involution import custom_ops
from involution.backends import BACKENDS, get_backend, resolve_backend
from involution.functional import _SUPPORTED_DTYPES, IntOrPair, _as_pair, output_size


def _pair(values: Sequence[int]) -> tuple[int, int]:
    return int(values[0]), int(values[1])


def generate_kernels(
    reduced: Tensor,
    span_weight: Tensor,
    span_bias: Tensor | None,
    kernel_size: Sequence[int],
    groups: int,
) -> Tensor:
    """The span conv: kernels (B, G, Kh, Kw, H_out, W_out) from ``reduced`` (B, R, H_out, W_out).

    ``span_weight`` is (G*Kh*Kw, R) and ``span_bias`` (G*Kh*Kw,) or ``None``.
    """
    batch, _, out_h, out_w = reduced.shape
    kernels = F.conv2d(reduced, span_weight[:, :, None, None], span_bias)
    return kernels.reshape(batch, groups, *_pair(kernel_size), out_h, out_w)


def fused_reference(
    input: Tensor,
    reduced: Tensor,
    span_weight: Tensor,
    span_bias: Tensor | None,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    backend: str = "reference",
) -> Tensor:
    """The fused op's definition: span conv, then ``backend``'s aggregation (B, C, H_out, W_out)."""
    kernels = generate_kernels(reduced, span_weight, span_bias, kernel_size, groups)
    return get_backend(backend).forward(
        input, kernels, _pair(stride), _pair(padding), _pair(dilation)
    )


@torch.library.custom_op("involution::involution2d_fused", mutates_args=())
def involution2d_fused_op(
    input: Tensor,
    reduced: Tensor,
    span_weight: Tensor,
    span_bias: Tensor | None,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    backend: str,
) -> Tensor:
    """Involution of ``input`` with kernels ``span(reduced)``; see :func:`involution2d_fused`."""
    memory_format = custom_ops.memory_format_of(input)
    if input.numel() == 0:
        return _output_like(input, reduced).zero_()
    if backend == "triton":
        from involution.backends import triton as triton_backend

        output = triton_backend.fused_forward(
            input,
            reduced,
            span_weight,
            span_bias,
            _pair(kernel_size),
            _pair(stride),
            _pair(padding),
            _pair(dilation),
        )
    else:
        output = fused_reference(
            input,
            reduced,
            span_weight,
            span_bias,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            backend,
        )
    return output.contiguous(memory_format=memory_format)


def _output_like(input: Tensor, reduced: Tensor) -> Tensor:
    return torch.empty(
        (*input.shape[:2], *reduced.shape[-2:]),
        dtype=input.dtype,
        device=input.device,
        memory_format=custom_ops.memory_format_of(input),
    )


@involution2d_fused_op.register_fake
def _(input, reduced, span_weight, span_bias, *args):
    return _output_like(input, reduced)


def _setup_context(ctx, inputs, output) -> None:
    input, reduced, span_weight, span_bias = inputs[:4]
    kernel_size, stride, padding, dilation, groups, backend = inputs[4:]
    # Only the op's inputs are saved: the kernels are recomputed in the backward.
    ctx.save_for_backward(input, reduced, span_weight, span_bias)
    ctx.kernel_args = (kernel_size, groups)
    ctx.conv_args = (stride, padding, dilation, backend)


def _backward(ctx, grad_output: Tensor):
    input, reduced, span_weight, span_bias = ctx.saved_tensors
    kernel_size, groups = ctx.kernel_args
    needs_input, needs_reduced, needs_weight, needs_bias = ctx.needs_input_grad[:4]
    kernels = generate_kernels(reduced, span_weight, span_bias, kernel_size, groups)
    grad_reduced = grad_span_weight = grad_span_bias = None
    grad_input, grad_kernels = custom_ops.aggregation_gradients(
        grad_output,
        input,
        kernels,
        ctx.conv_args,
        needs_input,
        needs_reduced or needs_weight or needs_bias,
    )
    if grad_kernels is not None:
        # (B, G*Kh*Kw, P): the gradient of the span conv's output.
        grad_kernels = grad_kernels.flatten(1, 3).flatten(2)
        if needs_reduced:
            grad_reduced = torch.matmul(span_weight.t(), grad_kernels).view(reduced.shape)
        if needs_weight:
            grad_span_weight = torch.einsum("bkp,brp->kr", grad_kernels, reduced.flatten(2))
        if needs_bias:
            grad_span_bias = grad_kernels.sum(dim=(0, 2))
    return grad_input, grad_reduced, grad_span_weight, grad_span_bias, *([None] * 6)


torch.library.register_autograd(
    "involution::involution2d_fused", _backward, setup_context=_setup_context
)


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
    ``W = conv2d(reduced, span_weight, span_bias).view(B, G, Kh, Kw, H_out, W_out)``, but on the
    ``"triton"`` backend ``W`` is never stored. Differentiable with respect to ``input``,
    ``reduced``, ``span_weight`` and ``span_bias``.

    Args:
        input: (B, C, H, W) features, NCHW or channels_last.
        reduced: (B, R, H_out, W_out) kernel-branch features (after reduce, norm, activation).
        span_weight: (G*Kh*Kw, R) or the conv layout (G*Kh*Kw, R, 1, 1).
        span_bias: (G*Kh*Kw,) or ``None``.
        kernel_size: int or (Kh, Kw).
        groups: G, dividing C.
        stride, padding, dilation, backend: as in :func:`involution.functional.involution2d`.

    Returns:
        (B, C, H_out, W_out), in the memory format of ``input``.
    """
    tensors = {"input": input, "reduced": reduced, "span_weight": span_weight}
    if span_bias is not None:
        tensors["span_bias"] = span_bias
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
        if tensor.device != input.device:
            raise ValueError(f"{name} is on {tensor.device} but input is on {input.device}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown involution backend {backend!r}; choose one of {BACKENDS}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if input.dim() != 4 or reduced.dim() != 4:
        raise ValueError(
            f"input and reduced must be 4-D, got shapes {tuple(input.shape)} and "
            f"{tuple(reduced.shape)}"
        )
    if span_weight.dim() == 4 and span_weight.shape[2:] == (1, 1):
        span_weight = span_weight.flatten(1)
    kh, kw = _as_pair("kernel_size", kernel_size)
    stride_hw = _as_pair("stride", stride)
    dilation_hw = _as_pair("dilation", dilation)
    padding_hw = (
        (dilation_hw[0] * (kh - 1) // 2, dilation_hw[1] * (kw - 1) // 2)
        if padding is None
        else _as_pair("padding", padding)
    )
    if min(kh, kw, *stride_hw, *dilation_hw) < 1 or min(padding_hw) < 0:
        raise ValueError(
            f"need kernel_size, stride, dilation >= 1 and padding >= 0, got {(kh, kw)}, "
            f"{stride_hw}, {dilation_hw}, {padding_hw}"
        )
    batch, channels, height, width = input.shape
    if channels % groups != 0:
        raise ValueError(f"groups={groups} must divide the input channels C={channels}")
    expected_weight = (groups * kh * kw, reduced.shape[1])
    if tuple(span_weight.shape) != expected_weight:
        raise ValueError(
            f"span_weight must have shape (G*Kh*Kw, R) = {expected_weight}, got "
            f"{tuple(span_weight.shape)}"
        )
    if span_bias is not None and tuple(span_bias.shape) != (groups * kh * kw,):
        raise ValueError(
            f"span_bias must have shape ({groups * kh * kw},), got {tuple(span_bias.shape)}"
        )
    out_hw = tuple(
        output_size(n, k, s, p, d)
        for n, k, s, p, d in zip(
            (height, width), (kh, kw), stride_hw, padding_hw, dilation_hw, strict=True
        )
    )
    if min(out_hw) < 1:
        raise ValueError(f"input spatial size {(height, width)} is too small for the kernel")
    if tuple(reduced.shape) != (batch, reduced.shape[1], *out_hw):
        raise ValueError(
            f"reduced must have shape (B={batch}, R, H_out, W_out={out_hw}), "
            f"got {tuple(reduced.shape)}"
        )

    if torch.is_autocast_enabled(input.device.type):
        dtype = torch.get_autocast_dtype(input.device.type)
        input, reduced, span_weight = input.to(dtype), reduced.to(dtype), span_weight.to(dtype)
        span_bias = span_bias.to(dtype) if span_bias is not None else None
    given = (input, reduced, span_weight, span_bias)
    dtypes = sorted({str(t.dtype) for t in given if t is not None})
    if len(dtypes) != 1 or input.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"all tensors must share one dtype of {_SUPPORTED_DTYPES}, got {dtypes}")

    concrete = resolve_backend(backend, input.device)
    return involution2d_fused_op(
        input,
        reduced,
        span_weight,
        span_bias,
        (kh, kw),
        stride_hw,
        padding_hw,
        dilation_hw,
        groups,
        concrete,
    )
