"""Eval-only BatchNorm folding for RedNet: each conv -> BatchNorm pair becomes one conv.

In eval mode a BatchNorm is a fixed per-channel affine, so a BatchNorm right after a conv folds
into that conv's weight and bias (``torch.nn.utils.fuse_conv_bn_eval``), and the network makes
one pass less over every activation. A BatchNorm after an involution cannot fold into it (its
kernels are shared by a group's channels); it becomes the epilogue of the fused inference op
(:class:`~involution.ops.Involution2dAffine`), together with the ReLU after it.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils import fuse_conv_bn_eval

from involution.models.rednet import Bottleneck, RedNetStem
from involution.ops.modules import Involution2d, Involution2dAffine

__all__ = ["fold_batchnorm"]


def _foldable(norm: nn.Module) -> bool:
    """A BatchNorm2d with running statistics (eval mode uses them: a fixed affine)."""
    return isinstance(norm, nn.BatchNorm2d) and norm.running_var is not None


def _fold_pair(parent: nn.Module, conv_name: str, norm_name: str) -> None:
    """``parent.<conv_name>`` absorbs ``parent.<norm_name>``, which becomes an identity."""
    conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
    if isinstance(conv, nn.Conv2d) and _foldable(norm):
        setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
        setattr(parent, norm_name, nn.Identity())


def _fold_mixer(parent: nn.Module, mixer_name: str, norm_name: str, act_name: str) -> None:
    """An involution -> BatchNorm -> act triple becomes an Involution2dAffine (norm and act:
    identities); a conv -> BatchNorm pair (the conv twin) folds like any other."""
    mixer, norm = getattr(parent, mixer_name), getattr(parent, norm_name)
    if isinstance(mixer, Involution2d) and _foldable(norm):
        act = getattr(parent, act_name)
        setattr(parent, mixer_name, Involution2dAffine.from_batchnorm(mixer, norm, act))
        setattr(parent, norm_name, nn.Identity())
        setattr(parent, act_name, nn.Identity())
    else:
        _fold_pair(parent, mixer_name, norm_name)


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """An eval-mode copy of ``model`` with every conv -> BatchNorm pair of its RedNet parts folded.

    Folded: the stem's two convs (``conv1``/``bn1``, ``conv2``/``bn3``), each bottleneck's
    ``conv1``/``bn1``, ``conv3``/``bn3`` and ``downsample``, each Involution2d's kernel branch
    (``reduce``/``norm``), and the conv twin's ``conv2``/``bn2``. Each involution followed by a
    BatchNorm and an activation (the stem's ``inv``/``bn2``/``act2``, a bottleneck's
    ``conv2``/``bn2``/``act2``) becomes an :class:`~involution.ops.Involution2dAffine` that
    applies them inside the fused inference op. Other modules are left as they are, so any model
    built from RedNet's blocks (classifier, ``features_only`` backbone, detection and
    segmentation backbones) folds.

    The result computes the same function as ``model.eval()`` within float rounding, with fewer
    passes over memory. It is meant for inference: its affine parameters no longer follow the
    batch statistics, so training it is not training the original model. ``inplace=False``
    (default) leaves ``model`` untouched.
    """
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    # Collect first: the folds replace children while the tree would be walked.
    modules = list(model.modules())
    for module in modules:
        if isinstance(module, RedNetStem):
            _fold_pair(module, "conv1", "bn1")
            _fold_mixer(module, "inv", "bn2", "act2")
            _fold_pair(module, "conv2", "bn3")
        elif isinstance(module, Bottleneck):
            _fold_pair(module, "conv1", "bn1")
            _fold_mixer(module, "conv2", "bn2", "act2")
            _fold_pair(module, "conv3", "bn3")
            downsample = module.downsample
            if isinstance(downsample, nn.Sequential) and len(downsample) == 2:
                _fold_pair(downsample, "0", "1")
    for module in modules:
        if isinstance(module, Involution2d) and _foldable(module.norm):
            module.reduce = fuse_conv_bn_eval(module.reduce, module.norm)
            module.norm = nn.Identity()
    return model
