"""Training an involution, its following BatchNorm and ReLU without keeping the involution's output.

In RedNet every involution is followed by a ``BatchNorm2d`` and a ReLU (a bottleneck's
``conv2``/``bn2``/``act2``, the stem's ``inv``/``bn2``/``act2``). As modules, that BatchNorm
keeps its input, the involution's raw output, for backward; the ReLU keeps its output ``y``,
which the next conv keeps anyway. :class:`RegeneratedInvolutionNormAct` computes involution ->
BatchNorm2d (batch statistics) -> ReLU in one ``autograd.Function`` that keeps the layer's
input ``x``, ``y`` and per-channel statistics only: where ResNet keeps its 3x3 conv's output for
its BatchNorm, RedNet then keeps nothing.

Backward regenerates the involution's output from ``x`` (the kernel branch and the aggregation
once more), then runs ATen's BatchNorm backward with the forward's statistics, ReLU's mask
``y > 0`` and :func:`~involution.ops.regenerate.layer_gradients`. The output cannot be
recovered from ``y`` instead, as in-place activated BatchNorm recovers it through its
invertible leaky ReLU: with batch statistics, the gradient reaches every input through the
mean and the variance, those that ReLU zeroed included, and those are lost in ``y``. So the
result is exact whatever the BatchNorm's weight (zero included), at the cost of one more
involution forward per layer in backward.

:func:`involution_norm_act` is the modules' entry: ``act(norm(layer(x)))``, through the
fused op where it applies (:func:`norm_act_fusion_applies`), else the modules as they are.
The BatchNorm's running statistics are updated once, in forward
(:func:`~involution.ops.regenerate.update_running_stats`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from involution.ops.backends import resolve_backend
from involution.ops.modules import Involution2d
from involution.ops.regenerate import (
    KernelBranch,
    SavedLayer,
    autocast_off,
    check_batch_size,
    layer_gradients,
    layer_inputs,
    layer_output,
    update_running_stats,
)

__all__ = [
    "NormAct",
    "RegeneratedInvolutionNormAct",
    "involution_norm_act",
    "norm_act_fusion_applies",
    "regenerate_involution2d_norm_act",
]


@dataclass(frozen=True)
class NormAct:
    """The non-tensor configuration of the fused op: the involution's :class:`KernelBranch`
    and the following BatchNorm's epsilon."""

    branch: KernelBranch
    eps: float


class RegeneratedInvolutionNormAct(torch.autograd.Function):
    """``relu(batch_norm(involution(x)))`` with batch statistics, keeping ``x`` and the output.

    ``forward(x, reduce_weight, norm_weight, norm_bias, running, span_weight, span_bias,
    out_affine, config) -> (y, mean, invstd, out_mean, out_invstd)``: the first seven as
    :class:`~involution.ops.regenerate.RegeneratedInvolution2d`'s (the involution's, its
    kernel branch's norm included); ``out_affine`` (2, C): the following BatchNorm's weight and
    bias, or ``None`` without an affine; ``config`` a :class:`NormAct`. Returns ``y`` (B, C,
    H_out, W_out), the kernel branch's batch statistics (M,) each (empty without them) and the
    BatchNorm's (C,) each; the statistics are not differentiable. Tensors are already cast for
    autocast; call it with autocast off.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        reduce_weight: Tensor,
        norm_weight: Tensor | None,
        norm_bias: Tensor | None,
        running: Tensor | None,
        span_weight: Tensor,
        span_bias: Tensor | None,
        out_affine: Tensor | None,
        config: NormAct,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        layer = (x, reduce_weight, norm_weight, norm_bias, running, span_weight, span_bias)
        output, mean, invstd = layer_output(layer, config.branch)
        weight, bias = (None, None) if out_affine is None else out_affine.unbind()
        y, out_mean, out_invstd = torch.native_batch_norm(
            output, weight, bias, None, None, True, 0.0, config.eps
        )
        del output  # the point of the op: not kept, regenerated in backward
        y = y.relu_()
        ctx.save_for_backward(*layer, mean, invstd, y, out_affine, out_mean, out_invstd)
        ctx.config = config
        ctx.mark_non_differentiable(mean, invstd, out_mean, out_invstd)
        return y, mean, invstd, out_mean, out_invstd

    @staticmethod
    def backward(ctx, grad_y: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors  # read once: an enclosing checkpoint allows one unpacking
        layer = SavedLayer(*saved[:9])
        y, out_affine, out_mean, out_invstd = saved[9:]
        config = ctx.config
        output = layer_output(layer[:7], config.branch)[0]
        needs_affine = ctx.needs_input_grad[7]
        grad_output, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            torch.ops.aten.threshold_backward(grad_y, y, 0),
            output,
            None if out_affine is None else out_affine[0],
            None,
            None,
            out_mean,
            out_invstd,
            True,
            config.eps,
            [True, needs_affine, needs_affine],
        )
        del output
        grads = layer_gradients(grad_output, layer, config.branch, ctx.needs_input_grad[:7])
        grad_affine = torch.stack([grad_weight, grad_bias]) if needs_affine else None
        return (*grads, grad_affine, None)


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
        and type(norm) is nn.BatchNorm2d
        and (norm.training or norm.running_mean is None)
        and type(act) is nn.ReLU
        and not any(m._forward_hooks or m._forward_pre_hooks for m in (layer, norm, act))
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
    inputs, batch_stats = layer_inputs(layer, x, backend)
    check_batch_size(x, layer.stride)  # nn.BatchNorm2d's check, for the output's statistics
    out_affine = None if norm.weight is None else torch.stack([norm.weight, norm.bias])
    config = NormAct(branch=inputs[-1], eps=norm.eps)
    with autocast_off(x):
        y, mean, invstd, out_mean, out_invstd = RegeneratedInvolutionNormAct.apply(
            *inputs[:-1], out_affine, config
        )
    count = y.shape[0] * y.shape[2] * y.shape[3]
    if batch_stats:
        update_running_stats(layer.norm, mean, invstd, count)
    update_running_stats(norm, out_mean, out_invstd, count)
    return y
