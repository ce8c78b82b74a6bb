"""RedNet detectors on torchvision's RetinaNet, Faster R-CNN and Mask R-CNN.

- :mod:`~involution.models.detection.backbone`: RedNet (K = 7 stem) + torchvision FPN or the
  involution neck, frozen stages and BN statistics, P6/P7 from C5;
- :mod:`~involution.models.detection.heads`: the involution RPN and mask heads;
- :mod:`~involution.models.detection.builders`: the detector builders and
  :data:`DETECTION_MODELS`;
- :mod:`~involution.models.detection.complexity`: what mmdet's FLOP counter runs, for
  ``involution profile``.
"""

from involution.models.detection.backbone import (
    LastLevelP6P7FromC5,
    RedNetBackboneWithFPN,
    rednet_fpn_backbone,
)
from involution.models.detection.builders import (
    DETECTION_MODELS,
    fasterrcnn_rednet50_fpn,
    fasterrcnn_rednet_fpn,
    maskrcnn_rednet50_fpn,
    maskrcnn_rednet_fpn,
    retinanet_rednet50_fpn,
    retinanet_rednet_fpn,
)
from involution.models.detection.heads import InvolutionMaskHead, InvolutionRPNHead

__all__ = [
    "DETECTION_MODELS",
    "InvolutionMaskHead",
    "InvolutionRPNHead",
    "LastLevelP6P7FromC5",
    "RedNetBackboneWithFPN",
    "fasterrcnn_rednet50_fpn",
    "fasterrcnn_rednet_fpn",
    "maskrcnn_rednet50_fpn",
    "maskrcnn_rednet_fpn",
    "rednet_fpn_backbone",
    "retinanet_rednet50_fpn",
    "retinanet_rednet_fpn",
]
