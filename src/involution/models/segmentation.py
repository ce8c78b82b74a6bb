"""Semantic segmentation on RedNet: Semantic FPN and UPerNet, as in the official Cityscapes table.

Models return what torchvision's segmentation models return: a dict with ``"out"``, the logits
at the input resolution, and ``"aux"``, the auxiliary head's logits (also at the input
resolution) whenever the model has an auxiliary head, so torchvision-style training code works
unchanged (mmseg weights the auxiliary loss by 0.4).

- Semantic FPN (Kirillov et al., Panoptic FPN's semantic branch; mmseg ``FPNHead``): RedNet
  C2..C5 -> FPN (256 channels; with ``involution_neck=True`` each 3x3 output conv is an
  involution, the official ``FPN_involution``) -> per level, 3x3 conv + BN + ReLU blocks each
  followed by a 2x bilinear upsampling until stride 4 (P2: 1 conv, P3: 1, P4: 2, P5: 3) ->
  sum -> dropout 0.1 -> 1x1 classifier.
- UPerNet (Xiao et al.; mmseg ``UPerHead``, 512 channels): pyramid pooling (scales 1, 2, 3, 6)
  on C5, 1x1 lateral convs on C2..C4, bilinear top-down pathway, 3x3 output convs, the four
  levels upsampled to stride 4 and concatenated, a 3x3 fusion conv, dropout 0.1, a 1x1
  classifier; auxiliary FCN head on C4 (one 3x3 conv to C4/4 = 256 channels).

Every conv of the heads is conv + BatchNorm + ReLU (torchvision's ``Conv2dNormActivation``).
The official training uses SyncBN with nothing frozen: under DDP, convert the model with
``torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)`` before wrapping it. The pyramid
pooling's 1x1 branch normalises one value per channel and image, so training needs a batch of
at least 2 per process (as in mmseg).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from os import PathLike
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet50
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

from involution.models.fpn import InvolutionFPN, rednet_backbone, rednet_feature_extractor
from involution.models.rednet import MODEL_DEPTHS, RedNet

__all__ = [
    "OFFICIAL_CITYSCAPES",
    "SEGMENTATION_MODELS",
    "PyramidPooling",
    "SegmentationModel",
    "SemanticFPNHead",
    "UPerHead",
    "semantic_fpn_rednet",
    "semantic_fpn_rednet50",
    "semantic_fpn_resnet50",
    "upernet_rednet",
    "upernet_rednet50",
    "upernet_resnet50",
]

#: Official Cityscapes table (d-li14/involution README): parameters (M, 19 classes, mmcv count
#: of all module parameters, auxiliary head included), GFLOPs (mmcv multiply-adds at
#: 1024x2048, auxiliary head not run) and val mIoU (%, crop 512x1024, 80k iterations).
OFFICIAL_CITYSCAPES: dict[str, dict[str, float]] = {
    "semantic_fpn_rednet50": {"params_m": 18.5, "gflops": 293.9, "miou": 78.0},
    "semantic_fpn_rednet50_involution_neck": {"params_m": 16.4, "gflops": 205.2, "miou": 79.1},
    "upernet_rednet50": {"params_m": 56.4, "gflops": 1825.6, "miou": 80.6},
}

#: Channels of ResNet-50's (and RedNet-50's) stages C2..C5.
_RESNET50_CHANNELS = (256, 512, 1024, 2048)


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize to ``size`` (mmseg and torchvision: ``align_corners=False``)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class SegmentationModel(nn.Module):
    """backbone -> optional neck -> decode head, plus an optional auxiliary head.

    Args:
        backbone: image -> ordered dict of feature maps, finest first (e.g.
            :func:`~involution.models.fpn.rednet_feature_extractor`).
        decode_head: list of feature maps (the neck's outputs, else the backbone's) -> logits.
        neck: ordered dict -> ordered dict (e.g. an FPN), or ``None``.
        aux_head: backbone feature ``aux_feature`` -> auxiliary logits, or ``None``.
        aux_feature: key of the backbone output the auxiliary head reads.

    Shape:
        (B, C, H, W) -> {"out": (B, num_classes, H, W)[, "aux": (B, num_classes, H, W)]}.
    """

    def __init__(
        self,
        backbone: nn.Module,
        decode_head: nn.Module,
        neck: nn.Module | None = None,
        aux_head: nn.Module | None = None,
        aux_feature: str = "c4",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.decode_head = decode_head
        self.aux_head = aux_head
        self.aux_feature = aux_feature

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        pyramid = features if self.neck is None else self.neck(features)
        result = {"out": _resize(self.decode_head(list(pyramid.values())), size)}
        if self.aux_head is not None:
            result["aux"] = _resize(self.aux_head(features[self.aux_feature]), size)
        return result


class SemanticFPNHead(nn.Module):
    """Panoptic FPN's semantic branch (mmseg ``FPNHead``) over pyramid levels of strides 4, 8, ...

    Level ``i`` (stride ``4 * 2**i``) goes through ``max(1, i)`` blocks of 3x3 conv + BN + ReLU,
    each block of a level ``i > 0`` followed by a bilinear upsampling to the next finer
    level's size (2x, exact for odd sizes too), so all levels reach stride 4; they are summed,
    then dropout and a 1x1 classifier.

    Shape:
        list of ``num_levels`` maps (B, in_channels, H_i, W_i), H_i ~ H_0 / 2**i ->
        logits (B, num_classes, H_0, W_0).
    """

    def __init__(
        self,
        in_channels: int,
        num_levels: int,
        channels: int,
        num_classes: int,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList(
            nn.ModuleList(
                Conv2dNormActivation(in_channels if block == 0 else channels, channels, 3)
                for block in range(max(1, level))
            )
            for level in range(num_levels)
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        if len(features) != len(self.scale_heads):
            raise ValueError(f"expected {len(self.scale_heads)} levels, got {len(features)}")
        output: Tensor | None = None
        for level, (blocks, x) in enumerate(zip(self.scale_heads, features, strict=True)):
            for block_index, block in enumerate(blocks):
                x = block(x)
                if level > 0:
                    x = _resize(x, features[level - 1 - block_index].shape[-2:])
            output = x if output is None else output + x
        return self.classifier(self.dropout(output))


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module: the input and its pooled-and-projected versions.

    For each scale s: adaptive average pool to s x s -> 1x1 conv + BN + ReLU to ``channels``
    -> bilinear upsampling to the input size; concatenated after the input.

    Shape:
        (B, in_channels, H, W) -> (B, in_channels + len(scales) * channels, H, W).
    """

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(scale), Conv2dNormActivation(in_channels, channels, 1)
            )
            for scale in scales
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        return torch.cat([x, *(_resize(branch(x), size) for branch in self.branches)], dim=1)


