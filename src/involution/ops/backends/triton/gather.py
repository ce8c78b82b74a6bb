"""The ``"gather"`` Triton variant's launchers: one (batch, group) per program.

The kernels are in :mod:`~.kernels` (aggregation) and :mod:`~.fused` (aggregation with the
kernels generated on the fly); the set-up every launcher shares (sizes, result allocation, the
launch itself) in :mod:`~.launch`. Programs cover (batch, group, block of pixels[, block of
channels]). The features are made contiguous in their own memory format and the kernel tensor
contiguous (B, G, Kh, Kw, H_out, W_out), the layouts these kernels index.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from involution.ops.backends.triton import fused, kernels, launch
from involution.ops.backends.triton.launch import FusedProblem, Geometry, Sizes
from involution.ops.layout import Pair, memory_format_of

#: The kernel of each aggregation pass, and the constexprs that choose the pass.
KERNELS = {
    "forward": (kernels.aggregate_kernel, {"ADJOINT": False}),
    "backward_input": (kernels.aggregate_kernel, {"ADJOINT": True}),
    "backward_weight": (kernels.backward_weight_kernel, {}),
}


def _dense(tensor: Tensor) -> Tensor:
    """``tensor`` (B, C, H, W) contiguous in its own memory format."""
    return tensor.contiguous(memory_format=memory_format_of(tensor))


def _programs(sizes: Sizes, pixels: int, channel_blocks: bool, meta: dict) -> int:
    """(batch, group) pairs times blocks of ``pixels`` pixels, times blocks of the group's
    channels when ``channel_blocks``."""
    programs = sizes.batch * sizes.groups * launch.cdiv(pixels, meta["BLOCK_P"])
    return programs * (launch.cdiv(sizes.group_channels, meta["BLOCK_C"]) if channel_blocks else 1)


def _aggregate(
    pass_name: str, grad_output: Tensor | None, input: Tensor, weight: Tensor, geometry: Geometry
) -> Tensor:
    """Run the kernel of aggregation pass ``pass_name``; returns the tensor it wrote."""
    job = launch.Aggregation.of(pass_name, input, weight, grad_output)
    sizes, (rows, columns) = job.sizes, job.pixels
    kernel, constexprs = KERNELS[pass_name]
    return job.launch(
        kernel,
        lambda meta: _programs(sizes, rows * columns, job.split_channels, meta),
        (sizes.channels, sizes.groups, sizes.group_channels, *sizes.spatial),
        # The features' strides: the kernel tensor is contiguous, indexed without them.
        tuple(tensor for tensor in job.pointers if tensor.dim() == 4),
        geometry,
        **constexprs,
    )


def forward(input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair) -> Tensor:
    """Output (B, C, H_out, W_out) in the memory format of ``input`` (B, C, H, W)."""
    geometry = (stride, padding, dilation)
    return _aggregate("forward", None, _dense(input), weight.contiguous(), geometry)


def backward_input(
    grad_output: Tensor, input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair
) -> Tensor:
    """Gradient (B, C, H, W) with respect to ``input``, in its memory format."""
    geometry = (stride, padding, dilation)
    return _aggregate("backward_input", grad_output, input, weight.contiguous(), geometry)


def backward_weight(
    grad_output: Tensor, input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair
) -> Tensor:
    """Gradient (B, G, Kh, Kw, H_out, W_out) with respect to ``weight``."""
    geometry = (stride, padding, dilation)
    return _aggregate("backward_weight", grad_output, _dense(input), weight, geometry)


def fused_supported(dtype: torch.dtype, channels: int, groups: int, reduced: int) -> bool:
    """Whether :func:`fused_forward` handles this problem: every dtype but float64, which has
    no fast matrix-product path in Triton (the caller then materialises the kernels)."""
    return dtype != torch.float64


def fused_forward(problem: FusedProblem) -> Tensor:
    """Involution output (B, C, H_out, W_out), the kernels generated on the fly.

    The caller checks :func:`fused_supported` first.
    """
    sizes = problem.sizes
    reduced_channels = problem.reduced.shape[1]
    return replace(problem, input=_dense(problem.input)).launch(
        fused.fused_forward_kernel,
        lambda meta: _programs(sizes, sizes.out_h * sizes.out_w, False, meta),
        (sizes.channels, sizes.groups, sizes.group_channels, reduced_channels, *sizes.spatial),
        # tl.dot needs every tile dimension to be at least 16.
        KK_PAD=max(16, launch.pow2(sizes.kernel_h * sizes.kernel_w)),
    )
