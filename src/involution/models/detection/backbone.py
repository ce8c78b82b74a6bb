"""RedNet + FPN as a torchvision detection backbone, with the official training-time freezing.

:func:`rednet_fpn_backbone` returns a :class:`RedNetBackboneWithFPN`, a subclass of
torchvision's :class:`BackboneWithFPN` (``body`` = torchvision's ``IntermediateLayerGetter``
over the det/seg RedNet of :func:`involution.models.fpn.rednet_backbone`, ``fpn`` =
torchvision's ``FeaturePyramidNetwork`` or the involution neck
:class:`involution.models.fpn.InvolutionFPN`, ``out_channels``), so every torchvision
detector accepts it.

Official settings (d-li14/involution ``det/`` configs), all arguments:

- the detection stem: the stem involution has K = 7 (classification: K = 3);
- ``frozen_stages=1``: the stem and ``layer1`` get ``requires_grad=False`` and stay in eval mode
  (``trainable_stages=3``: ``layer2``..``layer4`` train);
- ``norm_eval=True``: every BatchNorm of the backbone (the involutions' included) stays in eval
  mode, so its running statistics never change, while the affine weights of the trainable
  stages still learn (mmdet's ``norm_cfg=dict(type="BN", requires_grad=True)``). We keep
  ``nn.BatchNorm2d`` in eval mode rather than swapping in torchvision's ``FrozenBatchNorm2d``
  because this is exactly the official behaviour (``FrozenBatchNorm2d`` would also freeze the
  affine weights of the trainable stages), the state dict keeps the classification checkpoint's
  keys (``num_batches_tracked`` included) and the parameters are counted as the official
  table counts them. ``backbone_kwargs={"frozen_bn": True}`` swaps in ``FrozenBatchNorm2d``
  (torchvision's choice for a pretrained body, see :func:`~involution.models.fpn.
  rednet_backbone`), e.g. to compare with torchvision's ResNet-50-FPN like for like: an
  eval-mode BatchNorm whose weight learns keeps its input for backward, a frozen one nothing;
- RetinaNet's P6 is computed from C5 (:class:`LastLevelP6P7FromC5`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any

from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelP6P7

from involution.models.detection.heads import init_involutions
from involution.models.fpn import InvolutionFPN, rednet_backbone
from involution.models.rednet import RedNet

__all__ = ["LastLevelP6P7FromC5", "RedNetBackboneWithFPN", "rednet_fpn_backbone"]


class LastLevelP6P7FromC5(LastLevelP6P7):
    """torchvision's P6/P7 block, with P6 = conv3x3/2(C5) and P7 = conv3x3/2(ReLU(P6)).

    torchvision's :class:`LastLevelP6P7` takes P6 from P5 whenever ``in_channels ==
    out_channels`` (its RetinaNet v1) and from C5 otherwise (v2). The official RetinaNet
    (mmdet's ``add_extra_convs="on_input"``) takes it from C5 always; this subclass fixes that
    choice, so a small backbone whose C5 happens to have ``out_channels`` channels still follows
    the official architecture.

    Shape: C5 (B, in_channels, H, W) -> P6 (B, out, ceil(H/2), ceil(W/2)), P7 (B, out, H/4, W/4).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels)
        self.use_P5 = False


