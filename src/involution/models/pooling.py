"""The deep stem's 3x3 / 2 max pool: ATen's slow CPU NCHW forward taken in channels_last, and in
training the stem's last BatchNorm and ReLU fused with it.

On CPU, ATen's max pool forward is far slower on NCHW tensors than on channels_last ones: 20-24
vs 1.3-1.6 ms for RedNet-50's stem output at batch 8 (8 x 64 x 112 x 112, float32, 2 threads),
while copying that map to channels_last takes 3-7 ms. :class:`StemMaxPool2d` therefore pools an
NCHW CPU input through a channels_last copy and returns NCHW outputs. Its backward is ATen's NCHW
one (about 2 ms there) from the same indices, flat ``h * W + w`` offsets within each channel's
plane in either layout, so the input's gradient comes out NCHW without a copy back: the same
values, indices and gradients as ``nn.MaxPool2d``, ties included.

In training, the BatchNorm (batch statistics) and ReLU before the pool cost more than the pool:
as modules they write and read the normalised map twice, autograd keeps it beside the
BatchNorm's input together with int64 indices, and their backward passes run over the full-size
map three times. :func:`norm_relu_max_pool` computes ``pool(relu(norm(x)))`` in one CPU op
(``src/involution/csrc/pool_cpu.cpp``) that never writes the normalised map and keeps
``x`` (which BatchNorm's backward reads anyway), the pooled map (the next layer's input) and
one byte per window for its argmax; backward takes BatchNorm's two sums per channel from the
pooled map (the gradient is zero outside the windows' argmaxes) and writes ``x``'s gradient in
one pass. :func:`norm_relu_max_pool_applies` says where it runs.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from involution.ops.backends import cpu
from involution.ops.regenerate import batch_norm_relu, update_running_stats

__all__ = ["StemMaxPool2d", "norm_relu_max_pool", "norm_relu_max_pool_applies"]


class _ChannelsLastMaxPool2d(torch.autograd.Function):
    """``max_pool2d(input, kernel_size, stride, padding)`` of an NCHW tensor, pooled in
    channels_last; backward through ATen's NCHW max-pool backward. Saves the input (the
    preceding in-place ReLU's output, which that ReLU keeps anyway) and the indices, as ATen's
    op does."""

    @staticmethod
    def forward(
        ctx, input: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]
    ) -> Tensor:
        pooled, indices = torch.ops.aten.max_pool2d_with_indices(
            input.contiguous(memory_format=torch.channels_last), kernel_size, stride, padding
        )
        ctx.save_for_backward(input, indices.contiguous())
        ctx.arguments = (kernel_size, stride, padding)
        return pooled.contiguous()

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, indices = ctx.saved_tensors
        kernel_size, stride, padding = ctx.arguments
        grad_input = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_output.contiguous(), input, kernel_size, stride, padding, [1, 1], False, indices
        )
        return grad_input, None, None, None


class StemMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d(3, stride=2, padding=1)`` (the deep stem's pool) whose CPU forward on a
    contiguous NCHW (B, C, H, W) tensor runs in channels_last (see the module docstring).

    Other devices, layouts, tracing, scripting and compiling (Inductor generates its own pool)
    take ``nn.MaxPool2d``'s forward. Shape: (B, C, H, W) -> (B, C, ceil(H / 2), ceil(W / 2)).
    """

    def __init__(self) -> None:
        super().__init__(3, stride=2, padding=1)

    def forward(self, input: Tensor) -> Tensor:
        # TorchScript compiles only nn.MaxPool2d's call (a bare is_scripting() test skips the
        # rest).
        if torch.jit.is_scripting():
            return F.max_pool2d(input, 3, 2, 1)
        if _channels_last_applies(input):
            return _ChannelsLastMaxPool2d.apply(input, [3, 3], [2, 2], [1, 1])
        return F.max_pool2d(input, 3, 2, 1)


def _channels_last_applies(input: Tensor) -> bool:
    """An eager (not traced or compiled) call on a contiguous NCHW CPU tensor."""
    return (
        isinstance(input, Tensor)
        and input.device.type == "cpu"
        and input.dim() == 4
        and input.is_contiguous()
        and not input.is_contiguous(memory_format=torch.channels_last)
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )


