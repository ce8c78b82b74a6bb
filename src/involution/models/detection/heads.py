"""The official involution heads, as drop-in modules for torchvision's R-CNNs.

- :class:`InvolutionRPNHead`: torchvision's :class:`RPNHead` whose 3x3 conv is
  ``Involution2d(C, 7)`` + ReLU (the official ``RPNHead_involution``); the 1x1 objectness and
  box-delta convs stay.
- :class:`InvolutionMaskHead`: the mask head's four 3x3 conv + ReLU layers, each an
  ``Involution2d(C, 7)`` + ReLU without norm (the official ``FCNMaskHead_involution``); the
  deconv predictor (torchvision's ``MaskRCNNPredictor``) stays. Its involutions start as the
  identity (:func:`init_identity_involutions`), not as the official ones do.

The box head of Faster/Mask R-CNN stays torchvision's ``TwoMLPHead`` (two shared FC layers of
1024, as the official configs).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.rpn import RPNHead

from involution.ops import Involution2d

__all__ = [
    "HEAD_KERNEL_SIZE",
    "InvolutionMaskHead",
    "InvolutionRPNHead",
    "init_identity_involutions",
    "init_involutions",
    "involution_relu",
]

#: K of the official involution heads.
HEAD_KERNEL_SIZE = 7


def init_involutions(module: nn.Module) -> nn.Module:
    """Initialise every ``Involution2d`` in ``module`` as RedNet initialises its own (and mmcv's
    ``ConvModule`` the official neck and heads): kaiming-normal (fan_out, ReLU) 1x1 convs, zero
    bias. Returns ``module``.

    Stacked without a norm after them, involutions so initialised blow up: see
    :func:`init_identity_involutions`.
    """
    for involution in module.modules():
        if isinstance(involution, Involution2d):
            for conv in (involution.reduce, involution.span):
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
    return module


def init_identity_involutions(module: nn.Module) -> nn.Module:
    """Start every ``Involution2d`` in ``module`` as the identity map; returns ``module``.

    Each generated kernel is ``span(relu(norm(reduce(x))))``: this zeroes the span conv's
    weight and sets its bias to a Dirac kernel (1 at the centre tap of every group), so at
    first every pixel's kernel is that Dirac and the layer returns its input. The
    pixel-dependent part of the kernels grows from zero as the span weight trains (its gradient
    is not zero: the kernel branch's features are); ``reduce`` and ``norm`` keep
    :func:`init_involutions`' init.

    Why: an involution's kernels are generated from the features they aggregate, so the layer
    is quadratic in its input (its norm only fixes the kernels' overall scale): pixels with
    large features get large kernels. Four of them stacked with no norm after them (the
    official mask head) compound that; with :func:`init_involutions` (the official and
    torchvision's init) the activations of the ``scenes_mask`` recipe's first RoIs grow from
    RMS 8 to 7,700-16,000 through the four layers, the first mask loss is 680 (BCE of mask
    logits of RMS 27,000) and the gradient norm 141,000, so clipping it to 5 stalls every other
    layer for tens of steps. Kernels of half that spread still grow them 26-150x (4 seeds).
    The identity start keeps them at RMS 6: the recipe's first 50 steps average a loss of
    3.2-3.5 (conv head 3.2-3.8, official init 330-700) and it ends at mask AP 0.470 (0.225).
    """
    for involution in module.modules():
        if isinstance(involution, Involution2d):
            span = involution.span
            nn.init.zeros_(span.weight)
            with torch.no_grad():
                taps = span.bias.view(involution.groups, involution.kernel_size**2)
                taps.zero_()
                taps[:, taps.shape[1] // 2] = 1.0
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
    head, in place of torchvision's ``MaskRCNNHeads`` (four 3x3 conv + ReLU layers). Its
    involutions start as the identity (:func:`init_identity_involutions`).

    Shape: RoI features (R, C, S, S) -> (R, C, S, S); torchvision's ``MaskRCNNPredictor``
    then upsamples by 2 with its deconv.
    """

    def __init__(
        self, in_channels: int, num_layers: int = 4, kernel_size: int = HEAD_KERNEL_SIZE
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        super().__init__(*(involution_relu(in_channels, kernel_size) for _ in range(num_layers)))
        init_identity_involutions(self)
