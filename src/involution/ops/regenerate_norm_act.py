"""Training an involution, its following BatchNorm and ReLU without keeping the involution's output.

In RedNet every involution is followed by a ``BatchNorm2d`` and a ReLU (a bottleneck's
``conv2``/``bn2``/``act2``, the stem's ``inv``/``bn2``/``act2``). As modules, that BatchNorm
keeps its input, the involution's raw output, for backward; the ReLU keeps its output ``y``,
which the next conv keeps anyway. :class:`RegeneratedInvolutionNormAct` computes involution ->
BatchNorm2d (batch statistics) -> ReLU in one ``autograd.Function`` that keeps the layer's
input ``x``, ``y`` and per-channel statistics only: where ResNet keeps its 3x3 conv's output for
its BatchNorm, RedNet then keeps nothing.

Backward regenerates the involution's output from ``x`` (the kernel branch and the aggregation
once more, :func:`~involution.ops.regenerate.regenerated_features`), then runs ATen's BatchNorm
backward with the forward's statistics, ReLU's mask ``y > 0`` and
:func:`~involution.ops.regenerate.layer_gradients` on the same kernel branch features. The
output cannot be recovered from ``y`` instead, as in-place activated BatchNorm recovers it
through its invertible leaky ReLU: with batch statistics, the gradient reaches every input
through the mean and the variance, those that ReLU zeroed included, and those are lost in
``y``. So the result is exact whatever the BatchNorm's weight (zero included), at the cost of
one more involution forward per layer in backward.

Where the cpu backend's fused span backward runs (float32, float64, eager), that forward is
not a pass of its own: the BatchNorm's backward needs only two sums per channel over the
gradient at its ReLU's input before it, and those read ``y`` (where the ReLU passed it, ``y``
gives the normalised output when the BatchNorm's weight is not too small,
:data:`MIN_RELATIVE_WEIGHT`); the span backward then aggregates the output again per band of
rows from the kernels it regenerates anyway and applies the BatchNorm's backward there
(:func:`norm_act_gradients_in_span_backward`). Smaller weights, other backends and compiled
graphs rebuild the output first.

:func:`involution_norm_act` is the modules' entry: ``act(norm(layer(x)))``, through the
fused op where it applies (:func:`norm_act_fusion_applies`), else the modules as they are.
The BatchNorm's running statistics are updated once, in forward
(:func:`~involution.ops.regenerate.update_running_stats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from involution.ops.backends import resolve_backend
from involution.ops.modules import Involution2d
from involution.ops.regenerate import (
    BranchFeatures,
    KernelBranch,
    SavedLayer,
    autocast_off,
    batch_norm_relu,
    check_batch_size,
    cpu_span_backward_applies,
    features_output,
    layer_gradients,
    layer_inputs,
    layer_output,
    regenerated_features,
    update_running_stats,
)

__all__ = [
    "NormAct",
    "RegeneratedInvolutionNormAct",
    "SavedNormAct",
    "involution_norm_act",
    "norm_act_fusion_applies",
    "norm_act_gradients",
    "norm_act_gradients_in_span_backward",
    "norm_act_output",
    "regenerate_involution2d_norm_act",
    "relu_batch_norm",
    "relu_normalised",
]


@dataclass(frozen=True)
class NormAct:
    """The non-tensor configuration of the fused op: the involution's :class:`KernelBranch`
    and the following BatchNorm's epsilon."""

    branch: KernelBranch
    eps: float


class SavedNormAct(NamedTuple):
    """What the fused op's backward reads: the involution's :class:`SavedLayer`, ``y`` (B, C,
    H_out, W_out), the BatchNorm's affine (2, C) or ``None`` and its batch statistics (C,)
    each."""

    layer: SavedLayer
    y: Tensor
    out_affine: Tensor | None
    out_mean: Tensor
    out_invstd: Tensor


