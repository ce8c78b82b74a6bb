"""What the official FLOP counts run through a detector, for ``involution profile``.

The official table's FLOPs come from mmcv's counter over mmdet's ``forward_dummy``: the
backbone and neck on one 1280x800 image, the dense heads on every level, and for two-stage
detectors the box head on 1000 RoIs and the mask head on the first 100 of them; no
pre-processing, anchors, RoIAlign, NMS or post-processing (those are data-dependent and mmcv
does not count them). :class:`DetectorComplexityView` runs exactly those parts of a
torchvision detector (the RoIAlign outputs are stand-in tensors of the right shape), so
:func:`involution.models.profile.profile_model` can count it on fake tensors.

:data:`OFFICIAL_FIGURES` holds the official table (80 COCO classes, 1x schedule).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, RetinaNet

from involution.models.detection.builders import DETECTION_MODELS

__all__ = ["OFFICIAL_FIGURES", "DetectorComplexityView", "OfficialFigures", "complexity_view"]


class OfficialFigures(NamedTuple):
    """One row of the official detection table (params counted by mmcv: trainable only)."""

    params_m: float
    gflops: float
    box_ap: float
    mask_ap: float | None = None


#: The official README's COCO table, by our registry names.
OFFICIAL_FIGURES: dict[str, OfficialFigures] = {
    "fasterrcnn_rednet50_fpn": OfficialFigures(31.6, 177.9, 39.5),
    "fasterrcnn_rednet50_fpn_inv_neck": OfficialFigures(29.5, 135.0, 40.2),
    "fasterrcnn_rednet50_fpn_inv_neck_head": OfficialFigures(29.0, 91.5, 39.2),
    "maskrcnn_rednet50_fpn": OfficialFigures(34.2, 224.2, 39.9, 35.7),
    "maskrcnn_rednet50_fpn_inv_neck": OfficialFigures(32.2, 181.3, 40.8, 36.4),
    "maskrcnn_rednet50_fpn_inv_neck_head": OfficialFigures(29.5, 104.6, 39.6, 35.1),
    "retinanet_rednet50_fpn": OfficialFigures(27.8, 210.1, 38.2),
    "retinanet_rednet50_fpn_inv_neck": OfficialFigures(26.3, 199.9, 38.2),
}

#: mmdet's ``forward_dummy``: RoIs through the box head, and the first 100 through the mask head.
DUMMY_BOX_ROIS = 1000
DUMMY_MASK_ROIS = 100


class DetectorComplexityView(nn.Module):
    """A torchvision RetinaNet / Faster R-CNN / Mask R-CNN, run as mmdet's ``forward_dummy``.

    The view shares the detector's modules (its parameters are the detector's, none copied)
    under one child per profile row: ``backbone`` (the body), ``neck`` (the FPN with its extra
    levels), then ``head`` (RetinaNet) or ``rpn_head``, ``box_head`` (torchvision's box head
    and predictor) and, for Mask R-CNN, ``mask_head`` (mask head and deconv predictor).

    Shape:
        images (B, 3, H, W) -> the outputs of the last head (for counting only).
    """

    def __init__(
        self,
        detector: nn.Module,
        box_rois: int = DUMMY_BOX_ROIS,
        mask_rois: int = DUMMY_MASK_ROIS,
    ) -> None:
        super().__init__()
        if not isinstance(detector, RetinaNet | FasterRCNN):
            raise TypeError(
                f"expected a torchvision RetinaNet, FasterRCNN or MaskRCNN, got {type(detector)}"
            )
        self.box_rois = box_rois
        self.mask_rois = mask_rois
        self.channels = detector.backbone.out_channels
        self.backbone = detector.backbone.body
        self.neck = detector.backbone.fpn
        if isinstance(detector, RetinaNet):
            self.head = detector.head
            return
        roi_heads = detector.roi_heads
        self.rpn_head = detector.rpn.head
        self.box_size = tuple(roi_heads.box_roi_pool.output_size)
        self.box_head = nn.Sequential(roi_heads.box_head, roi_heads.box_predictor)
        if roi_heads.has_mask():
            self.mask_size = tuple(roi_heads.mask_roi_pool.output_size)
            self.mask_head = nn.Sequential(roi_heads.mask_head, roi_heads.mask_predictor)

    def forward(self, images: Tensor) -> object:
        levels = list(self.neck(self.backbone(images)).values())
        if hasattr(self, "head"):
            return self.head(levels)
        self.rpn_head(levels)
        # RoIAlign outputs: not counted by mmcv, so stand-ins of the right shape suffice.
        outputs = self.box_head(images.new_zeros(self.box_rois, self.channels, *self.box_size))
        if hasattr(self, "mask_head"):
            mask_features = images.new_zeros(self.mask_rois, self.channels, *self.mask_size)
            outputs = self.mask_head(mask_features)
        return outputs


def complexity_view(name: str, **kwargs: Any) -> DetectorComplexityView:
    """The :class:`DetectorComplexityView` of ``DETECTION_MODELS[name](**kwargs)``."""
    return DetectorComplexityView(DETECTION_MODELS[name](**kwargs))
