"""Pieces shared by the RedNet detection and segmentation models: backbone and FPN neck.

- :func:`rednet_backbone`: the det/seg RedNet of the official code (stem involution with
  kernel 7 instead of the classifier's 3, no classifier), optionally loaded from a checkpoint.
- :func:`rednet_feature_extractor`: the backbone's stage outputs C2..C5 as an ordered dict,
  through torchvision's ``IntermediateLayerGetter`` (as torchvision's detection and
  segmentation backbones do).
- :class:`InvolutionFPN`: torchvision's ``FeaturePyramidNetwork`` with each 3x3 output conv
  replaced by an involution, the official ``FPN_involution`` neck.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from involution.models.convert import check_state_dict, read_rednet_state_dict
from involution.models.rednet import MODEL_DEPTHS, RedNet
from involution.ops import Involution2d

__all__ = [
    "DETSEG_STEM_KERNEL_SIZE",
    "InvolutionFPN",
    "load_backbone_weights",
    "rednet_backbone",
    "rednet_feature_extractor",
]

#: Kernel size of the stem involution in the official det/seg backbones (classifier: 3).
DETSEG_STEM_KERNEL_SIZE = 7
#: The stem involution's span conv: K*K*G outputs, so it differs between a classification
#: checkpoint (K=3) and the det/seg backbone (K=7) (official issue #42).
_STEM_SPAN_KEYS = ("stem.inv.span.weight", "stem.inv.span.bias")


def rednet_backbone(
    depth: int = 50,
    *,
    weights: str | PathLike | None = None,
    frozen_bn: bool = False,
    **kwargs: Any,
) -> RedNet:
    """The det/seg RedNet: stem involution kernel 7, no classifier (``num_classes=0``).

    Args:
        depth: one of :data:`~involution.models.rednet.MODEL_DEPTHS` (26, 38, 50, 101, 152).
        weights: an official (mmcls) or converted RedNet checkpoint, loaded with
            :func:`load_backbone_weights`.
        frozen_bn: every BatchNorm (the involutions' kernel branches' included) is
            torchvision's ``FrozenBatchNorm2d``: statistics and affine fixed, nothing kept for
            backward, as in torchvision's ResNet-FPN backbones for a pretrained body. Not the
            official setting (``norm_eval``, whose affine weights still learn); exclusive with a
            ``norm_layer`` in ``kwargs``.
        kwargs: further :class:`~involution.models.rednet.RedNet` arguments; ``layers`` or
            ``stem_kernel_size`` given here override the depth's and the det/seg default.

    Shape:
        (B, in_chans, H, W) -> ``forward_features``: (B, 4 * stage_widths[-1], H / 32, W / 32).
    """
    if depth not in MODEL_DEPTHS:
        raise ValueError(f"depth must be one of {sorted(MODEL_DEPTHS)}, got {depth!r}")
    if "num_classes" in kwargs:
        raise ValueError("a det/seg backbone has no classifier: do not pass num_classes")
    if frozen_bn:
        if "norm_layer" in kwargs:
            raise ValueError("frozen_bn=True sets the norm layer: do not pass norm_layer")
        kwargs["norm_layer"] = FrozenBatchNorm2d
    arguments = {
        "layers": MODEL_DEPTHS[depth],
        "stem_kernel_size": DETSEG_STEM_KERNEL_SIZE,
        "global_pool": "",
        **kwargs,
    }
    backbone = RedNet.from_kwargs({**arguments, "num_classes": 0})
    if weights is not None:
        load_backbone_weights(backbone, weights)
    return backbone


def load_backbone_weights(backbone: RedNet, path: str | PathLike) -> RedNet:
    """Load a RedNet checkpoint (official mmcls ``.pth`` or converted) into a backbone.

    The classifier (``fc.*``) is dropped. The stem involution's span conv of an ImageNet
    checkpoint (kernel 3) does not fit the det/seg stem (kernel 7): it is left at its
    initialisation, which is what the official mmseg/mmdet training did (a non-strict load).
    One ``UserWarning`` names the keys left at their initialisation and the dropped ones.
    Every other key and shape must match, else
    :class:`~involution.models.convert.CheckpointMismatchError` lists the differences.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"backbone_weights {path} does not exist: expected an official RedNet checkpoint "
            "(mmcls .pth) or one converted by `involution convert` (.safetensors)"
        )
    state_dict = read_rednet_state_dict(path)
    dropped = [key for key in state_dict if key.startswith("fc.")]
    state_dict = {key: value for key, value in state_dict.items() if key not in dropped}
    expected = backbone.state_dict()
    # A backbone with FrozenBatchNorm2d has no BN step counters: they are not weights.
    state_dict = {
        key: value
        for key, value in state_dict.items()
        if key in expected or not key.endswith(".num_batches_tracked")
    }
    kept_init = [
        key
        for key in _STEM_SPAN_KEYS
        if key in state_dict and key in expected and state_dict[key].shape != expected[key].shape
    ]
    for key in kept_init:
        state_dict[key] = expected[key]
    check_state_dict(state_dict, expected)
    backbone.load_state_dict(state_dict)
    notes = []  # one warning naming every key not loaded and every classifier key dropped
    if kept_init:
        notes.append(
            "the checkpoint's stem involution has another kernel size than the backbone's "
            f"({backbone.stem.inv.kernel_size}); {', '.join(kept_init)} keep their "
            "initialisation (as in the official det/seg training)"
        )
    if dropped:
        notes.append(f"classifier keys dropped: {', '.join(dropped)}")
    if notes:
        warnings.warn(f"{path}: {'; '.join(notes)}", UserWarning, stacklevel=2)
    return backbone


