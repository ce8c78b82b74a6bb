"""Training the involution layer without keeping its kernels: they are regenerated in backward.

An :class:`~involution.ops.Involution2d`'s per-pixel kernels are a function of its own input,
``W = span(relu(norm(reduce(pool(x)))))``, and the aggregation's backward keeps ``x`` anyway.
Autograd on the plain layer keeps, beside ``x``, the kernels (B, G*K*K, H_out, W_out: about
three times ``x`` for K = 7 and 16 channels per group) and the kernel branch's intermediates.

:class:`RegeneratedInvolution2d` computes the whole layer in one ``autograd.Function`` that
keeps only ``x``, the parameters and the kernel branch's per-channel BatchNorm statistics, and
regenerates the branch in backward, with explicit gradients (ATen's convolution and BatchNorm
backward, the registered aggregation gradients), so ``torch.compile(fullgraph=True)`` traces it.
The forward aggregates through the fused op from the branch's activated features, so the
``"triton"`` backend never stores the kernels; in eager mode its backward regenerates them in
registers too (the backend's ``fused_backward``). On the ``"cpu"`` backend (float32, float64)
the output comes from the fused layer kernel, the branch's norm folded in from its statistics
(:func:`features_output`, which a backward that rebuilds the output calls too: bitwise the
same output). On the ``"cpu"`` backend (float32, float64,
traced code too) the backward through the span conv and the aggregation is one registered op
that regenerates the kernels per band of rows (the backend's ``span_backward``). The other
backends (and traced Triton code) materialise the kernels and their gradient while the backward
runs.
It applies to a plain ``nn.BatchNorm2d`` (batch statistics in training, running statistics in
eval mode, as in the detection backbones' ``norm_eval``), torchvision's ``FrozenBatchNorm2d``
(the detection backbones' ``frozen_bn``) or an identity as the branch's norm,
and a ReLU (``Involution2d.regeneration_applies``); the running statistics are updated once, in
forward (:func:`update_running_stats`), as ``nn.BatchNorm2d`` updates them.

Every other kernel branch (SyncBatchNorm, other norms or activations, subclasses) trains through
:func:`recompute_layer`: activation checkpointing of the whole layer with the branch's buffers
restored after the recomputation, so they too are updated once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from involution.ops import registration
from involution.ops.backends import get_backend
from involution.ops.checks import autocast, check_dtypes
from involution.ops.layer import Involution2dLayerSpec
from involution.ops.layout import kernels_like, pair

__all__ = [
    "LAYER_TENSORS",
    "POINTWISE",
    "BranchFeatures",
    "ConvArgs",
    "KernelBranch",
    "RegeneratedInvolution2d",
    "SavedLayer",
    "autocast_off",
    "batch_norm_relu",
    "batch_statistics_norm",
    "branch_features",
    "check_batch_size",
    "cpu_span_backward_applies",
    "features_output",
    "is_frozen_batchnorm",
    "layer_gradients",
    "layer_inputs",
    "layer_output",
    "recompute_layer",
    "regenerate_involution2d",
    "regenerated_features",
    "update_running_stats",
]


@dataclass(frozen=True)
class ConvArgs:
    """An ungrouped conv's stride, padding and dilation, (height, width) each."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvArgs:
        return cls(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))

    def output_size(self, size: Sequence[int], kernel_size: Sequence[int]) -> tuple[int, int]:
        """The output's (height, width) for an input of ``size`` (height, width)."""
        return tuple(
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(
                size, kernel_size, self.stride, self.padding, self.dilation, strict=True
            )
        )

    def forward(self, input: Tensor, weight: Tensor) -> Tensor:
        """The bias-free conv's output."""
        return F.conv2d(input, weight, None, self.stride, self.padding, self.dilation)

    def backward(
        self, grad: Tensor, input: Tensor, weight: Tensor, bias: Tensor | None, mask: Sequence[bool]
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """ATen's backward of ``F.conv2d(input, weight, bias)`` with these arguments:
        (grad_input, grad_weight, grad_bias), each computed where ``mask`` says."""
        return torch.ops.aten.convolution_backward(
            grad,
            input,
            weight,
            None if bias is None else [bias.shape[0]],
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            False,
            [0, 0],
            1,
            list(mask),
        )


#: A 1x1 conv's arguments (the kernel branch's reduce and span convs).
POINTWISE = ConvArgs((1, 1), (0, 0), (1, 1))


@dataclass(frozen=True)
class KernelBranch:
    """The non-tensor configuration of the regenerated layer.

    Attributes:
        kernel_size: K (odd); padding is ``dilation * (K - 1) // 2``.
        groups: G.
        stride: aggregation stride, and the kernel branch's average-pooling window.
        dilation: aggregation dilation.
        eps: the BatchNorm's epsilon, or ``None`` for an identity norm.
        backend: the concrete aggregation backend (``"cpu"``, ``"triton"``, ...).
    """

    kernel_size: int
    groups: int
    stride: int
    dilation: int
    eps: float | None
    backend: str

    @property
    def conv_args(self) -> tuple:
        """(stride, padding, dilation, backend), as the aggregation ops take them."""
        padding = self.dilation * (self.kernel_size - 1) // 2
        return (
            [self.stride, self.stride],
            [padding, padding],
            [self.dilation, self.dilation],
            self.backend,
        )


def _pool(x: Tensor, branch: KernelBranch) -> Tensor:
    """The kernel branch's ``AvgPool2d(stride, stride, ceil_mode=True)`` (identity at 1): the
    cpu backend's op where it applies (:func:`_cpu_average_pool`; ATen's values bitwise), else
    ATen's."""
    stride = branch.stride
    if stride == 1:
        return x
    cpu = _cpu_average_pool(x, branch)
    if cpu is not None:
        return cpu.average_pool(x, stride)
    return F.avg_pool2d(x, stride, stride, ceil_mode=True)


def _cpu_average_pool(x: Tensor, branch: KernelBranch) -> ModuleType | None:
    """The cpu backend (its ``average_pool`` and ``average_pool_backward_add_``, registered ops
    that traced code runs too) where it applies to ``x`` or its gradient: that backend, float32
    or float64, contiguous in NCHW or channels_last, not empty. ``None`` otherwise."""
    if (
        branch.backend != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or x.numel() == 0
        or not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
    ):
        return None
    return get_backend("cpu")


def _normalise(
    reduced: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    running: Tensor | None,
    eps: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The branch's norm on ``reduced`` (B, M, H_out, W_out): (output, mean, invstd), the
    batch's statistics (M,) each, or empty with running statistics or an identity norm.
    ``running`` is (2, M): mean and variance, for a BatchNorm in eval mode."""
    if eps is None:
        empty = reduced.new_empty(0)
        return reduced, empty, empty
    mean_var = (None, None) if running is None else (running[0], running[1])
    return torch.native_batch_norm(
        reduced, norm_weight, norm_bias, *mean_var, running is None, 0.0, eps
    )


class SavedLayer(NamedTuple):
    """What :class:`RegeneratedInvolution2d` keeps for backward (shapes in its docstring): the
    layer's tensors (:data:`LAYER_TENSORS`) and the kernel branch's batch statistics."""

    x: Tensor
    reduce_weight: Tensor
    norm_weight: Tensor | None
    norm_bias: Tensor | None
    running: Tensor | None
    span_weight: Tensor
    span_bias: Tensor | None
    mean: Tensor
    invstd: Tensor


#: The layer's tensors, in the order the regenerating ops take them (shapes in
#: :class:`RegeneratedInvolution2d`'s docstring).
LAYER_TENSORS = SavedLayer._fields[:7]


class RegeneratedInvolution2d(torch.autograd.Function):
    """The :class:`~involution.ops.Involution2d` layer, its kernels regenerated in backward.

    ``forward(branch, x, reduce_weight, norm_weight, norm_bias, running, span_weight,
    span_bias) -> (output, mean, invstd)``: branch a :class:`KernelBranch`; the layer's tensors
    (:data:`LAYER_TENSORS`): x (B, C, H, W); reduce_weight (M, C, 1, 1); norm_weight, norm_bias
    (M,) or ``None``; running (2, M) (the eval-mode BatchNorm's running mean and variance) or
    ``None`` (batch statistics); span_weight (G*K*K, M, 1, 1); span_bias (G*K*K,) or ``None``.
    Returns the output (B, C, H_out, W_out) and the batch statistics (M,) each (empty without
    them), which are not differentiable. Tensors are already cast for autocast; call it with
    autocast off.
    """

    @staticmethod
    def forward(ctx, branch: KernelBranch, *layer: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        output, mean, invstd = layer_output(layer, branch)
        # Only the input, the parameters and the statistics: the kernels and the branch's
        # intermediates are regenerated in backward.
        ctx.save_for_backward(*layer, mean, invstd)
        ctx.branch = branch
        ctx.mark_non_differentiable(mean, invstd)
        return output, mean, invstd

    @staticmethod
    def backward(ctx, grad_output: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        # ctx.saved_tensors read once: an enclosing checkpoint allows one unpacking.
        saved = SavedLayer(*ctx.saved_tensors)
        return (None, *layer_gradients(grad_output, saved, ctx.branch, ctx.needs_input_grad[1:]))


class BranchFeatures(NamedTuple):
    """The kernel branch's tensors that the layer's backward reads: the pooled input (B, C,
    H_out, W_out) (``x`` itself at stride 1), the reduce conv's output and the ReLU's, (B, M,
    H_out, W_out) each."""

    pooled: Tensor
    reduced: Tensor
    activated: Tensor


def branch_features(
    layer: Sequence[Tensor | None], branch: KernelBranch
) -> tuple[BranchFeatures, Tensor, Tensor]:
    """The kernel branch as forward computes it (bitwise: the same ops on the same tensors) and
    its batch statistics (M,) each (empty without them), without autograd. ``layer``: the
    layer's tensors (:data:`LAYER_TENSORS`)."""
    x, reduce_weight, norm_weight, norm_bias, running = layer[:5]
    pooled = _pool(x, branch)
    reduced = F.conv2d(pooled, reduce_weight)
    normed, mean, invstd = _normalise(reduced, norm_weight, norm_bias, running, branch.eps)
    return BranchFeatures(pooled, reduced, F.relu(normed)), mean, invstd


def layer_output(
    layer: Sequence[Tensor | None], branch: KernelBranch
) -> tuple[Tensor, Tensor, Tensor]:
    """The layer's output (B, C, H_out, W_out) and its kernel branch's batch statistics (M,)
    each (empty without them), without autograd. ``layer``: the layer's tensors
    (:data:`LAYER_TENSORS`)."""
    features, mean, invstd = branch_features(layer, branch)
    return features_output(SavedLayer(*layer, mean, invstd), features, branch), mean, invstd


def features_output(saved: SavedLayer, features: BranchFeatures, branch: KernelBranch) -> Tensor:
    """The layer's output (B, C, H_out, W_out) from its kernel branch. Forward and the
    backward that regenerates the output both compute it here: the same output, bitwise.

    Where the ``"cpu"`` backend's fused layer kernel applies (float32, float64), that kernel
    (the inference one), with the branch's norm folded into the reduce conv from ``saved``'s
    statistics: it never stores the kernels and takes about half the time of the span conv and
    the aggregation. Otherwise the aggregation with the kernels ``span(features.activated)``.
    """
    x = saved.x
    if not _layer_kernel_applies(x, branch):
        return _aggregate(x, features.activated, saved.span_weight, saved.span_bias, branch)
    reduce_weight, reduce_bias = saved.reduce_weight, None
    affine = _norm_affine(saved, branch)
    if affine is not None:
        reduce_weight = reduce_weight * affine[0][:, None, None, None]
        reduce_bias = affine[1]
    k = branch.kernel_size
    stride, padding, dilation, backend = branch.conv_args
    spec = Involution2dLayerSpec(
        kernel_size=(k, k),
        stride=pair(stride),
        padding=pair(padding),
        dilation=pair(dilation),
        groups=branch.groups,
        backend=backend,
        reduce_weight=reduce_weight,
        reduce_bias=reduce_bias,
        span_weight=saved.span_weight,
        span_bias=saved.span_bias,
    )
    return registration.run_layer(spec, x, None)


def _layer_kernel_applies(x: Tensor, branch: KernelBranch) -> bool:
    """Whether :func:`features_output` runs the ``"cpu"`` backend's fused layer kernel."""
    return branch.backend == "cpu" and x.dtype in (torch.float32, torch.float64) and x.numel() > 0


def regenerated_features(saved: SavedLayer, branch: KernelBranch) -> BranchFeatures:
    """The kernel branch for a backward that also rebuilds the layer's output with
    :func:`features_output`: forward's ops (:func:`branch_features`, bitwise) where that output
    reads the features, else from the saved statistics (one pass over the reduced map fewer:
    the fused layer kernel folds the norm in from them)."""
    if _layer_kernel_applies(saved.x, branch):
        return _saved_features(saved, branch)
    return branch_features(saved[:7], branch)[0]


def _norm_affine(saved: SavedLayer, branch: KernelBranch) -> tuple[Tensor, Tensor] | None:
    """The kernel branch's norm as a per-channel (scale, shift), (M,) each, from the saved
    statistics (the running ones in eval mode); ``None`` for an identity norm."""
    if branch.eps is None:
        return None
    running = saved.running
    scale = saved.invstd if running is None else torch.rsqrt(running[1] + branch.eps)
    shift = -(saved.mean if running is None else running[0]) * scale
    if saved.norm_weight is not None:
        scale = scale * saved.norm_weight
        shift = shift * saved.norm_weight
    if saved.norm_bias is not None:
        shift = shift + saved.norm_bias
    return scale, shift


def _saved_features(saved: SavedLayer, branch: KernelBranch) -> BranchFeatures:
    """The kernel branch from the saved statistics (no second pass over ``reduced`` for
    them); forward's features within rounding."""
    pooled = _pool(saved.x, branch)
    reduced = F.conv2d(pooled, saved.reduce_weight)
    affine = _norm_affine(saved, branch)
    if affine is None:
        return BranchFeatures(pooled, reduced, F.relu(reduced))
    scale, shift = affine
    normed = torch.addcmul(shift[:, None, None], reduced, scale[:, None, None])
    normed = normed.to(reduced.dtype)  # a half-precision input's BatchNorm output
    return BranchFeatures(pooled, reduced, F.relu(normed))


def layer_gradients(
    grad_output: Tensor,
    saved: SavedLayer,
    branch: KernelBranch,
    needs: Sequence[bool],
    features: BranchFeatures | None = None,
    output_affine: Tensor | None = None,
) -> tuple[Tensor | None, ...]:
    """The layer's gradients from ``grad_output`` (B, C, H_out, W_out), the kernels
    regenerated from ``saved``: (x, reduce_weight, norm_weight, norm_bias, running (always
    ``None``), span_weight, span_bias), each ``None`` where ``needs`` (7 flags, in that
    order) is false or the parameter is absent. ``features``: the kernel branch where the
    caller has it (:func:`branch_features`), else recomputed from the saved statistics.
    ``output_affine`` (3, C), only where the cpu backend's ``span_backward`` runs
    (:func:`cpu_span_backward_applies`): ``grad_output`` is then a gradient g and the layer's
    output gets ``A * g + B + D * output`` per channel (rows A, B, D), the output aggregated
    again inside that backward."""
    x, reduce_weight, norm_weight, norm_bias, running = saved[:5]
    mean, invstd = saved.mean, saved.invstd
    pooled, reduced, activated = features or _saved_features(saved, branch)
    cpu_span_backward = _cpu_span_backward(x, branch)
    if branch.backend == "triton" and x.numel() > 0 and registration.use_eager_path(x, activated):
        span_grads = _triton_span_gradients(grad_output, x, activated, saved, branch, needs)
    elif cpu_span_backward is not None:
        span_grads = cpu_span_backward(
            grad_output,
            x,
            activated,
            saved.span_weight,
            saved.span_bias,
            branch.kernel_size,
            branch.stride,
            branch.dilation,
            (needs[0], needs[5], needs[6]),
            output_affine,
        )
    else:
        span_grads = _span_gradients(grad_output, x, activated, saved, branch, needs)
    grad_x, grad_activated, grad_span_weight, grad_span_bias = span_grads
    grad_normed = torch.ops.aten.threshold_backward(grad_activated, activated, 0)
    grad_norm_weight = grad_norm_bias = None
    if branch.eps is None:
        grad_reduced = grad_normed
    else:
        grad_reduced, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_batch_norm_backward(
            grad_normed,
            reduced,
            norm_weight,
            None if running is None else running[0],
            None if running is None else running[1],
            mean if running is None else None,
            invstd if running is None else None,
            running is None,
            branch.eps,
            [
                True,
                norm_weight is not None and needs[2],
                norm_bias is not None and needs[3],
            ],
        )
    grad_reduce_weight = _reduce_conv_backward(
        grad_reduced,
        x,
        pooled,
        reduce_weight,
        grad_x if needs[0] else None,
        needs[1],
        branch,
    )
    return (
        grad_x,
        grad_reduce_weight,
        grad_norm_weight,
        grad_norm_bias,
        None,
        grad_span_weight,
        grad_span_bias,
    )


def _reduce_conv_backward(
    grad_reduced: Tensor,
    x: Tensor,
    pooled: Tensor,
    reduce_weight: Tensor,
    grad_x: Tensor | None,
    needs_weight: bool,
    branch: KernelBranch,
) -> Tensor | None:
    """The reduce conv's backward: its weight's gradient (M, C, 1, 1) with ``needs_weight``
    (else ``None``), and where ``grad_x`` (the span backward's own new tensor, x's shape) is
    given, the input's gradient (through the branch's average pool at stride > 1) added to it
    in place (by the cpu backend's op where :func:`_cpu_average_pool` applies).
    ``grad_reduced`` (B, M, H_out, W_out), ``pooled`` (B, C, H_out, W_out).

    In float32 and float64, batched matrix products, one per image over its pixels: at unit
    stride the input's gradient is accumulated straight into ``grad_x``, without ATen's 1x1-conv
    backward's zero-filled gradient and the separate sum. Half precision keeps ATen's conv
    backward, which accumulates each gradient in float32 and rounds once (BatchNorm's backward
    before it amplifies any further rounding)."""
    stride = branch.stride
    grad_pooled = grad_weight = None
    if grad_reduced.dtype in (torch.float32, torch.float64):
        grad_rows = grad_reduced.flatten(2)  # (B, M, pixels): a view in NCHW and channels_last
        if grad_x is not None:
            weight_t = reduce_weight.flatten(1).t().expand(grad_rows.shape[0], -1, -1)
            if stride == 1 and (
                grad_x.is_contiguous() or grad_x.is_contiguous(memory_format=torch.channels_last)
            ):  # flatten(2) is then a view of grad_x
                grad_x.flatten(2).baddbmm_(weight_t, grad_rows)
            else:
                grad_pooled = torch.bmm(weight_t, grad_rows).view(pooled.shape)
        if needs_weight:
            pixels = pooled.flatten(2).transpose(1, 2)
            grad_weight = torch.bmm(grad_rows, pixels).sum(0).view_as(reduce_weight)
    else:
        grad_pooled, grad_weight, _ = POINTWISE.backward(
            grad_reduced, pooled, reduce_weight, None, [grad_x is not None, needs_weight, False]
        )
    if grad_pooled is not None:
        if stride > 1:
            cpu = _cpu_average_pool(grad_x, branch)
            if cpu is not None:
                cpu.average_pool_backward_add_(grad_x, grad_pooled, stride)
                return grad_weight
            grad_pooled = torch.ops.aten.avg_pool2d_backward(
                grad_pooled, x, [stride] * 2, [stride] * 2, [0, 0], True, True, None
            )
        grad_x.add_(grad_pooled)
    return grad_weight


def _span_gradients(
    grad_output: Tensor,
    x: Tensor,
    activated: Tensor,
    saved: SavedLayer,
    branch: KernelBranch,
    needs: Sequence[bool],
) -> tuple[Tensor | None, ...]:
    """(grad_x of the aggregation, grad_activated, grad_span_weight, grad_span_bias) with
    ATen ops: the kernels (B, G, K, K, H_out, W_out) and their gradient materialised, the
    aggregation's gradients by the backend, the span conv's by ATen."""
    span_weight, span_bias = saved.span_weight, saved.span_bias
    k = branch.kernel_size
    kernels = F.conv2d(activated, span_weight, span_bias).unflatten(1, [branch.groups, k, k])
    grad_x, grad_kernels = _aggregation_gradients(grad_output, x, kernels, branch, needs[0])
    del kernels
    grad_kernels = grad_kernels.flatten(1, 3)  # (B, G*K*K, H_out, W_out)
    grad_activated, grad_span_weight, grad_span_bias = POINTWISE.backward(
        grad_kernels,
        activated,
        span_weight,
        span_bias,
        [True, needs[5], span_bias is not None and needs[6]],
    )
    return grad_x, grad_activated, grad_span_weight, grad_span_bias


def cpu_span_backward_applies(x: Tensor, branch: KernelBranch) -> bool:
    """Whether :func:`layer_gradients` runs the cpu backend's fused ``span_backward``."""
    return _cpu_span_backward(x, branch) is not None


def _cpu_span_backward(x: Tensor, branch: KernelBranch) -> Callable | None:
    """The cpu backend's fused ``span_backward`` (the kernels regenerated per band of rows,
    never stored whole; a registered op, so traced code runs it too) where it applies: float32
    or float64 and a non-empty input. ``None`` otherwise."""
    if branch.backend != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.numel() == 0:
        return None
    return getattr(get_backend("cpu"), "span_backward", None)


def _triton_span_gradients(
    grad_output: Tensor,
    x: Tensor,
    activated: Tensor,
    saved: SavedLayer,
    branch: KernelBranch,
    needs: Sequence[bool],
) -> tuple[Tensor | None, ...]:
    """:func:`_span_gradients` by the Triton backend's fused backward, which keeps the kernels
    and their gradient in registers (:mod:`involution.ops.backends.triton.regeneration`)."""
    span_weight = saved.span_weight
    k = branch.kernel_size
    geometry = (pair(value) for value in branch.conv_args[:3])
    grad_x, grad_activated, grad_span_weight, grad_span_bias = get_backend("triton").fused_backward(
        grad_output,
        x,
        activated,
        span_weight.flatten(1),
        saved.span_bias,
        (k, k),
        *geometry,
        (needs[0], needs[5], needs[6]),
    )
    if grad_span_weight is not None:
        grad_span_weight = grad_span_weight.view_as(span_weight)
    return grad_x, grad_activated, grad_span_weight, grad_span_bias


def _aggregate(
    x: Tensor,
    activated: Tensor,
    span_weight: Tensor,
    span_bias: Tensor | None,
    branch: KernelBranch,
) -> Tensor:
    """The aggregation with the kernels ``span(activated)``, without autograd, by the fused op
    (the ``"triton"`` backend generates the kernels in registers and never stores them; the
    others run the span conv first): its computation directly in eager mode, the custom op
    where a tracer needs one."""
    k = branch.kernel_size
    stride, padding, dilation, backend = branch.conv_args
    args = (x, activated, span_weight.flatten(1), span_bias, [k, k], stride, padding, dilation)
    if registration.use_eager_path(x, activated):
        return registration.fused_aggregate(*args, branch.groups, backend)
    return registration.involution2d_fused_op(*args, branch.groups, backend)


def _aggregation_gradients(
    grad_output: Tensor, x: Tensor, kernels: Tensor, branch: KernelBranch, needs_x: bool
) -> tuple[Tensor | None, Tensor]:
    """(grad_x, ``None`` without ``needs_x``; grad_kernels in the kernels' layout) of the
    aggregation."""
    if registration.use_eager_path(x, kernels):
        grad_x, grad_kernels = registration.gradients(
            grad_output, x, kernels, branch.conv_args, (needs_x, True)
        )
        return grad_x, kernels_like(grad_kernels, kernels)
    return registration.aggregation_gradients(
        grad_output, x, kernels, branch.conv_args, needs_x, True
    )


def regenerate_involution2d(layer: nn.Module, x: Tensor, backend: str) -> Tensor:
    """``layer(x)`` in training through :class:`RegeneratedInvolution2d` (requires
    ``layer.regeneration_applies()``), the norm's running statistics updated once.

    ``backend`` is the concrete aggregation backend. Shapes as
    :class:`~involution.ops.Involution2d`.
    """
    tensors, branch, batch_stats = layer_inputs(layer, x, backend)
    with autocast_off(x):
        output, mean, invstd = RegeneratedInvolution2d.apply(branch, *tensors)
    if batch_stats:
        update_running_stats(
            layer.norm, mean, invstd, output.shape[0] * output.shape[2] * output.shape[3]
        )
    return output


def layer_inputs(layer: nn.Module, x: Tensor, backend: str) -> tuple[tuple, KernelBranch, bool]:
    """(the layer's tensors for ``layer(x)`` (:data:`LAYER_TENSORS`), its
    :class:`KernelBranch`, whether the kernel branch's norm uses batch statistics): the
    arguments of :class:`RegeneratedInvolution2d`.

    Under autocast the input and the convs' parameters are cast to the autocast dtype (as the
    convs and the op cast them on the kept path), the BatchNorm's parameters are not.
    """
    norm = layer.norm
    # torchvision's FrozenBatchNorm2d is an eval-mode BatchNorm whose affine is buffers.
    batch_norm = type(norm) is nn.BatchNorm2d or is_frozen_batchnorm(norm)
    batch_stats = batch_statistics_norm(norm)
    running = None
    if batch_norm and not batch_stats:
        running = torch.stack([norm.running_mean, norm.running_var])
    x_cast, reduce_weight, span_weight, span_bias = autocast(
        x, layer.reduce.weight, layer.span.weight, layer.span.bias
    )
    check_dtypes(input=x_cast, weight=span_weight)
    branch = KernelBranch(
        kernel_size=layer.kernel_size,
        groups=layer.groups,
        stride=layer.stride,
        dilation=layer.dilation,
        eps=norm.eps if batch_norm else None,
        backend=backend,
    )
    if batch_stats:
        check_batch_size(x, layer.stride)
    tensors = (
        x_cast,
        reduce_weight,
        norm.weight if batch_norm else None,
        norm.bias if batch_norm else None,
        running,
        span_weight,
        span_bias,
    )
    return tensors, branch, batch_stats


def autocast_off(x: Tensor) -> AbstractContextManager:
    """Autocast disabled on ``x``'s device (a no-op context on the meta device): the
    regenerating ops get their tensors already cast."""
    device_type = x.device.type
    if device_type == "meta":
        return nullcontext()
    return torch.autocast(device_type, enabled=False)


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is torchvision's ``FrozenBatchNorm2d`` (exactly), without importing
    torchvision for it: no instance exists before torchvision is imported."""
    misc = sys.modules.get("torchvision.ops.misc")
    return misc is not None and type(module) is misc.FrozenBatchNorm2d


def batch_statistics_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` is a plain ``nn.BatchNorm2d`` normalising with the batch's statistics
    (training, or without running statistics)."""
    return type(norm) is nn.BatchNorm2d and (norm.training or norm.running_mean is None)


def batch_norm_relu(norm: nn.Module, act: nn.Module) -> bool:
    """Whether ``act(norm(x))`` is what the fused training ops compute in place of the modules:
    :func:`batch_statistics_norm`, ``act`` ``nn.ReLU``, and no hooks on either (they expect a
    call each)."""
    return (
        batch_statistics_norm(norm)
        and type(act) is nn.ReLU
        and not any(m._forward_hooks or m._forward_pre_hooks for m in (norm, act))
    )


def check_batch_size(x: Tensor, stride: int) -> None:
    """``nn.BatchNorm2d``'s check: more than one value per channel in training."""
    height, width = (-(-size // stride) for size in x.shape[2:])
    if x.shape[0] * height * width == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{torch.Size([x.shape[0], -1, height, width])} in the kernel branch"
        )


@torch.no_grad()
def update_running_stats(norm: nn.BatchNorm2d, mean: Tensor, invstd: Tensor, count: int) -> None:
    """Update ``norm``'s running statistics with a batch's ``mean`` and ``invstd`` (M,) over
    ``count`` values per channel, as ``nn.BatchNorm2d.forward`` does in training: the step
    counter, then the momentum (or cumulative) average with the unbiased variance."""
    if not norm.track_running_stats or norm.running_mean is None:
        return
    factor: float | Tensor = 0.0 if norm.momentum is None else norm.momentum
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # the cumulative moving average
            factor = 1.0 / norm.num_batches_tracked
    variance = (invstd.double().pow(-2) - norm.eps).clamp_(min=0) * (count / (count - 1))
    norm.running_mean.mul_(1 - factor).add_(factor * mean.to(norm.running_mean.dtype))
    norm.running_var.mul_(1 - factor).add_(factor * variance.to(norm.running_var.dtype))


def _branch_buffers(layer: nn.Module) -> list[Tensor]:
    return [buffer for buffer in layer.buffers() if buffer is not None]


def recompute_layer(layer: nn.Module, forward: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``forward(x)`` (the layer's kept-kernel path) with activation checkpointing: autograd
    keeps ``x`` only and runs ``forward`` again in backward. ``layer``'s buffers (a norm's
    running statistics and step counter) are restored after that second run, so they are
    updated once."""

    @contextmanager
    def restoring() -> Iterator[None]:
        buffers = _branch_buffers(layer)
        saved = [buffer.clone() for buffer in buffers]
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in zip(buffers, saved, strict=True):
                    buffer.copy_(value)

    return checkpoint(
        forward,
        x,
        use_reentrant=False,
        context_fn=lambda: (nullcontext(), restoring()),
        preserve_rng_state=False,
    )
