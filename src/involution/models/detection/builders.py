"""Detector builders: RedNet-FPN RetinaNet, Faster R-CNN and Mask R-CNN, as torchvision classes.

Each builder assembles a backbone (:func:`rednet_fpn_backbone`) and returns torchvision's own
:class:`RetinaNet`, :class:`FasterRCNN` or :class:`MaskRCNN`, so torchvision's transforms,
anchors, losses, NMS and post-processing apply unchanged; ``**detector_kwargs`` go to that class
(``min_size``, ``max_size``, ``box_detections_per_img``, ``rpn_anchor_generator``, ...).

``num_classes`` follows torchvision for every detector: labels are 1..N and index 0 is the
background, so COCO's 80 classes give ``num_classes=81`` (RetinaNet too: its sigmoid classifier
then has one unused output, where mmdet's has exactly N).

The official variants (``../shared/official-downstream.md``):

- ``involution_neck``: every 3x3 FPN output conv -> ``Involution2d(256, 7)``;
- ``involution_head`` (R-CNNs only): the RPN's 3x3 conv -> ``Involution2d(256, 7)`` + ReLU and,
  for Mask R-CNN, the mask head's four 3x3 convs -> ``Involution2d(256, 7)`` + ReLU; the box head
  stays torchvision's ``TwoMLPHead`` (two shared FC layers of 1024).

:data:`DETECTION_MODELS` maps names to builders: every RedNet depth and variant, and the
torchvision ResNet-50 FPN baselines (random init, torchvision's ``resnet_fpn_backbone`` with the
same returned levels, extra levels, frozen stages and detector as ours).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from os import PathLike
from typing import Any

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

from involution.models.detection.backbone import (
    LastLevelP6P7FromC5,
    RedNetBackboneWithFPN,
)
from involution.models.detection.heads import InvolutionMaskHead, InvolutionRPNHead
from involution.models.fpn import rednet_backbone
from involution.models.rednet import MODEL_DEPTHS

__all__ = [
    "DETECTION_MODELS",
    "fasterrcnn_rednet50_fpn",
    "fasterrcnn_rednet_fpn",
    "fasterrcnn_resnet50_fpn",
    "maskrcnn_rednet50_fpn",
    "maskrcnn_rednet_fpn",
    "maskrcnn_resnet50_fpn",
    "retinanet_rednet50_fpn",
    "retinanet_rednet_fpn",
    "retinanet_resnet50_fpn",
    "use_involution_heads",
]

#: The RetinaNet FPN starts at C3 (P2 would give too many anchors); the R-CNNs' at C2.
RETINANET_LAYERS = (2, 3, 4)
RCNN_LAYERS = (1, 2, 3, 4)
#: Detector arguments that ``involution_head=True`` builds itself.
_HEAD_KWARGS = ("rpn_head", "mask_head")


def retinanet_rednet_fpn(depth: int = 50, *, num_classes: int, **kwargs: Any) -> RetinaNet:
    """RetinaNet with a RedNet-``depth`` FPN backbone: P3-P5 from C3-C5, P6 from C5, P7.

    ``involution_head`` exists only to refuse it: the official work has no RetinaNet with an
    involution head. The arguments are :func:`fasterrcnn_rednet_fpn`'s (and torchvision's
    ``RetinaNet``); see :func:`rednet_fpn_backbone` and the module docstring.
    """
    return _rednet_fpn_detector(RetinaNet, depth, num_classes=num_classes, **kwargs)


def use_involution_heads(model: FasterRCNN) -> FasterRCNN:
    """Give a Faster/Mask R-CNN the official involution heads, in place; returns ``model``.

    The RPN head becomes :class:`InvolutionRPNHead` (same anchors per location) and a mask
    head, if any, :class:`InvolutionMaskHead` with as many layers as it had. The involution
    mask head keeps the FPN's width (torchvision's conv head outputs 256 channels whatever its
    input), so with ``fpn_channels != 256`` the deconv predictor is rebuilt for that width.
    """
    channels = model.backbone.out_channels
    num_anchors = model.rpn.head.cls_logits.out_channels
    model.rpn.head = InvolutionRPNHead(channels, num_anchors)
    roi_heads = model.roi_heads
    if roi_heads.has_mask():
        roi_heads.mask_head = InvolutionMaskHead(channels, len(roi_heads.mask_head))
        predictor = roi_heads.mask_predictor
        if predictor.conv5_mask.in_channels != channels:
            roi_heads.mask_predictor = MaskRCNNPredictor(
                channels, predictor.conv5_mask.out_channels, predictor.mask_fcn_logits.out_channels
            )
    return model


def _rednet_fpn_detector(
    detector: type[RetinaNet | FasterRCNN],
    depth: int = 50,
    *,
    num_classes: int,
    involution_neck: bool = False,
    involution_head: bool = False,
    backbone_weights: str | PathLike | None = None,
    trainable_stages: int = 3,
    norm_eval: bool = True,
    backbone_kwargs: Mapping[str, Any] | None = None,
    fpn_channels: int = 256,
    **detector_kwargs: Any,
) -> RetinaNet | FasterRCNN:
    """``detector`` (RetinaNet, Faster or Mask R-CNN) on a RedNet-FPN backbone; RetinaNet's FPN
    is C3-C5 + P6/P7 from C5, the R-CNNs' C2-C5 + max-pooled P6. ``detector_kwargs`` go to the
    detector class."""
    retina = issubclass(detector, RetinaNet)
    if involution_head and retina:
        raise ValueError(
            "RetinaNet has no involution-head variant (the official work replaces only its "
            "neck): use involution_neck=True, or Faster/Mask R-CNN for an involution head"
        )
    conflicts = [key for key in _HEAD_KWARGS if detector_kwargs.get(key) is not None]
    if involution_head and conflicts:
        raise ValueError(f"involution_head=True builds the heads itself; do not pass {conflicts}")
    rednet = rednet_backbone(depth, weights=backbone_weights, **(backbone_kwargs or {}))
    # RetinaNet's P6/P7 come from C5, whose width only the built RedNet knows.
    c5_channels = rednet.feature_info[-1]["num_chs"]
    backbone = RedNetBackboneWithFPN(
        rednet,
        returned_layers=RETINANET_LAYERS if retina else RCNN_LAYERS,
        out_channels=fpn_channels,
        extra_blocks=LastLevelP6P7FromC5(c5_channels, fpn_channels) if retina else None,
        trainable_stages=trainable_stages,
        norm_eval=norm_eval,
        involution_neck=involution_neck,
    )
    model = detector(backbone, num_classes=num_classes, **detector_kwargs)
    return use_involution_heads(model) if involution_head else model


def fasterrcnn_rednet_fpn(depth: int = 50, *, num_classes: int, **kwargs: Any) -> FasterRCNN:
    """Faster R-CNN with a RedNet-``depth`` FPN backbone; see the module docstring (keyword
    arguments: ``involution_neck``, ``involution_head``, ``backbone_weights``,
    ``trainable_stages``, ``norm_eval``, ``backbone_kwargs``, ``fpn_channels`` and
    torchvision's ``FasterRCNN`` arguments)."""
    return _rednet_fpn_detector(FasterRCNN, depth, num_classes=num_classes, **kwargs)


def maskrcnn_rednet_fpn(depth: int = 50, *, num_classes: int, **kwargs: Any) -> MaskRCNN:
    """Mask R-CNN with a RedNet-``depth`` FPN backbone; the arguments are
    :func:`fasterrcnn_rednet_fpn`'s (and torchvision's ``MaskRCNN``)."""
    return _rednet_fpn_detector(MaskRCNN, depth, num_classes=num_classes, **kwargs)


def retinanet_rednet50_fpn(**kwargs: Any) -> RetinaNet:
    """:func:`retinanet_rednet_fpn` with depth 50."""
    return retinanet_rednet_fpn(50, **kwargs)


def fasterrcnn_rednet50_fpn(**kwargs: Any) -> FasterRCNN:
    """:func:`fasterrcnn_rednet_fpn` with depth 50."""
    return fasterrcnn_rednet_fpn(50, **kwargs)


def maskrcnn_rednet50_fpn(**kwargs: Any) -> MaskRCNN:
    """:func:`maskrcnn_rednet_fpn` with depth 50."""
    return maskrcnn_rednet_fpn(50, **kwargs)


# The torchvision ResNet-50 baselines: torchvision's ResNet-50 FPN backbone (FrozenBatchNorm2d,
# random init), with the same levels, frozen stages and detector as the RedNet builders.


def retinanet_resnet50_fpn(
    *, num_classes: int, trainable_stages: int = 3, **detector_kwargs: Any
) -> RetinaNet:
    """torchvision's ResNet-50 FPN RetinaNet, random init, P6 from C5 as ours (torchvision v2's
    choice; its v1 takes P6 from P5) with the plain (v1, no GroupNorm) head."""
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50",
        weights=None,
        trainable_layers=trainable_stages,
        returned_layers=list(RETINANET_LAYERS),
        extra_blocks=LastLevelP6P7FromC5(2048, 256),
    )
    return RetinaNet(backbone, num_classes, **detector_kwargs)


