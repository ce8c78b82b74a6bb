"""The official involution heads, as drop-in modules for torchvision's R-CNNs.

- :class:`InvolutionRPNHead`: torchvision's :class:`RPNHead` whose 3x3 conv is
  ``Involution2d(C, 7)`` + ReLU (the official ``RPNHead_involution``); the 1x1 objectness and
  box-delta convs stay.
- :class:`InvolutionMaskHead`: the mask head's four 3x3 conv + ReLU layers, each an
  ``Involution2d(C, 7)`` + ReLU without norm (the official ``FCNMaskHead_involution``); the
  deconv predictor (torchvision's ``MaskRCNNPredictor``) stays.

The box head of Faster/Mask R-CNN stays torchvision's ``TwoMLPHead`` (two shared FC layers of
1024, as the official configs).
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection.rpn import RPNHead

from involution.ops import Involution2d

__all__ = [
    "HEAD_KERNEL_SIZE",
    "InvolutionMaskHead",
    "InvolutionRPNHead",
    "init_involutions",
    "involution_relu",
]

#: K of the official involution heads.
HEAD_KERNEL_SIZE = 7


def init_involutions(module: nn.Module) -> nn.Module:
    """Initialise every ``Involution2d`` in ``module`` as RedNet initialises its own (and mmcv's
    ``ConvModule`` the official neck and heads): kaiming-normal (fan_out, ReLU) 1x1 convs, zero
    bias. Returns ``module``.

    This matters where involutions are stacked without a norm after them: through the four
    involution + ReLU layers of the mask head (training mode, 256 channels, 14x14) the
    activations' RMS grows 3.7x with this init, and 19x with PyTorch's default init.
    """
    for involution in module.modules():
        if isinstance(involution, Involution2d):
            for conv in (involution.reduce, involution.span):
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
    return module


def involution_relu(channels: int, kernel_size: int = HEAD_KERNEL_SIZE) -> nn.Sequential:
    """``Involution2d(channels, kernel_size)`` then ReLU: the layer of both involution heads,
    initialised by :func:`init_involutions`.

    Shape: (B, channels, H, W) -> (B, channels, H, W).
    """
    layer = nn.Sequential(Involution2d(channels, kernel_size), nn.ReLU(inplace=True))
    return init_involutions(layer)


class InvolutionRPNHead(RPNHead):
    """torchvision's RPN head with its shared 3x3 conv replaced by an involution + ReLU.

    Args:
        in_channels: channels of every FPN level (C).
        num_anchors: anchors per location (A).
        kernel_size: K of the involution (7, as the official head).

    Shape: list of (B, C, H_l, W_l) -> objectness [(B, A, H_l, W_l)] and box deltas
    [(B, 4A, H_l, W_l)].
    """

    def __init__(
        self, in_channels: int, num_anchors: int, kernel_size: int = HEAD_KERNEL_SIZE
    ) -> None:
        super().__init__(in_channels, num_anchors)
        self.conv = involution_relu(in_channels, kernel_size)


class InvolutionMaskHead(nn.Sequential):
    """``num_layers`` x (``Involution2d(C, K)`` + ReLU), no norm: the official involution mask
    head, in place of torchvision's ``MaskRCNNHeads`` (four 3x3 conv + ReLU layers).

    Shape: RoI features (R, C, S, S) -> (R, C, S, S); torchvision's ``MaskRCNNPredictor``
    then upsamples by 2 with its deconv.
    """

    def __init__(
        self, in_channels: int, num_layers: int = 4, kernel_size: int = HEAD_KERNEL_SIZE
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        super().__init__(*(involution_relu(in_channels, kernel_size) for _ in range(num_layers)))
