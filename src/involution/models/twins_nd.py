"""Small 1-D and 3-D classifiers built in pairs that differ only in their spatial mixers.

:func:`twin_net` stacks RedNet-style bottlenecks (1x1 reduce, BN, ReLU, *mixer*, BN, ReLU, 1x1
expand, BN, residual, ReLU) over sequences (``dims=1``) or volumes/clips (``dims=3``); the mixer
is an ``Involution1d``/``Involution3d`` or a convolution of the same kernel size
(:func:`mixer`), so an involution network and its convolution twin share every other layer.
The examples (``examples/sequential_fashion_1d.py``, ``examples/moving_fashion_3d.py``) train
such pairs with :mod:`involution.train.compare`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from involution.ops.modules_nd import Involution1d, Involution3d

__all__ = ["MIXERS", "Bottleneck", "mixer", "twin_net"]

#: Mixer kind -> what it is: the involution, a full convolution, a depthwise convolution.
MIXERS = ("involution", "conv", "depthwise")
_LAYERS = {
    1: (nn.Conv1d, nn.BatchNorm1d, Involution1d),
    3: (nn.Conv3d, nn.BatchNorm3d, Involution3d),
}


def mixer(
    kind: str, dims: int, channels: int, kernel: int | tuple[int, ...], group_channels: int = 16
) -> nn.Module:
    """The spatial mixer of a bottleneck: ``channels`` -> ``channels``, stride 1, same size.

    ``kind``: ``"involution"`` (``group_channels`` channels per group), ``"conv"`` (a dense
    convolution) or ``"depthwise"`` (a convolution with ``groups=channels``), of kernel
    ``kernel``.
    """
    conv, _, involution = _LAYERS[dims]
    if kind == "involution":
        return involution(channels, kernel, group_channels=group_channels)
    if kind not in MIXERS:
        raise ValueError(f"mixer must be one of {MIXERS}, got {kind!r}")
    sizes = (kernel,) * dims if isinstance(kernel, int) else tuple(kernel)
    groups = channels if kind == "depthwise" else 1
    return conv(
        channels, channels, sizes, padding=[k // 2 for k in sizes], groups=groups, bias=False
    )


class Bottleneck(nn.Module):
    """``relu(x + bn(expand(relu(bn(mix(relu(bn(reduce(x)))))))))``, RedNet's block in N-d.

    Shape: (B, C, *S) -> (B, C, *S); ``mix`` maps ``C // expansion`` channels to as many.
    """

    def __init__(self, channels: int, mix: nn.Module, dims: int, expansion: int = 2) -> None:
        super().__init__()
        conv, norm, _ = _LAYERS[dims]
        inner = channels // expansion
        self.reduce = nn.Sequential(conv(channels, inner, 1, bias=False), norm(inner), nn.ReLU())
        self.mix = nn.Sequential(mix, norm(inner), nn.ReLU())
        self.expand = nn.Sequential(conv(inner, channels, 1, bias=False), norm(channels))
        # Each block starts as the identity: the residual stream trains from the first step.
        nn.init.zeros_(self.expand[1].weight)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.expand(self.mix(self.reduce(x))))


def twin_net(
    dims: int,
    in_channels: int,
    widths: Sequence[int],
    stem: tuple[int | tuple[int, ...], int | tuple[int, ...]],
    make_mixer: Callable[[int], nn.Module],
    classes: int,
) -> nn.Sequential:
    """(B, in_channels, *S) -> (B, classes) logits.

    A stem conv (kernel, stride ``stem``) to ``widths[0]`` channels, then per width a bottleneck
    whose mixer is ``make_mixer(width // 2)``, with a strided 1x1 conv, BN and ReLU between
    stages (stride 2, or (1, 2, 2) in 3-D: the time axis is kept), global average pooling and a
    linear classifier.
    """
    conv, norm, _ = _LAYERS[dims]
    kernel, stride = stem
    kernels = (kernel,) * dims if isinstance(kernel, int) else tuple(kernel)
    layers: list[nn.Module] = [
        conv(in_channels, widths[0], kernels, stride, [k // 2 for k in kernels], bias=False),
        norm(widths[0]),
        nn.ReLU(),
    ]
    down = 2 if dims == 1 else (1, 2, 2)
    for index, width in enumerate(widths):
        if index > 0:
            layers += [conv(widths[index - 1], width, 1, down, bias=False), norm(width), nn.ReLU()]
        layers.append(Bottleneck(width, make_mixer(width // 2), dims))
    pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool3d(1)
    return nn.Sequential(*layers, pool, nn.Flatten(), nn.Linear(widths[-1], classes))
