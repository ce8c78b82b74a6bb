"""The deep stem's 3x3 / 2 max pool, with ATen's slow CPU NCHW forward taken in channels_last.

On CPU, ATen's max pool forward is far slower on NCHW tensors than on channels_last ones: 20-24
vs 1.3-1.6 ms for RedNet-50's stem output at batch 8 (8 x 64 x 112 x 112, float32, 2 threads),
while copying that map to channels_last takes 3-7 ms. :class:`StemMaxPool2d` therefore pools an
NCHW CPU input through a channels_last copy and returns NCHW outputs. Its backward is ATen's NCHW
one (about 2 ms there) from the same indices, flat ``h * W + w`` offsets within each channel's
plane in either layout, so the input's gradient comes out NCHW without a copy back: the same
values, indices and gradients as ``nn.MaxPool2d``, ties included.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StemMaxPool2d"]


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
