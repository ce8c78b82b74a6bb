"""Training RedNet's stem (conv, BN, ReLU, involution, BN, ReLU, conv) keeping its input only.

RedNet's stem (:class:`~involution.models.rednet.RedNetStem`) works at half the image's size
with ``stem_width // 2`` channels (112 x 112 x 32 for ImageNet) before its last conv widens it.
As modules, with the involution's BatchNorm + ReLU fused
(:mod:`~involution.ops.regenerate_norm_act`), it keeps three such maps for backward beside
the image: the first conv's output (its BatchNorm's input), the ReLU's (the involution's input)
and the fused op's (the last conv's input). ResNet-50's stem keeps one map there, its conv's
output, at 64 channels.

:class:`RegeneratedStem` computes ``conv1 -> bn1 -> relu -> involution -> bn2 -> relu ->
conv2`` in one ``autograd.Function`` that keeps the image, the parameters and per-channel
statistics. Backward recomputes the first conv, its BatchNorm (one elementwise pass from the
saved batch statistics, :func:`~involution.ops.regenerate_norm_act.relu_normalised`) and the
ReLU, regenerates the involution's output and the BatchNorm + ReLU after it (forward's values,
within rounding), then runs the last conv's backward, the fused op's
(:func:`~involution.ops.regenerate_norm_act.norm_act_gradients`) and the first three's. That
costs the first conv (on the image's 3 channels) and two elementwise passes more than the fused
op alone, which regenerates the involution's output anyway. The last conv's output goes
to the stem's own BatchNorm and ReLU modules, which keep it as before. Every BatchNorm's running
statistics are updated once, in forward
(:func:`~involution.ops.regenerate.update_running_stats`).

:func:`involution_stem` is the stem's entry: the op where it applies
(:func:`stem_fusion_applies`), else the modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from involution.ops.backends import resolve_backend
from involution.ops.checks import autocast
from involution.ops.regenerate import (
    ConvArgs,
    SavedLayer,
    autocast_off,
    batch_norm_relu,
    check_batch_size,
    features_output,
    layer_inputs,
    regenerated_features,
    update_running_stats,
)
from involution.ops.regenerate_norm_act import (
    NormAct,
    SavedNormAct,
    involution_norm_act,
    norm_act_fusion_applies,
    norm_act_gradients,
    norm_act_output,
    relu_batch_norm,
    relu_normalised,
)

__all__ = [
    "RegeneratedStem",
    "StemConfig",
    "StemModules",
    "involution_stem",
    "stem_fusion_applies",
]


@dataclass(frozen=True)
class StemConfig:
    """The non-tensor configuration of :class:`RegeneratedStem`: the first conv's arguments,
    its BatchNorm's epsilon, the involution's and its BatchNorm's (:class:`NormAct`), the last
    conv's arguments."""

    conv1: ConvArgs
    eps: float
    norm_act: NormAct
    conv2: ConvArgs


class RegeneratedStem(torch.autograd.Function):
    """``conv2(relu(bn2(involution(relu(bn1(conv1(image)))))))``, batch statistics, keeping the
    image.

    ``forward(config, image, conv1_weight, bn1_affine, out_affine, conv2_weight, *involution)
    -> (out, bn1_mean, bn1_invstd, mean, invstd, out_mean, out_invstd)``: ``config`` a
    :class:`StemConfig`; image (B, C_in, H, W); conv1_weight (C, C_in, kh, kw); bn1_affine and
    out_affine (2, C): the BatchNorms' weights and biases, or ``None``; conv2_weight (C_out, C,
    kh, kw); ``involution``: the involution's tensors after its input
    (:data:`~involution.ops.regenerate.LAYER_TENSORS`). Returns the last conv's output (B,
    C_out, H_out, W_out) and the three BatchNorms' batch statistics (bn1's (C,) each, the
    kernel branch's (M,) each (empty without them), bn2's (C,) each), which are not
    differentiable. Tensors are already cast for autocast; call it with autocast off.
    """

    @staticmethod
    def forward(
        ctx,
        config: StemConfig,
        image: Tensor,
        conv1_weight: Tensor,
        bn1_affine: Tensor | None,
        out_affine: Tensor | None,
        conv2_weight: Tensor,
        *involution: Tensor | None,
    ) -> tuple[Tensor, ...]:
        x, bn1_mean, bn1_invstd = relu_batch_norm(
            config.conv1.forward(image, conv1_weight), bn1_affine, config.eps
        )
        check_batch_size(x, config.norm_act.branch.stride)  # the three BatchNorms' check
        y, *stats = norm_act_output((x, *involution), out_affine, config.norm_act)
        del x  # not kept (the point of the op), nor y: recomputed in backward
        out = config.conv2.forward(y, conv2_weight)
        tensors = (image, conv1_weight, bn1_affine, out_affine, conv2_weight, *involution)
        ctx.save_for_backward(*tensors, bn1_mean, bn1_invstd, *stats)
        ctx.config = config
        ctx.mark_non_differentiable(bn1_mean, bn1_invstd, *stats)
        return out, bn1_mean, bn1_invstd, *stats

    @staticmethod
    def backward(ctx, grad_out: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        config = ctx.config
        saved = ctx.saved_tensors  # read once: an enclosing checkpoint allows one unpacking
        image, conv1_weight, bn1_affine, out_affine, conv2_weight = saved[:5]
        involution = saved[5:11]
        bn1_mean, bn1_invstd, mean, invstd, out_mean, out_invstd = saved[11:]
        needs = ctx.needs_input_grad
        # Forward's x, involution output and y again, the BatchNorms from their statistics.
        front = config.conv1.forward(image, conv1_weight)
        x = relu_normalised(front, bn1_affine, bn1_mean, bn1_invstd)
        layer = SavedLayer(x, *involution, mean, invstd)
        branch = config.norm_act.branch
        features = regenerated_features(layer, branch)
        output = features_output(layer, features, branch)
        y = relu_normalised(output, out_affine, out_mean, out_invstd)
        grad_y, grad_conv2_weight, _ = config.conv2.backward(
            grad_out, y, conv2_weight, None, (True, needs[5], False)
        )
        grads, grad_out_affine = norm_act_gradients(
            grad_y,
            SavedNormAct(layer, y, out_affine, out_mean, out_invstd),
            output,
            features,
            config.norm_act,
            (needs[4], True, *needs[6:]),
        )
        del output, features, y
        needs_bn1 = needs[3]
        grad_front, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            torch.ops.aten.threshold_backward(grads[0], x, 0),
            front,
            None if bn1_affine is None else bn1_affine[0],
            None,
            None,
            bn1_mean,
            bn1_invstd,
            True,
            config.eps,
            [True, needs_bn1, needs_bn1],
        )
        grad_image, grad_conv1_weight, _ = config.conv1.backward(
            grad_front, image, conv1_weight, None, (needs[1], needs[2], False)
        )
        grad_bn1 = torch.stack([grad_weight, grad_bias]) if needs_bn1 else None
        return (
            None,
            grad_image,
            grad_conv1_weight,
            grad_bn1,
            grad_out_affine,
            grad_conv2_weight,
            *grads[1:],
        )


