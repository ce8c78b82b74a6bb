"""The kernel branch that the involution layers share (:class:`~involution.ops.Involution2d`,
:class:`~involution.ops.Involution1d`, :class:`~involution.ops.Involution3d`)."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from involution.ops.checks import check_kernel_branch

#: The kernel branch's layer classes of one dimensionality and its norm and activation
#: factories: (conv, average pool, norm_layer, act_layer), e.g. (nn.Conv2d, nn.AvgPool2d,
#: nn.BatchNorm2d, ReLU).
BranchLayers = tuple[type[nn.Module], type[nn.Module], Callable[[int], nn.Module], Callable]


class KernelBranchLayer(nn.Module):
    """Base of the involution layers: their hyper-parameters and the kernel branch ``pool``
    (average over the stride, ceil mode; identity at stride 1) -> ``reduce`` (1x1 conv, C ->
    C/r, no bias) -> ``norm`` -> ``act`` -> ``span`` (1x1 conv, C/r -> G*prod(K)), which turns
    (B, C, *S) features into (B, G*prod(K), *S_out) kernels."""

    def _init_kernel_branch(
        self,
        channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...],
        dilation: int | tuple[int, ...],
        group_channels: int,
        reduction_ratio: int,
        layers: BranchLayers,
        backend: str,
    ) -> None:
        """Checks the channel split and sets the hyper-parameters and the branch's layers; an
        int ``kernel_size`` is square (2-D), an int ``stride`` the same in every dimension."""
        check_kernel_branch(channels, group_channels, reduction_ratio)
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.group_channels = group_channels
        self.groups = channels // group_channels
        self.backend = backend
        conv, pool, norm_layer, act_layer = layers
        kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        strided = (stride if isinstance(stride, int) else max(stride)) > 1
        reduced = channels // reduction_ratio
        self.pool = pool(stride, stride, ceil_mode=True) if strided else nn.Identity()
        self.reduce = conv(channels, reduced, 1, bias=False)
        self.norm = norm_layer(reduced)
        self.act = act_layer()
        self.span = conv(reduced, self.groups * math.prod(kernel), 1)