def rednet_feature_extractor(
    backbone: nn.Module, returned_layers: Sequence[int] = (1, 2, 3, 4)
) -> IntermediateLayerGetter:
    """The outputs of ``backbone.layer<i>`` for each i in ``returned_layers``, keyed ``"c<i+1>"``.

    Works for any network whose children run in forward order and are named ``layer1`` ..
    ``layer4`` (RedNet, torchvision's ResNets). Children after the last returned stage
    (pooling, classifier) are dropped.

    Shape:
        (B, 3, H, W) -> {"c2": (B, C2, H/4, W/4), "c3": (.., H/8, ..), "c4": (.., H/16, ..),
        "c5": (.., H/32, ..)} for the default ``returned_layers`` (ceil division).
    """
    if not returned_layers or any(i not in (1, 2, 3, 4) for i in returned_layers):
        raise ValueError(
            f"returned_layers must be a non-empty subset of 1..4, got {returned_layers}"
        )
    return IntermediateLayerGetter(
        backbone, return_layers={f"layer{i}": f"c{i + 1}" for i in returned_layers}
    )


class InvolutionFPN(FeaturePyramidNetwork):
    """torchvision's FPN with each 3x3 output conv replaced by ``Involution2d(out_channels, K)``.

    This is the official ``FPN_involution`` neck: the 1x1 lateral convs and the nearest-neighbour
    top-down pathway stay; each level's output conv becomes an involution with 16 channels per
    group and reduction 4 (no norm or activation after it). ``extra_blocks`` (e.g. RetinaNet's
    P6/P7 convs) are unchanged.

    Shape:
        ordered dict of (B, in_channels_list[i], H_i, W_i) -> the same keys with
        (B, out_channels, H_i, W_i) (plus the ``extra_blocks``' levels).
    """

    def __init__(
        self,
        in_channels_list: list[int],
        out_channels: int,
        extra_blocks: ExtraFPNBlock | None = None,
        kernel_size: int = 7,
        group_channels: int = 16,
        reduction_ratio: int = 4,
    ) -> None:
        super().__init__(in_channels_list, out_channels, extra_blocks=extra_blocks)
        self.layer_blocks = nn.ModuleList(
            Involution2d(
                out_channels,
                kernel_size,
                group_channels=group_channels,
                reduction_ratio=reduction_ratio,
            )
            for _ in in_channels_list
        )