def _plain_conv(conv: nn.Module) -> bool:
    """An ``nn.Conv2d`` without bias, groups or hooks, zero-padded by a number of pixels."""
    return (
        type(conv) is nn.Conv2d
        and conv.bias is None
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and not (conv._forward_hooks or conv._forward_pre_hooks)
    )


class StemModules(NamedTuple):
    """The stem's modules that :class:`RegeneratedStem` computes, in forward order."""

    conv1: nn.Module
    bn1: nn.Module
    act1: nn.Module
    layer: nn.Module
    bn2: nn.Module
    act2: nn.Module
    conv2: nn.Module


def stem_fusion_applies(stem: StemModules) -> bool:
    """Whether :func:`involution_stem` runs :class:`RegeneratedStem`: the involution, ``bn2``
    and ``act2`` fused as :func:`~involution.ops.regenerate_norm_act.norm_act_fusion_applies`
    says (training, kernel regeneration on), ``bn1`` a plain ``nn.BatchNorm2d`` using the
    batch's statistics, ``act1`` ``nn.ReLU``, bias-free ungrouped convs, no hooks."""
    return (
        _plain_conv(stem.conv1)
        and _plain_conv(stem.conv2)
        and batch_norm_relu(stem.bn1, stem.act1)
        and norm_act_fusion_applies(stem.layer, stem.bn2, stem.act2)
    )


def involution_stem(stem: StemModules, image: Tensor) -> Tensor:
    """``conv2(act2(bn2(layer(act1(bn1(conv1(image)))))))`` of ``stem``'s modules: in one
    training op keeping only the image where :func:`stem_fusion_applies`, else the modules (the
    involution's BatchNorm and ReLU through
    :func:`~involution.ops.regenerate_norm_act.involution_norm_act`), which FX tracers record.
    Every BatchNorm's running statistics are updated once; under autocast the convs run in the
    autocast dtype and the BatchNorms' parameters are not cast, as on the modules. Shapes as
    the modules'."""
    conv1, bn1, act1, layer, bn2, act2, conv2 = stem
    if isinstance(image, torch.fx.Proxy) or not stem_fusion_applies(stem):
        x = act1(bn1(conv1(image)))
        return conv2(involution_norm_act(layer, bn2, act2, x))
    # layer_inputs casts the image as it would the involution's input: the first conv's input.
    tensors, branch, batch_stats = layer_inputs(
        layer, image, resolve_backend(layer.backend, image.device)
    )
    conv1_weight, conv2_weight = autocast(conv1.weight, conv2.weight)
    config = StemConfig(
        conv1=ConvArgs.of(conv1),
        eps=bn1.eps,
        norm_act=NormAct(branch=branch, eps=bn2.eps),
        conv2=ConvArgs.of(conv2),
    )
    with autocast_off(image):
        out, *stats = RegeneratedStem.apply(
            config,
            tensors[0],
            conv1_weight,
            _affine(bn1),
            _affine(bn2),
            conv2_weight,
            *tensors[1:],
        )
    bn1_mean, bn1_invstd, mean, invstd, out_mean, out_invstd = stats
    height, width = config.conv1.output_size(image.shape[2:], conv1.weight.shape[2:])
    update_running_stats(bn1, bn1_mean, bn1_invstd, image.shape[0] * height * width)
    # The involution's output: ceil(size / stride) (its padding keeps the size at stride 1).
    count = image.shape[0] * -(-height // branch.stride) * -(-width // branch.stride)
    if batch_stats:
        update_running_stats(layer.norm, mean, invstd, count)
    update_running_stats(bn2, out_mean, out_invstd, count)
    return out


def _affine(norm: nn.BatchNorm2d) -> Tensor | None:
    """A BatchNorm's weight and bias as one (2, C) tensor, or ``None`` without an affine."""
    return None if norm.weight is None else torch.stack([norm.weight, norm.bias])
