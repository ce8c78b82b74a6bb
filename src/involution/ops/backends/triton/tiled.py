"""The ``"tiled"`` Triton variant's launchers: channel-vector tiles for bandwidth.

The kernels and their design are in :mod:`~.tiled_kernels`; the set-up every launcher shares
(sizes, result allocation, the launch itself) in :mod:`~.launch`. A program covers a tile of a
"tall image" of B * rows pixels times a block of channels, so the grid is tiles times channel
blocks. Inputs are read through their strides (NCHW or channels_last features, contiguous or
pixel-major kernels), without copies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from involution.ops.backends.triton import launch, tiled_kernels
from involution.ops.backends.triton.launch import FusedProblem, Geometry, Sizes
from involution.ops.layout import Pair

#: The kernel of each aggregation pass, and the constexprs that choose the pass.
KERNELS = {
    "forward": (tiled_kernels.aggregate_kernel, {"ADJOINT": False}),
    "backward_input": (tiled_kernels.aggregate_kernel, {"ADJOINT": True}),
    "backward_weight": (tiled_kernels.backward_weight_kernel, {}),
}
#: Largest reduced width the fused kernel holds in registers as one tl.dot operand.
FUSED_MAX_REDUCED = 256


def _programs(rows: int, columns: int, sizes: Sizes, split_groups: bool, meta: dict) -> int:
    """Tiles of the (rows, columns) pixel grid times channel blocks: blocks of GB groups, each
    group split into CC-wide chunks when ``split_groups``."""
    tiles = launch.cdiv(rows, meta["TILE_H"]) * launch.cdiv(columns, meta["TILE_W"])
    cc = min(launch.pow2(sizes.group_channels), meta["BLOCK_C"])
    blocks = launch.cdiv(sizes.groups, meta["BLOCK_C"] // cc)
    return tiles * blocks * (launch.cdiv(sizes.group_channels, cc) if split_groups else 1)


def _aggregate(
    pass_name: str, grad_output: Tensor | None, input: Tensor, weight: Tensor, geometry: Geometry
) -> Tensor:
    """Run the kernel of aggregation pass ``pass_name``; returns the tensor it wrote."""
    job = launch.Aggregation.of(pass_name, input, weight, grad_output)
    sizes, (rows, columns) = job.sizes, job.pixels
    rows *= sizes.batch  # the tall image
    kernel, constexprs = KERNELS[pass_name]
    return job.launch(
        kernel,
        lambda meta: _programs(rows, columns, sizes, job.split_channels, meta),
        (sizes.groups, sizes.group_channels, *sizes.spatial, rows),
        job.pointers,
        geometry,
        CGP=launch.pow2(sizes.group_channels),
        **constexprs,
    )


def forward(input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair) -> Tensor:
    """Output (B, C, H_out, W_out), in the memory format of ``input`` (B, C, H, W).

    ``input`` and ``weight`` (B, G, Kh, Kw, H_out, W_out) are read through their strides.
    """
    return _aggregate("forward", None, input, weight, (stride, padding, dilation))


def backward_input(
    grad_output: Tensor, input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair
) -> Tensor:
    """Gradient (B, C, H, W) with respect to ``input``, in its memory format."""
    return _aggregate("backward_input", grad_output, input, weight, (stride, padding, dilation))


def backward_weight(
    grad_output: Tensor, input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair
) -> Tensor:
    """Gradient (B, G, Kh, Kw, H_out, W_out) with respect to ``weight``, contiguous."""
    return _aggregate("backward_weight", grad_output, input, weight, (stride, padding, dilation))


def fused_supported(dtype: torch.dtype, channels: int, groups: int, reduced: int) -> bool:
    """Whether :func:`fused_forward` runs the fused kernel for this problem.

    It needs a dtype with a matrix-product path (not float64), the reduced width within
    :data:`FUSED_MAX_REDUCED`, and a tiling that holds whole groups (at most 16 per program).
    """
    cgp = launch.pow2(channels // groups)
    return (
        dtype != torch.float64
        and reduced <= FUSED_MAX_REDUCED
        and any(
            tiled_kernels.fused_block_fits(config.kwargs["BLOCK_C"], cgp)
            for config in tiled_kernels.FUSED_CONFIGS
        )
    )


def fused_forward(problem: FusedProblem) -> Tensor:
    """Involution output (B, C, H_out, W_out) with the kernels generated in the kernel.

    ``problem.input`` is read through its strides. The caller checks :func:`fused_supported`
    first.
    """
    sizes = problem.sizes
    rows, reduced_channels = sizes.batch * sizes.out_h, problem.reduced.shape[1]
    # The pruned tilings hold whole groups: a program covers BLOCK_C / CGP of them.
    return problem.launch(
        tiled_kernels.fused_forward_kernel,
        lambda meta: _programs(rows, sizes.out_w, sizes, False, meta),
        (sizes.groups, sizes.group_channels, reduced_channels, *sizes.spatial, rows),
        CGP=launch.pow2(sizes.group_channels),
        R_PAD=max(16, launch.pow2(reduced_channels)),
    )
