"""``Involution1d`` and ``Involution3d``: :class:`~involution.ops.Involution2d` over sequences and
volumes (or clips), with the same kernel branch and the N-d op (:mod:`involution.ops.nd`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from involution.ops.branch import KernelBranchLayer
from involution.ops.modules import relu_inplace
from involution.ops.nd import as_tuple, involution1d, involution3d
from involution.ops.regenerate import recompute_layer

# FX symbolic tracing records each call of the front doors as one node.
torch.fx.wrap("involution1d")
torch.fx.wrap("involution3d")

_LAYERS = {
    1: (nn.Conv1d, nn.BatchNorm1d, nn.AvgPool1d),
    3: (nn.Conv3d, nn.BatchNorm3d, nn.AvgPool3d),
}


class _InvolutionNd(KernelBranchLayer):
    """The kernel branch and the aggregation of a ``dims``-D involution layer."""

    dims: int
    #: In training with gradients, keep only the input for backward and recompute the layer
    #: there (:func:`~involution.ops.regenerate.recompute_layer`), in eager mode; ``False``
    #: keeps the kernels. A class attribute, as :class:`~involution.ops.Involution2d`'s.
    regenerate_kernels: bool = True

    def __init__(
        self,
        channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        dilation: int | tuple[int, ...] = 1,
        group_channels: int = 16,
        reduction_ratio: int = 4,
        norm_layer: Callable[[int], nn.Module] | None = None,
        act_layer: Callable[[], nn.Module] = relu_inplace,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        dims = self.dims
        conv, norm, pool = _LAYERS[dims]
        kernel = as_tuple("kernel_size", kernel_size, dims)
        strides = as_tuple("stride", stride, dims)
        dilations = as_tuple("dilation", dilation, dims)
        for name, values in (
            ("kernel_size", kernel),
            ("stride", strides),
            ("dilation", dilations),
            ("channels", (channels,)),
            ("group_channels", (group_channels,)),
            ("reduction_ratio", (reduction_ratio,)),
        ):
            if min(values) < 1 or any(isinstance(v, bool) for v in values):
                raise ValueError(f"{name} must be positive ints, got {values}")
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(
                f"kernel_size must be odd in every dimension, got {kernel}; for even kernels "
                f"call involution.involution{dims}d with an explicit padding"
            )
        layers = (conv, pool, norm if norm_layer is None else norm_layer, act_layer)
        args = (channels, kernel, strides, dilations, group_channels, reduction_ratio)
        self._init_kernel_branch(*args, layers, backend)

    def forward(self, x: Tensor) -> Tensor:
        # TorchScript and FX record the layer as it is; under torch.compile the partitioner
        # decides what is kept. Two ifs: TorchScript skips a block only on a bare test.
        if not torch.jit.is_scripting():  # noqa: SIM102
            if not isinstance(x, torch.fx.Proxy) and self.training_recomputes():
                return recompute_layer(self, self.forward_kept, x)
        return self.forward_kept(x)

    def training_recomputes(self) -> bool:
        """Whether a call now keeps only the input for backward: training with gradients,
        ``regenerate_kernels`` on, eager mode, no hooks on the kernel branch's modules (they
        expect one call each)."""
        submodules = (self.pool, self.reduce, self.norm, self.act, self.span)
        return (
            self.regenerate_kernels
            and self.training
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and not any(m._forward_hooks or m._forward_pre_hooks for m in submodules)
        )

    def forward_kept(self, x: Tensor) -> Tensor:
        """The kernel branch, then the op: autograd keeps the kernels."""
        raise NotImplementedError

    def generate_kernels(self, x: Tensor) -> Tensor:
        """Per-position kernels (B, G, *K, *S_out) for ``x`` (B, C, *S)."""
        kernels = self.span(self.act(self.norm(self.reduce(self.pool(x)))))
        shape = [self.groups]
        shape.extend(self.kernel_size)  # TorchScript has no starred lists
        return kernels.unflatten(1, shape)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"dilation={self.dilation}, groups={self.groups}, backend={self.backend!r}"
        )


class Involution3d(_InvolutionNd):
    r"""3-D involution layer: :class:`~involution.ops.Involution2d` over volumes or clips.

    For every output voxel a kernel per group is generated from that voxel's features (average
    pooled by the stride, ceil mode), ``H = W_1 relu(BN(W_0 x))`` with 1x1x1 convs
    ``W_0: C -> C/r`` and ``W_1: C/r -> G*Kd*Kh*Kw``, and shared by the ``group_channels``
    channels of its group (:func:`~involution.ops.nd.involution3d`).

    Args:
        channels: C, input and output channels.
        kernel_size: int or (Kd, Kh, Kw), odd, e.g. (3, 7, 7).
        stride: int or a triple; output size ``ceil(size / stride)`` per dimension.
        dilation: int or a triple; padding is ``dilation * (K - 1) // 2``.
        group_channels: channels sharing one kernel (16); ``G = C // group_channels``.
        reduction_ratio: r (4).
        norm_layer, act_layer: kernel-branch factories (BatchNorm3d, in-place ReLU).
        backend: see :func:`~involution.ops.nd.involution3d`.

    Shape:
        (B, C, D, H, W) -> (B, C, ceil(D / sd), ceil(H / sh), ceil(W / sw)).
    """

    dims = 3

    def forward_kept(self, x: Tensor) -> Tensor:
        kernels = self.generate_kernels(x)
        return involution3d(x, kernels, self.stride, None, self.dilation, self.backend)


class Involution1d(_InvolutionNd):
    r"""1-D involution layer: :class:`Involution3d` over sequences (kernel branch with
    Conv1d/BatchNorm1d/AvgPool1d, :func:`~involution.ops.nd.involution1d`).

    Args:
        channels, kernel_size (odd int), stride, dilation, group_channels, reduction_ratio,
        norm_layer (BatchNorm1d), act_layer, backend: as in :class:`Involution3d`.

    Shape:
        (B, C, L) -> (B, C, ceil(L / stride)).
    """

    dims = 1

    def forward_kept(self, x: Tensor) -> Tensor:
        kernels = self.generate_kernels(x)
        return involution1d(x, kernels, self.stride[0], None, self.dilation[0], self.backend)