class _NormReLUMaxPool(torch.autograd.Function):
    """``max_pool2d(relu(batch_norm(input)))`` with the batch's statistics, in one CPU op.

    ``forward(input, weight, bias, eps, (kernel_size, stride, padding), channels_last_output)
    -> (pooled, mean, invstd)``: input (B, C, H, W) contiguous NCHW or channels_last, weight and
    bias (C,); pooled (B, C, H_out, W_out), NCHW unless ``channels_last_output`` (channels_last
    inputs only), mean and invstd (C,) the batch's statistics (not differentiable). Saves the
    input, the pooled map, the argmaxes (uint8) and the statistics."""

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        weight: Tensor,
        bias: Tensor,
        eps: float,
        window: tuple[int, int, int],
        channels_last_output: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        pooled, positions, mean, invstd = torch.ops.involution_pool_cpu.norm_relu_max_pool(
            input, weight, bias, eps, *window, channels_last_output
        )
        ctx.save_for_backward(input, pooled, positions, mean, invstd, weight)
        ctx.window = window
        ctx.mark_non_differentiable(mean, invstd)
        return pooled, mean, invstd

    @staticmethod
    def backward(ctx, grad_pooled: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        input, pooled, positions, mean, invstd, weight = ctx.saved_tensors
        grad_input, grad_weight, grad_bias = (
            torch.ops.involution_pool_cpu.norm_relu_max_pool_backward(
                grad_pooled, input, pooled, positions, mean, invstd, weight, *ctx.window
            )
        )
        needs = ctx.needs_input_grad
        return (
            grad_input if needs[0] else None,
            grad_weight if needs[1] else None,
            grad_bias if needs[2] else None,
            None,
            None,
            None,
        )


def _square(value: int | tuple[int, ...]) -> int | None:
    """A pool argument's single value: an int, or a pair of equal ints; else ``None``."""
    if isinstance(value, int):
        return value
    return value[0] if len(value) == 2 and value[0] == value[1] else None


def norm_relu_max_pool_applies(norm: nn.Module, act: nn.Module, pool: nn.Module, x: Tensor) -> bool:
    """Whether :func:`norm_relu_max_pool` computes ``pool(act(norm(x)))``: ``norm`` a plain
    ``nn.BatchNorm2d`` using the batch's statistics (training), ``act`` ``nn.ReLU``, ``pool`` an
    ``nn.MaxPool2d`` (or :class:`StemMaxPool2d`) with square windows, no dilation, floor mode and
    no indices, no hooks on the three; ``x`` a float32 or float64 CPU tensor contiguous in NCHW
    or channels_last, without autocast, in eager mode (not scripted, traced or compiled: those
    see the modules), with the C++ extension built."""
    if not (
        batch_norm_relu(norm, act)
        and type(pool) in (nn.MaxPool2d, StemMaxPool2d)
        and _square(pool.dilation) == 1
        and None not in (_square(pool.kernel_size), _square(pool.stride), _square(pool.padding))
        and not (pool.ceil_mode or pool.return_indices)
        and not (pool._forward_hooks or pool._forward_pre_hooks)
    ):
        return False
    return (
        isinstance(x, Tensor)
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.float64)
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
        and not torch.is_autocast_enabled("cpu")
        and cpu.unavailable_reason(x.device) is None
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )


def norm_relu_max_pool(
    norm: nn.BatchNorm2d, pool: nn.MaxPool2d, x: Tensor, channels_last_output: bool | None = None
) -> Tensor:
    """``pool(relu(norm(x)))`` in one op, where :func:`norm_relu_max_pool_applies` (see the
    module docstring): the same values and gradients as the modules, ``norm``'s running
    statistics updated once. (B, C, H, W) -> (B, C, H_out, W_out), in ``x``'s layout, or
    NCHW from a channels_last ``x`` with ``channels_last_output=False``."""
    channels = x.shape[1]
    weight = norm.weight if norm.weight is not None else x.new_ones(channels)
    bias = norm.bias if norm.bias is not None else x.new_zeros(channels)
    channels_last = not x.is_contiguous()  # only channels_last, then (the applies check)
    if channels_last_output is None:
        channels_last_output = channels_last
    window = (_square(pool.kernel_size), _square(pool.stride), _square(pool.padding))
    pooled, mean, invstd = _NormReLUMaxPool.apply(
        x, weight.to(x.dtype), bias.to(x.dtype), norm.eps, window, channels_last_output
    )
    update_running_stats(norm, mean, invstd, x.numel() // channels)
    return pooled