class RegeneratedInvolutionNormAct(torch.autograd.Function):
    """``relu(batch_norm(involution(x)))`` with batch statistics, keeping ``x`` and the output.

    ``forward(config, out_affine, *layer) -> (y, mean, invstd, out_mean, out_invstd)``:
    ``config`` a :class:`NormAct`; ``out_affine`` (2, C): the following BatchNorm's weight and
    bias, or ``None`` without an affine; ``layer``: the involution's tensors
    (:data:`~involution.ops.regenerate.LAYER_TENSORS`, its kernel branch's norm included).
    Returns ``y`` (B, C, H_out, W_out), the kernel branch's batch statistics (M,) each (empty
    without them) and the BatchNorm's (C,) each; the statistics are not differentiable.
    Tensors are already cast for autocast; call it with autocast off.
    """

    @staticmethod
    def forward(
        ctx, config: NormAct, out_affine: Tensor | None, *layer: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        # The involution's output is not kept (the point of the op): regenerated in backward.
        y, mean, invstd, out_mean, out_invstd = norm_act_output(layer, out_affine, config)
        ctx.save_for_backward(*layer, mean, invstd, y, out_affine, out_mean, out_invstd)
        ctx.config = config
        ctx.mark_non_differentiable(mean, invstd, out_mean, out_invstd)
        return y, mean, invstd, out_mean, out_invstd

    @staticmethod
    def backward(ctx, grad_y: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors  # read once: an enclosing checkpoint allows one unpacking
        layer = SavedLayer(*saved[:9])
        norm_act = SavedNormAct(layer, *saved[9:])
        branch = ctx.config.branch
        features = regenerated_features(layer, branch)
        needs = ctx.needs_input_grad[1:]
        if _output_in_span_backward(norm_act, branch):
            grads, grad_affine = norm_act_gradients_in_span_backward(
                grad_y, norm_act, features, ctx.config, needs
            )
        else:
            output = features_output(layer, features, branch)
            grads, grad_affine = norm_act_gradients(
                grad_y, norm_act, output, features, ctx.config, needs
            )
        return (None, grad_affine, *grads)


#: The BatchNorm weights for which its normalised input is recovered from ``y`` (see
#: :func:`norm_act_gradients_in_span_backward`): ``|weight| >= this * max(1, |bias|)`` in
#: every channel, so that ``(y - bias) / weight`` loses at most a few bits to ``y``'s rounding.
MIN_RELATIVE_WEIGHT = 1e-2


def _output_in_span_backward(saved: SavedNormAct, branch: KernelBranch) -> bool:
    """Whether backward takes :func:`norm_act_gradients_in_span_backward`: the cpu backend's
    fused span backward runs, eagerly (compiled graphs keep one path, the rebuild), and every
    channel's BatchNorm weight is large enough (:data:`MIN_RELATIVE_WEIGHT`)."""
    if not cpu_span_backward_applies(saved.layer.x, branch) or torch.compiler.is_compiling():
        return False
    if saved.out_affine is None:
        return True
    weight, bias = saved.out_affine
    return bool((weight.abs() >= MIN_RELATIVE_WEIGHT * bias.abs().clamp_min(1)).all())


def norm_act_gradients_in_span_backward(
    grad_y: Tensor,
    saved: SavedNormAct,
    features: BranchFeatures,
    config: NormAct,
    needs: Sequence[bool],
) -> tuple[tuple[Tensor | None, ...], Tensor | None]:
    """:func:`norm_act_gradients` without the involution's output rebuilt beforehand: the cpu
    backend's span backward aggregates it again band by band and applies the BatchNorm's
    backward there (``output_affine``).

    BatchNorm's backward needs two sums per channel over the gradient g at its ReLU's input:
    ``sum(g)`` and ``sum(g * xhat)``, xhat the normalised output. g is zero where ReLU zeroed
    ``y``; elsewhere ``y = weight * xhat + bias``, so ``xhat = (y - bias) / weight`` (ATen's
    BatchNorm backward reduction with ``bias`` as the mean and ``1 / weight`` as invstd). The
    gradient at the involution's output is then ``A * g + B + D * output`` per channel: ``A =
    weight * invstd``, ``D = -A * invstd * mean(g * xhat)``, ``B = -A * mean(g) - D * mean``.
    """
    y, affine = saved.y, saved.out_affine
    g = torch.ops.aten.threshold_backward(grad_y, y, 0)
    if affine is None:
        center, inverse_scale = y.new_zeros(y.shape[1]), y.new_ones(y.shape[1])
    else:
        center, inverse_scale = affine[1], affine[0].reciprocal()
    _, sum_gx, sum_g = torch.ops.aten.native_batch_norm_backward(
        g, y, None, None, None, center, inverse_scale, True, config.eps, [False, True, True]
    )
    count = y.numel() // y.shape[1]
    invstd, mean = saved.out_invstd, saved.out_mean
    scale = invstd if affine is None else invstd * affine[0]
    shift_of_output = -scale * invstd * (sum_gx / count)
    shift = -scale * (sum_g / count) - shift_of_output * mean
    output_affine = torch.stack([scale, shift, shift_of_output]).to(g.dtype)
    grads = layer_gradients(g, saved.layer, config.branch, needs[1:], features, output_affine)
    grad_affine = torch.stack([sum_gx, sum_g]) if needs[0] else None
    return grads, grad_affine


def relu_batch_norm(
    output: Tensor, out_affine: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``relu(batch_norm(output))`` with the batch's statistics: (y, mean, invstd (C,) each),
    without autograd; the same op again on the same ``output`` gives the same ``y`` bitwise."""
    weight, bias = (None, None) if out_affine is None else out_affine.unbind()
    y, mean, invstd = torch.native_batch_norm(output, weight, bias, None, None, True, 0.0, eps)
    return y.relu_(), mean, invstd


def relu_normalised(
    output: Tensor, out_affine: Tensor | None, mean: Tensor, invstd: Tensor
) -> Tensor:
    """:func:`relu_batch_norm`'s ``y`` again from its statistics (C,) each, in one elementwise
    pass (ATen's BatchNorm's own formula: ``output * scale + shift``), without recomputing
    them."""
    scale = invstd if out_affine is None else invstd * out_affine[0]
    shift = -mean * scale if out_affine is None else out_affine[1] - mean * scale
    y = torch.addcmul(shift[:, None, None], output, scale[:, None, None])
    return y.to(output.dtype).relu_()


def norm_act_output(
    layer: Sequence[Tensor | None], out_affine: Tensor | None, config: NormAct
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:class:`RegeneratedInvolutionNormAct`'s forward, without autograd."""
    output, mean, invstd = layer_output(layer, config.branch)
    y, out_mean, out_invstd = relu_batch_norm(output, out_affine, config.eps)
    return y, mean, invstd, out_mean, out_invstd


def norm_act_gradients(
    grad_y: Tensor,
    saved: SavedNormAct,
    output: Tensor,
    features: BranchFeatures,
    config: NormAct,
    needs: Sequence[bool],
) -> tuple[tuple[Tensor | None, ...], Tensor | None]:
    """(the involution's gradients, as :func:`~involution.ops.regenerate.layer_gradients`
    gives them; the BatchNorm's affine's (2, C) or ``None``) from ``grad_y`` (B, C, H_out,
    W_out), with the regenerated involution ``output`` and kernel branch ``features``.
    ``needs``: 8 flags, the affine's then the layer's tensors'."""
    needs_affine = needs[0]
    grad_output, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
        torch.ops.aten.threshold_backward(grad_y, saved.y, 0),
        output,
        None if saved.out_affine is None else saved.out_affine[0],
        None,
        None,
        saved.out_mean,
        saved.out_invstd,
        True,
        config.eps,
        [True, needs_affine, needs_affine],
    )
    del output  # the caller passes it on: freed before the involution's gradients
    grads = layer_gradients(grad_output, saved.layer, config.branch, needs[1:], features)
    grad_affine = torch.stack([grad_weight, grad_bias]) if needs_affine else None
    return grads, grad_affine


def norm_act_fusion_applies(layer: nn.Module, norm: nn.Module, act: nn.Module) -> bool:
    """Whether :func:`involution_norm_act` runs the fused op: ``layer`` an
    :class:`~involution.ops.Involution2d` regenerating its kernels in this call
    (``regenerate_kernels``, ``training_regenerates``, ``regeneration_applies``) with
    ``fuse_norm_act`` on, ``norm`` a plain ``nn.BatchNorm2d`` normalising with the batch's
    statistics (training, or without running statistics), ``act`` ``nn.ReLU``, and no hooks
    on the three modules (they expect a call each)."""
    return (
        isinstance(layer, Involution2d)
        and layer.fuse_norm_act
        and batch_norm_relu(norm, act)
        and not (layer._forward_hooks or layer._forward_pre_hooks)
        and layer.training_regenerates()
        and layer.regeneration_applies()
    )


def involution_norm_act(layer: nn.Module, norm: nn.Module, act: nn.Module, x: Tensor) -> Tensor:
    """``act(norm(layer(x)))``: in one training op keeping only ``x`` and the output where
    :func:`norm_act_fusion_applies`, else the three modules (which FX tracers record).
    Shapes as ``layer``'s."""
    if not isinstance(x, torch.fx.Proxy) and norm_act_fusion_applies(layer, norm, act):
        return regenerate_involution2d_norm_act(
            layer, norm, x, resolve_backend(layer.backend, x.device)
        )
    return act(norm(layer(x)))


def regenerate_involution2d_norm_act(
    layer: Involution2d, norm: nn.BatchNorm2d, x: Tensor, backend: str
) -> Tensor:
    """``relu(norm(layer(x)))`` through :class:`RegeneratedInvolutionNormAct` (requires
    :func:`norm_act_fusion_applies`), the running statistics of both BatchNorms (the kernel
    branch's and ``norm``) updated once. ``backend`` is the concrete aggregation backend; under
    autocast the BatchNorms' parameters are not cast, as on the modules."""
    tensors, branch, batch_stats = layer_inputs(layer, x, backend)
    check_batch_size(x, layer.stride)  # nn.BatchNorm2d's check, for the output's statistics
    out_affine = None if norm.weight is None else torch.stack([norm.weight, norm.bias])
    config = NormAct(branch=branch, eps=norm.eps)
    with autocast_off(x):
        y, mean, invstd, out_mean, out_invstd = RegeneratedInvolutionNormAct.apply(
            config, out_affine, *tensors
        )
    count = y.shape[0] * y.shape[2] * y.shape[3]
    if batch_stats:
        update_running_stats(layer.norm, mean, invstd, count)
    update_running_stats(norm, out_mean, out_invstd, count)
    return y
