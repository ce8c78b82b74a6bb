"""Registration of the involution operator with ``torch.library``.

The operator is a ``torch.library.custom_op`` (``torch.ops.involution.involution2d``) with a fake
(meta) implementation and a registered autograd formula, so ``torch.compile(fullgraph=True)``
traces through it without a graph break and ``torch.library.opcheck`` passes. The backward is
more custom ops: one per gradient, so only the gradients that are needed are computed, and one
for both, which lets a backend share work between them.

The ops take already-validated arguments: call :func:`involution.functional.involution2d`.
Outputs follow the input's memory format (channels_last in, channels_last out).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from involution.backends import get_backend


def _pair(values: Sequence[int]) -> tuple[int, int]:
    return int(values[0]), int(values[1])


def memory_format_of(tensor: Tensor) -> torch.memory_format:
    """channels_last for tensors laid out that way (and not also plain contiguous), else NCHW."""
    if (
        tensor.dim() == 4
        and not tensor.is_contiguous()
        and tensor.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


def _output_like(input: Tensor, weight: Tensor) -> Tensor:
    batch, channels = input.shape[:2]
    out_h, out_w = weight.shape[-2:]
    return torch.empty(
        (batch, channels, out_h, out_w),
        dtype=input.dtype,
        device=input.device,
        memory_format=memory_format_of(input),
    )


@torch.library.custom_op("involution::involution2d", mutates_args=())
def involution2d_op(
    input: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str,
) -> Tensor:
    """Involution forward: y[b, c, i, j] = sum_uv weight[b, g(c), u, v, i, j] * x_pad[...]."""
    if input.numel() == 0:
        return _output_like(input, weight).zero_()
    output = get_backend(backend).forward(
        input, weight, _pair(stride), _pair(padding), _pair(dilation)
    )
    return output.contiguous(memory_format=memory_format_of(input))


@involution2d_op.register_fake
def _(input, weight, stride, padding, dilation, backend):
    return _output_like(input, weight)


@torch.library.custom_op("involution::involution2d_backward_input", mutates_args=())
def involution2d_backward_input_op(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str,
) -> Tensor:
    """Gradient of :func:`involution2d_op` with respect to ``input``."""
    memory_format = memory_format_of(input)
    if input.numel() == 0:
        return torch.zeros_like(input, memory_format=memory_format)
    grad_input = get_backend(backend).backward_input(
        grad_output, input, weight, _pair(stride), _pair(padding), _pair(dilation)
    )
    return grad_input.contiguous(memory_format=memory_format)


@involution2d_backward_input_op.register_fake
def _(grad_output, input, weight, stride, padding, dilation, backend):
    return torch.empty_like(input, memory_format=memory_format_of(input))


@torch.library.custom_op("involution::involution2d_backward_weight", mutates_args=())
def involution2d_backward_weight_op(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str,
) -> Tensor:
    """Gradient of :func:`involution2d_op` with respect to ``weight``."""
    if input.numel() == 0:
        return torch.zeros_like(weight, memory_format=torch.contiguous_format)
    grad_weight = get_backend(backend).backward_weight(
        grad_output, input, weight, _pair(stride), _pair(padding), _pair(dilation)
    )
    return grad_weight.contiguous()


@involution2d_backward_weight_op.register_fake
def _(grad_output, input, weight, stride, padding, dilation, backend):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.custom_op("involution::involution2d_backward", mutates_args=())
def involution2d_backward_op(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Both gradients of :func:`involution2d_op`: (grad_input, grad_weight)."""
    memory_format = memory_format_of(input)
    if input.numel() == 0:
        return (
            torch.zeros_like(input, memory_format=memory_format),
            torch.zeros_like(weight, memory_format=torch.contiguous_format),
        )
    impl = get_backend(backend)
    args = (grad_output, input, weight, _pair(stride), _pair(padding), _pair(dilation))
    if hasattr(impl, "backward"):
        grad_input, grad_weight = impl.backward(*args)
    else:
        grad_input, grad_weight = impl.backward_input(*args), impl.backward_weight(*args)
    return grad_input.contiguous(memory_format=memory_format), grad_weight.contiguous()


@involution2d_backward_op.register_fake
def _(grad_output, input, weight, stride, padding, dilation, backend):
    return (
        torch.empty_like(input, memory_format=memory_format_of(input)),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output) -> None:
    input, weight, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(input, weight)
    ctx.conv_args = (stride, padding, dilation, backend)


def aggregation_gradients(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    conv_args: tuple,
    needs_input: bool,
    needs_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """(grad_input, grad_weight) of the aggregation, each ``None`` where it is not needed.

    ``conv_args`` is (stride, padding, dilation, backend). Both gradients go through one op
    call, so that a backend can share work between them.
    """
    if needs_input and needs_weight:
        return involution2d_backward_op(grad_output, input, weight, *conv_args)
    if needs_input:
        return involution2d_backward_input_op(grad_output, input, weight, *conv_args), None
    if needs_weight:
        return None, involution2d_backward_weight_op(grad_output, input, weight, *conv_args)
    return None, None


def _backward(ctx, grad_output: Tensor):
    input, weight = ctx.saved_tensors
    grad_input, grad_weight = aggregation_gradients(
        grad_output, input, weight, ctx.conv_args, *ctx.needs_input_grad[:2]
    )
    return grad_input, grad_weight, None, None, None, None


torch.library.register_autograd("involution::involution2d", _backward, setup_context=_setup_context)