class UPerHead(nn.Module):
    """UPerNet's decode head (mmseg ``UPerHead``): pyramid pooling + FPN fusion.

    Shape:
        list of maps (B, in_channels_list[i], H_i, W_i), finest first ->
        logits (B, num_classes, H_0, W_0).
    """

    def __init__(
        self,
        in_channels_list: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        *finer, coarsest = in_channels_list
        self.ppm = PyramidPooling(coarsest, channels, pool_scales)
        self.ppm_bottleneck = Conv2dNormActivation(
            coarsest + len(pool_scales) * channels, channels, 3
        )
        self.lateral_convs = nn.ModuleList(Conv2dNormActivation(c, channels, 1) for c in finer)
        self.fpn_convs = nn.ModuleList(Conv2dNormActivation(channels, channels, 3) for _ in finer)
        self.fusion = Conv2dNormActivation(len(in_channels_list) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        if len(features) != len(self.lateral_convs) + 1:
            raise ValueError(f"expected {len(self.lateral_convs) + 1} levels, got {len(features)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features, strict=False)]
        laterals.append(self.ppm_bottleneck(self.ppm(features[-1])))
        for level in range(len(laterals) - 1, 0, -1):
            finer = laterals[level - 1]
            laterals[level - 1] = finer + _resize(laterals[level], finer.shape[-2:])
        outputs = [conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=False)]
        outputs.append(laterals[-1])
        size = outputs[0].shape[-2:]
        fused = self.fusion(torch.cat([outputs[0], *(_resize(x, size) for x in outputs[1:])], 1))
        return self.classifier(self.dropout(fused))


def _stage_channels(backbone: RedNet) -> list[int]:
    return [info["num_chs"] for info in backbone.feature_info[1:]]


def _semantic_fpn(
    backbone: nn.Module,
    stage_channels: Sequence[int],
    num_classes: int,
    involution_neck: bool,
    fpn_channels: int,
    head_channels: int,
) -> SegmentationModel:
    fpn = InvolutionFPN if involution_neck else FeaturePyramidNetwork
    return SegmentationModel(
        rednet_feature_extractor(backbone),
        neck=fpn(list(stage_channels), fpn_channels),
        decode_head=SemanticFPNHead(fpn_channels, len(stage_channels), head_channels, num_classes),
    )


def _upernet(
    backbone: nn.Module,
    stage_channels: Sequence[int],
    num_classes: int,
    aux_head: bool,
    head_channels: int,
    pool_scales: Sequence[int],
) -> SegmentationModel:
    # torchvision's FCNHead is mmseg's auxiliary FCNHead with num_convs=1: a 3x3 conv to
    # in_channels / 4 (1024 -> 256) + BN + ReLU, dropout 0.1, 1x1 classifier.
    return SegmentationModel(
        rednet_feature_extractor(backbone),
        decode_head=UPerHead(stage_channels, head_channels, num_classes, pool_scales),
        aux_head=FCNHead(stage_channels[2], num_classes) if aux_head else None,
        aux_feature="c4",
    )


def semantic_fpn_rednet(
    depth: int = 50,
    *,
    num_classes: int,
    involution_neck: bool = False,
    backbone_weights: str | PathLike | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    fpn_channels: int = 256,
    head_channels: int = 128,
) -> SegmentationModel:
    """Semantic FPN on the det/seg RedNet (stem involution kernel 7).

    Args:
        depth: RedNet depth (26, 38, 50, 101, 152).
        num_classes: classifier outputs (19 for Cityscapes).
        involution_neck: replace the FPN's 3x3 output convs by 7x7 involutions (official
            ``FPN_involution``); default: the conv neck.
        backbone_weights: RedNet checkpoint (official or converted), see
            :func:`~involution.models.fpn.load_backbone_weights`.
        backbone_kwargs: further :class:`~involution.models.rednet.RedNet` arguments, e.g.
            ``stage_widths``, ``stem_width``, ``layers``, ``norm_layer``, ``backend``.
        fpn_channels: FPN channels (a multiple of 16 for the involution neck).
        head_channels: channels of the semantic branch's conv blocks.

    Shape:
        (B, 3, H, W) -> {"out": (B, num_classes, H, W)}.
    """
    backbone = rednet_backbone(depth, weights=backbone_weights, **(backbone_kwargs or {}))
    return _semantic_fpn(
        backbone,
        _stage_channels(backbone),
        num_classes,
        involution_neck,
        fpn_channels,
        head_channels,
    )


def upernet_rednet(
    depth: int = 50,
    *,
    num_classes: int,
    aux_head: bool = True,
    backbone_weights: str | PathLike | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    head_channels: int = 512,
    pool_scales: Sequence[int] = (1, 2, 3, 6),
) -> SegmentationModel:
    """UPerNet on the det/seg RedNet, with an auxiliary FCN head on C4 (``aux_head=True``).

    Arguments as :func:`semantic_fpn_rednet`; ``head_channels`` is UPerHead's width (512) and
    ``pool_scales`` the pyramid pooling's output sizes.

    Shape:
        (B, 3, H, W) -> {"out": (B, num_classes, H, W), "aux": (B, num_classes, H, W)}
        ("aux" only with ``aux_head``).
    """
    backbone = rednet_backbone(depth, weights=backbone_weights, **(backbone_kwargs or {}))
    return _upernet(
        backbone, _stage_channels(backbone), num_classes, aux_head, head_channels, pool_scales
    )


def semantic_fpn_rednet50(*, num_classes: int, **kwargs: Any) -> SegmentationModel:
    """:func:`semantic_fpn_rednet` with depth 50 (18.46M parameters for 19 classes)."""
    return semantic_fpn_rednet(50, num_classes=num_classes, **kwargs)


def upernet_rednet50(
    *, num_classes: int, aux_head: bool = True, **kwargs: Any
) -> SegmentationModel:
    """:func:`upernet_rednet` with depth 50 (56.38M parameters with the aux head, 19 classes)."""
    return upernet_rednet(50, num_classes=num_classes, aux_head=aux_head, **kwargs)


def semantic_fpn_resnet50(
    *,
    num_classes: int,
    involution_neck: bool = False,
    backbone_weights: Any = None,
    fpn_channels: int = 256,
    head_channels: int = 128,
) -> SegmentationModel:
    """Baseline: :func:`semantic_fpn_rednet` on torchvision's ResNet-50.

    ``backbone_weights`` is passed to ``torchvision.models.resnet50(weights=...)`` (e.g.
    ``"IMAGENET1K_V2"``). torchvision's ResNet-50 has the one-conv 7x7 stem where mmseg's
    baseline (ResNetV1c) has three 3x3 convs.
    """
    return _semantic_fpn(
        resnet50(weights=backbone_weights),
        _RESNET50_CHANNELS,
        num_classes,
        involution_neck,
        fpn_channels,
        head_channels,
    )


def upernet_resnet50(
    *,
    num_classes: int,
    aux_head: bool = True,
    backbone_weights: Any = None,
    head_channels: int = 512,
    pool_scales: Sequence[int] = (1, 2, 3, 6),
) -> SegmentationModel:
    """Baseline: :func:`upernet_rednet` on torchvision's ResNet-50 (see
    :func:`semantic_fpn_resnet50`)."""
    return _upernet(
        resnet50(weights=backbone_weights),
        _RESNET50_CHANNELS,
        num_classes,
        aux_head,
        head_channels,
        pool_scales,
    )


#: Segmentation builders by name: ``SEGMENTATION_MODELS[name](num_classes=..., **kwargs)``.
#: ``semantic_fpn_rednetNN`` has the conv neck, ``..._involution_neck`` its involution twin.
SEGMENTATION_MODELS: dict[str, Callable[..., SegmentationModel]] = {
    **{f"semantic_fpn_rednet{d}": partial(semantic_fpn_rednet, d) for d in MODEL_DEPTHS},
    **{
        f"semantic_fpn_rednet{d}_involution_neck": partial(
            semantic_fpn_rednet, d, involution_neck=True
        )
        for d in MODEL_DEPTHS
    },
    **{f"upernet_rednet{d}": partial(upernet_rednet, d) for d in MODEL_DEPTHS},
    "semantic_fpn_resnet50": semantic_fpn_resnet50,
    "upernet_resnet50": upernet_resnet50,
}
