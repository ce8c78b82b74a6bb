"""Eval-only folding of bottleneck ResNets the way :mod:`involution.models.fold` folds RedNet.

:func:`fold_resnet` prepares torchvision's and timm's bottleneck ResNets for inference as
:func:`~involution.models.fold_batchnorm` prepares RedNet: each BatchNorm folded into its conv,
the ReLUs and the residual add run inside the convs (:class:`~involution.models.fold.ConvAct`),
so that RedNet and ResNet are compared on equal terms (``involution bench model --fold-bn``).
:func:`fold_model` prepares any model: RedNets, bottleneck ResNets, and the rest through
``torch.fx``'s conv-BN fusion.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn
from torch.nn.utils import fuse_conv_bn_eval

from involution.models.fold import ConvAct, fold_batchnorm
from involution.ops import Involution2d

__all__ = ["InferenceResNetBottleneck", "fold_model", "fold_resnet", "is_resnet_bottleneck"]


class InferenceResNetBottleneck(nn.Module):
    """A torchvision or timm ResNet bottleneck prepared as ``fold_batchnorm`` prepares RedNet's:
    BatchNorms folded, ReLUs and the residual add inside the convs (:class:`ConvAct`)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.conv1 = ConvAct(fuse_conv_bn_eval(block.conv1, block.bn1), relu=True)
        self.conv2 = ConvAct(fuse_conv_bn_eval(block.conv2, block.bn2), relu=True)
        self.conv3 = ConvAct(fuse_conv_bn_eval(block.conv3, block.bn3), relu=True)
        downsample = block.downsample
        self.downsample = (
            None
            if downsample is None
            else ConvAct(fuse_conv_bn_eval(downsample[0], downsample[1]), relu=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.conv2(self.conv1(x)), residual=shortcut)


def is_resnet_bottleneck(block: nn.Module) -> bool:
    """A plain bottleneck of torchvision's or timm's ResNet (ReLUs, no SE/anti-aliasing/drops)."""
    convs = [getattr(block, f"conv{i}", None) for i in (1, 2, 3)]
    norms = [getattr(block, f"bn{i}", None) for i in (1, 2, 3)]
    downsample = getattr(block, "downsample", "missing")
    acts = [getattr(block, name, None) for name in ("relu", "act1", "act2", "act3")]
    extras = [getattr(block, name, None) for name in ("drop_block", "aa", "se", "drop_path")]
    return (
        all(type(c) is nn.Conv2d and isinstance(c.padding, tuple) for c in convs)
        and all(type(n) is nn.BatchNorm2d for n in norms)
        and (
            downsample is None
            or (
                isinstance(downsample, nn.Sequential)
                and len(downsample) == 2
                and type(downsample[0]) is nn.Conv2d
                and type(downsample[1]) is nn.BatchNorm2d
            )
        )
        and all(a is None or type(a) is nn.ReLU for a in acts)
        and any(a is not None for a in acts)
        and all(e is None or type(e) is nn.Identity for e in extras)
    )


def fold_resnet(model: nn.Module) -> nn.Module | None:
    """A bottleneck ResNet (torchvision's or timm's) prepared like a folded RedNet, or ``None``
    when ``model`` is not one."""
    stem_act = "relu" if hasattr(model, "relu") else "act1"
    blocks = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if is_resnet_bottleneck(child)
    ]
    stem_ok = (
        type(getattr(model, "conv1", None)) is nn.Conv2d
        and type(getattr(model, "bn1", None)) is nn.BatchNorm2d
        and type(getattr(model, stem_act, None)) is nn.ReLU
    )
    if not blocks or not stem_ok:
        return None
    for parent, name in blocks:
        setattr(parent, name, InferenceResNetBottleneck(getattr(parent, name)))
    model.conv1 = ConvAct(fuse_conv_bn_eval(model.conv1, model.bn1), relu=True)
    model.bn1 = nn.Identity()
    setattr(model, stem_act, nn.Identity())
    return model


def fold_model(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` prepared for inference: RedNets (any model with an
    Involution2d) by :func:`~involution.models.fold_batchnorm`, bottleneck ResNets the same way
    (BatchNorms folded, ReLUs and residual adds inside oneDNN convs), other models by
    ``torch.fx``'s conv-BN fusion."""
    import torch.fx.experimental.optimization as fx_optimization

    if any(isinstance(module, Involution2d) for module in model.modules()):
        return fold_batchnorm(model)
    model = copy.deepcopy(model).eval()
    return fold_resnet(model) or fx_optimization.fuse(model)