def _rcnn_resnet50_fpn(
    detector: type[FasterRCNN], *, num_classes: int, trainable_stages: int, **detector_kwargs: Any
) -> FasterRCNN:
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50",
        weights=None,
        trainable_layers=trainable_stages,
        returned_layers=list(RCNN_LAYERS),
    )
    return detector(backbone, num_classes=num_classes, **detector_kwargs)


def fasterrcnn_resnet50_fpn(
    *, num_classes: int, trainable_stages: int = 3, **detector_kwargs: Any
) -> FasterRCNN:
    """torchvision's ResNet-50 FPN Faster R-CNN (v1), random init, 3 trainable stages."""
    return _rcnn_resnet50_fpn(
        FasterRCNN, num_classes=num_classes, trainable_stages=trainable_stages, **detector_kwargs
    )


def maskrcnn_resnet50_fpn(
    *, num_classes: int, trainable_stages: int = 3, **detector_kwargs: Any
) -> MaskRCNN:
    """torchvision's ResNet-50 FPN Mask R-CNN (v1), random init, 3 trainable stages."""
    return _rcnn_resnet50_fpn(
        MaskRCNN, num_classes=num_classes, trainable_stages=trainable_stages, **detector_kwargs
    )


def _registry() -> dict[str, Callable[..., nn.Module]]:
    """``{detector}_rednet{depth}_fpn[_inv_neck[_head]]`` for every depth, then the baselines."""
    variants: dict[str, dict[str, bool]] = {
        "": {},
        "_inv_neck": {"involution_neck": True},
        "_inv_neck_head": {"involution_neck": True, "involution_head": True},
    }
    builders: dict[str, Callable[..., nn.Module]] = {
        "retinanet": retinanet_rednet_fpn,
        "fasterrcnn": fasterrcnn_rednet_fpn,
        "maskrcnn": maskrcnn_rednet_fpn,
    }
    registry: dict[str, Callable[..., nn.Module]] = {}
    for detector, builder in builders.items():
        for depth in MODEL_DEPTHS:
            for suffix, flags in variants.items():
                if detector == "retinanet" and flags.get("involution_head"):
                    continue
                registry[f"{detector}_rednet{depth}_fpn{suffix}"] = partial(builder, depth, **flags)
    registry["retinanet_resnet50_fpn"] = retinanet_resnet50_fpn
    registry["fasterrcnn_resnet50_fpn"] = fasterrcnn_resnet50_fpn
    registry["maskrcnn_resnet50_fpn"] = maskrcnn_resnet50_fpn
    return registry


#: Name -> builder (call with ``num_classes=...`` and any detector keyword arguments).
DETECTION_MODELS: dict[str, Callable[..., nn.Module]] = _registry()
