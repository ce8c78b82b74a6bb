"""Registration of the involution operator with ``torch.library``, and its eager fast path.

The operator is a ``torch.library.custom_op`` (``torch.ops.involution.involution2d``) with a fake
(meta) implementation and a registered autograd formula, so ``torch.compile(fullgraph=True)``
traces through it without a graph break and ``torch.library.opcheck`` passes. The backward is
more custom ops: one per gradient, so only the gradients that are needed are computed, and one
for both, which lets a backend share work between them.

Plain eager calls take :class:`EagerInvolution2d` instead: an ``autograd.Function`` around the
same backend calls (:func:`aggregate`, :func:`gradients`). ``torch.library``'s Python dispatch
costs about 120 µs per forward+backward on CPU, which is a quarter of the whole operator on
RedNet's 7x7 maps at batch 1. See :func:`use_eager_path` for when the ops are used instead.

The ops take already-validated arguments: call :func:`involution.functional.involution2d`.
Outputs follow the input's memory format (channels_last in, channels_last out).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

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


def aggregate(
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


def gradients(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str,
    needs_input: bool,
    needs_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """(grad_input, grad_weight) of :func:`aggregate`, each ``None`` where it is not needed.

    grad_input has the input's memory format, grad_weight is contiguous. A backend with a
    ``backward`` computes both in one call, sharing work between them.
    """
    memory_format = memory_format_of(input)
    if input.numel() == 0:
        return (
            torch.zeros_like(input, memory_format=memory_format) if needs_input else None,
            torch.zeros_like(weight, memory_format=torch.contiguous_format)
            if needs_weight
            else None,
        )
    impl = get_backend(backend)
    args = (grad_output, input, weight, _pair(stride), _pair(padding), _pair(dilation))
    if needs_input and needs_weight and hasattr(impl, "backward"):
        grad_input, grad_weight = impl.backward(*args)
    else:
        grad_input = impl.backward_input(*args) if needs_input else None
        grad_weight = impl.backward_weight(*args) if needs_weight else None
    return (
        None if grad_input is None else grad_input.contiguous(memory_format=memory_format),
        None if grad_weight is None else grad_weight.contiguous(),
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
    """Involution forward (:func:`aggregate`) as a custom op."""
    return aggregate(input, weight, stride, padding, dilation, backend)


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
    conv_args = (stride, padding, dilation, backend)
    return gradients(grad_output, input, weight, *conv_args, True, False)[0]


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
    conv_args = (stride, padding, dilation, backend)
    return gradients(grad_output, input, weight, *conv_args, False, True)[1]


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
    conv_args = (stride, padding, dilation, backend)
    grad_input, grad_weight = gradients(grad_output, input, weight, *conv_args, True, True)
    return grad_input, grad_weight


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


def use_eager_path(input: Tensor, weight: Tensor) -> bool:
    """Whether a call can skip the custom op for :class:`EagerInvolution2d`.

    Only plain tensors in plain eager mode: under ``torch.compile``/``torch.export``, under a
    dispatch mode (``FlopCounterMode``, ``FakeTensorMode``, ...) and for tensor subclasses the
    custom op is used, since those see ops, not Python code.
    """
    return (
        type(input) is Tensor
        and type(weight) is Tensor
        and input.device.type != "meta"
        and not torch.compiler.is_compiling()
        and not is_in_torch_dispatch_mode()
    )


class EagerInvolution2d(torch.autograd.Function):
    """The involution op for eager calls, without ``torch.library``'s dispatch overhead.

    Same arguments, results and gradients as ``torch.ops.involution.involution2d``: both call
    :func:`aggregate` and :func:`gradients`.
    """

    @staticmethod
    def forward(ctx, input, weight, stride, padding, dilation, backend):
        inputs = (input, weight, stride, padding, dilation, backend)
        _setup_context(ctx, inputs, None)
        return aggregate(*inputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input, grad_weight = gradients(
            grad_output, input, weight, *ctx.conv_args, *ctx.needs_input_grad[:2]
        )
        return grad_input, grad_weight, None, None, None, None