class RedNetBackboneWithFPN(BackboneWithFPN):
    """torchvision's ``BackboneWithFPN`` over a RedNet, with frozen stages and frozen BN stats.

    Args:
        rednet: the body; its ``stem``, ``maxpool`` and ``layerN`` children are used.
        returned_layers: stages fed to the FPN (1 = ``layer1``, stride 4, ... 4 = ``layer4``).
        out_channels: FPN channels.
        extra_blocks: torchvision extra FPN levels (default: ``LastLevelMaxPool``, the R-CNNs').
        trainable_stages: stages that train, counted from the last: 0 (none) .. number of
            stages + 1 (all, the stem included). The others get ``requires_grad=False`` and stay
            in eval mode.
        norm_eval: keep every BatchNorm of the body in eval mode during training.
        involution_neck: every 3x3 FPN output conv becomes ``Involution2d(out_channels, 7)``.

    Shape:
        (B, 3, H, W) -> ordered dict of (B, out_channels, H / s, W / s): keys ``"0"``, ``"1"``,
        ... for the returned stages (s = 4, 8, 16, 32 for stages 1-4), then the extra levels.
    """

    def __init__(
        self,
        rednet: RedNet,
        returned_layers: Sequence[int] = (1, 2, 3, 4),
        out_channels: int = 256,
        extra_blocks: ExtraFPNBlock | None = None,
        trainable_stages: int = 3,
        norm_eval: bool = True,
        involution_neck: bool = False,
    ) -> None:
        stages = ["stem", *rednet.stage_names]
        returned_layers = tuple(returned_layers)
        if not returned_layers or any(
            not isinstance(index, int) or not 1 <= index < len(stages) for index in returned_layers
        ):
            raise ValueError(
                f"returned_layers must be stage indices in 1..{len(stages) - 1}, "
                f"got {returned_layers}"
            )
        if list(returned_layers) != sorted(set(returned_layers)):
            raise ValueError(f"returned_layers must be increasing, got {returned_layers}")
        if not isinstance(trainable_stages, int) or not 0 <= trainable_stages <= len(stages):
            raise ValueError(
                f"trainable_stages must be an int in 0..{len(stages)}, got {trainable_stages!r}"
            )
        in_channels_list = [rednet.feature_info[index]["num_chs"] for index in returned_layers]
        super().__init__(
            rednet,
            return_layers={f"layer{index}": str(i) for i, index in enumerate(returned_layers)},
            in_channels_list=in_channels_list,
            out_channels=out_channels,
            extra_blocks=extra_blocks,
        )
        if involution_neck:  # BackboneWithFPN always builds torchvision's FPN: swap it
            self.fpn = InvolutionFPN(in_channels_list, out_channels, self.fpn.extra_blocks)
            init_involutions(self.fpn.layer_blocks)
        self.norm_eval = norm_eval
        # The body keeps the stages up to the last returned one; later ones are not computed.
        self.frozen_stages = tuple(
            name for name in stages[: len(stages) - trainable_stages] if name in self.body
        )
        for name in self.frozen_stages:
            self.body[name].requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> RedNetBackboneWithFPN:
        """Set the mode; in training, frozen stages and (``norm_eval``) all BN stay in eval."""
        super().train(mode)
        if mode:
            for name in self.frozen_stages:
                self.body[name].eval()
            if self.norm_eval:
                for module in self.body.modules():
                    if isinstance(module, _BatchNorm):
                        module.eval()
        return self


def rednet_fpn_backbone(
    depth: int = 50,
    *,
    involution_neck: bool = False,
    trainable_stages: int = 3,
    norm_eval: bool = True,
    returned_layers: Sequence[int] = (1, 2, 3, 4),
    extra_blocks: ExtraFPNBlock | None = None,
    fpn_channels: int = 256,
    backbone_weights: str | PathLike | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> RedNetBackboneWithFPN:
    """RedNet-``depth`` (detection stem) + torchvision FPN, ready for torchvision's detectors.

    Args:
        depth: RedNet depth (26, 38, 50, 101, 152), unless ``backbone_kwargs`` has ``layers``.
        involution_neck: the official involution neck (3x3 FPN output convs -> Involution2d).
        trainable_stages: stages that train, from the last (3: the official ``frozen_stages=1``;
            5: all, the stem included; 0: none).
        norm_eval: keep the backbone's BatchNorm statistics frozen (official: True).
        returned_layers: stages fed to the FPN (R-CNNs: C2-C5 = 1..4; RetinaNet: 2..4).
        extra_blocks: extra FPN levels (default: torchvision's ``LastLevelMaxPool``, P6 for
            the R-CNNs' RPN).
        fpn_channels: FPN channels (``out_channels``).
        backbone_weights: a RedNet checkpoint (official ``.pth`` or converted), loaded with
            :func:`involution.models.fpn.load_backbone_weights`.
        backbone_kwargs: :class:`RedNet` arguments (``layers`` overrides the depth's;
            ``stage_widths``, ``stem_width``, ``norm_layer``, ``backend``, ...) and
            ``frozen_bn``, see :func:`involution.models.fpn.rednet_backbone`.

    Shape:
        (B, 3, H, W) -> ordered dict ``"0"``.. of (B, fpn_channels, H / 4, W / 4) .. and extras.
    """
    rednet = rednet_backbone(depth, weights=backbone_weights, **(backbone_kwargs or {}))
    return RedNetBackboneWithFPN(
        rednet,
        returned_layers=returned_layers,
        out_channels=fpn_channels,
        extra_blocks=extra_blocks,
        trainable_stages=trainable_stages,
        norm_eval=norm_eval,
        involution_neck=involution_neck,
    )
