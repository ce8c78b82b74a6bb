"""``Involution2d``: kernel generation plus aggregation, as in the paper and the official code.

In eval mode without gradients on the ``"cpu"`` backend, the layer runs as one fused inference
op (:func:`~involution.ops.involution2d_layer`). :class:`Involution2dAffine` adds a following
per-channel affine (a folded BatchNorm) and ReLU to that op, for
:func:`involution.models.fold_batchnorm`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from involution.ops.backends import resolve_backend
from involution.ops.branch import KernelBranchLayer
from involution.ops.functional import (
    involution2d,
    involution2d_fused,
    layer_forward,
    prepare_layer,
)
from involution.ops.layer import LayerArguments, LayerRun
from involution.ops.layout import tensor_states
from involution.ops.lowering import exporting_to_onnx, involution2d_lowered
from involution.ops.regenerate import (
    is_frozen_batchnorm,
    recompute_layer,
    regenerate_involution2d,
)

# FX symbolic tracing (torch.fx, torchvision's and timm's feature extraction) records each call
# of the front doors from this module as one node, instead of tracing into their checks.
torch.fx.wrap("involution2d")
torch.fx.wrap("involution2d_fused")

LayerFactory = Callable[[int], nn.Module]

#: Official (d-li14/involution, mmcv ``ConvModule``) state-dict prefixes -> ours.
OFFICIAL_KEY_PREFIXES: dict[str, str] = {
    "conv1.conv.": "reduce.",
    "conv1.bn.": "norm.",
    "conv2.conv.": "span.",
}


def batchnorm_affine(norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """An eval-mode BatchNorm as ``y = scale * x + shift``: (scale, shift), each (C,).

    Raises ``ValueError`` for a BatchNorm without running statistics (it normalises with the
    batch's statistics even in eval mode, which no fixed affine reproduces).
    """
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError(f"{norm} has no running statistics: it cannot be folded")
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale, shift


def _is_foldable_norm(norm: nn.Module) -> bool:
    """Identity (already folded) or a BatchNorm2d in eval mode with running statistics."""
    if type(norm) is nn.Identity:
        return True
    return (
        isinstance(norm, nn.BatchNorm2d)
        and not norm.training
        and norm.running_mean is not None
        and norm.running_var is not None
    )


def convert_official_involution_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename the keys of an official ``involution`` module's state dict to ours.

    Raises ``KeyError`` naming any key that has no counterpart.
    """
    converted = {}
    for key, value in state_dict.items():
        prefix = next((p for p in OFFICIAL_KEY_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise KeyError(f"unexpected key {key!r} in an official involution state dict")
        converted[OFFICIAL_KEY_PREFIXES[prefix] + key[len(prefix) :]] = value
    return converted


#: The default activation factory of the involution layers and RedNet: a ReLU that overwrites
#: its input (one activation-sized allocation less per call).
relu_inplace: Callable[[], nn.Module] = partial(nn.ReLU, inplace=True)


class Involution2d(KernelBranchLayer):
    r"""Involution layer (Li et al., CVPR 2021).

    For every output pixel a Kx K kernel per group is generated from that pixel's features,

    .. math:: H = W_1\,\sigma(\mathrm{norm}(W_0\,X_{i,j})),\quad
              W_0: C \to C/r,\; W_1: C/r \to G K^2,

    and shared by the ``group_channels`` channels of its group. With ``stride > 1`` the kernel
    branch sees the input average-pooled by ``stride`` (ceil mode, so odd sizes match the
    aggregation's output size; identical to the official floor-mode pooling on even sizes).

    Submodules (official name in brackets): ``reduce`` 1x1 conv without bias (``conv1.conv``),
    ``norm`` (``conv1.bn``), ``act``, ``span`` 1x1 conv with bias (``conv2.conv``), ``pool``.

    Args:
        channels: C, input and output channels.
        kernel_size: K, odd (even kernels: use :func:`involution.ops.involution2d` with an
            explicit padding).
        stride: aggregation stride.
        dilation: aggregation dilation; padding is ``dilation * (K - 1) // 2``.
        group_channels: channels sharing one kernel; ``G = C // group_channels``.
        reduction_ratio: r, the kernel branch's bottleneck ratio (C -> C // r).
        norm_layer, act_layer: factories for the kernel branch's normalisation and activation
            (BatchNorm2d, in-place ReLU).
        backend: aggregation backend, see :func:`involution.ops.involution2d`.
        fused: fuse the span conv into the aggregation
            (:func:`involution.ops.involution2d_fused`), so the per-pixel kernels are never
            stored. Opt-in: on an H100 it lowered RedNet-50's peak training memory (6.5 vs
            7.5 GiB at batch 128) but ran slower (inference 2,688 vs 5,002 images/s). The state
            dict is the same either way.

    Switches (class attributes, set on an instance to change one layer):

    - ``fuse_inference`` (``True``): in eval mode with gradients disabled, on the ``"cpu"``
      backend (CPU, float32/float64), with a BatchNorm2d (or an identity) as ``norm`` and ReLU
      as ``act``, compute the whole layer in one op (:meth:`forward_layer`): the kernel tensor
      is never stored, and the output is the same within float rounding. ``False`` e.g. to time
      both paths.
    - ``exportable`` (``False``): aggregate with standard PyTorch operators only
      (:func:`involution.ops.lowering.involution2d_lowered`), for tracers and exporters that
      cannot run the custom op (``torch.jit.trace``, ``torch.export`` for other runtimes);
      slower. timm's ``set_layer_config(exportable=True)`` sets it in RedNet.
      ``torch.onnx.export`` lowers the op without it.

    Training (``regenerate_kernels``, a class attribute, ``True``): with gradients enabled in
    training mode the layer keeps only its input (and the kernel branch's BatchNorm batch
    statistics) for backward and regenerates the kernels there
    (:mod:`involution.ops.regenerate`): RedNet-50 then keeps 1.08x ResNet-50's activations
    for backward instead of 1.33x (``involution bench memory``, batch 8, 224 px, float32).
    Same outputs and gradients within rounding; the running statistics are updated once. A
    kernel branch other than as built (another norm or activation, a subclass) is checkpointed
    instead, in eager mode; one with hooks on its modules, and FX-traced copies, keep the
    kernels.
    Set ``layer.regenerate_kernels = False`` (or :func:`set_kernel_regeneration` on a model)
    for the kept-kernel path; ``fused`` and ``exportable`` layers keep their own paths.

    Followed by a BatchNorm2d and a ReLU (``fuse_norm_act``, a class attribute, ``True``): where
    a model calls the three through :func:`~involution.ops.regenerate_norm_act.
    involution_norm_act` (RedNet's bottlenecks and stem), in training with regenerated kernels
    and batch statistics, they run as one op that keeps the layer's input and the ReLU's output
    only, not the involution's output (the BatchNorm's input), which backward regenerates
    (:mod:`involution.ops.regenerate_norm_act`); RedNet's stem runs as one op that keeps its
    input only (:mod:`involution.ops.regenerate_stem`), and its last BatchNorm + ReLU with the
    max pool as another (:mod:`involution.models.pooling`): RedNet-50 then keeps 0.88x
    ResNet-50's activations. ``layer.fuse_norm_act = False`` (or
    ``set_kernel_regeneration(model, True, fuse_norm_act=False)``) keeps the BatchNorm and the
    ReLU as modules.

    TorchScript (``torch.jit.script``) and FX (``torch.fx.symbolic_trace``) see the kernel
    branch and one call of the op (:func:`~involution.ops.involution2d` or
    :func:`~involution.ops.involution2d_fused`).

    Shape:
        input (B, C, H, W) -> output (B, C, ceil(H / stride), ceil(W / stride)).
    """

    # The switches below are class attributes, not constructor arguments, so modules pickled
    # before they existed have them too. Unannotated: TorchScript would read a (postponed,
    # string) class annotation for an instance that sets one, and cannot resolve it.
    #: Regenerate the kernels in backward when training (see above).
    regenerate_kernels = True
    #: Fuse a following BatchNorm2d + ReLU into the regenerating training op (see above).
    fuse_norm_act = True
    #: The fused CPU inference op (see above).
    fuse_inference = True
    #: Standard operators only (see above).
    exportable = False

    # The layer's hyper-parameters are its public keyword arguments, as nn.Conv2d's are (the
    # official checkpoints' builders pass them by name).
    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        stride: int = 1,
        dilation: int = 1,
        group_channels: int = 16,
        reduction_ratio: int = 4,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: Callable[[], nn.Module] = relu_inplace,
        backend: str = "auto",
        fused: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("channels", channels),
            ("kernel_size", kernel_size),
            ("stride", stride),
            ("dilation", dilation),
            ("group_channels", group_channels),
            ("reduction_ratio", reduction_ratio),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size must be odd for Involution2d, got {kernel_size}; for even kernels "
                "call involution.ops.involution2d with an explicit padding"
            )
        layers = (nn.Conv2d, nn.AvgPool2d, norm_layer, act_layer)
        args = (channels, kernel_size, stride, dilation, group_channels, reduction_ratio)
        self._init_kernel_branch(*args, layers, backend)
        self.fused = fused
        # (key, run) of the fused inference op prepared for the last call (see forward_layer).
        self._prepared_layer: tuple[tuple, LayerRun] | None = None

    def reduce_features(self, x: Tensor) -> Tensor:
        """The kernel branch before the span conv: (B, C, H, W) -> (B, C/r, H_out, W_out)."""
        return self.act(self.norm(self.reduce(self.pool(x))))

    def generate_kernels(self, x: Tensor) -> Tensor:
        """Per-pixel kernels (B, G, K, K, H_out, W_out) for input ``x`` (B, C, H, W)."""
        k = self.kernel_size
        # The span conv module itself (not its weights), so that its forward hooks see the
        # kernels (involution.visualize.kernels) and tracers record a module call.
        return self.span(self.reduce_features(x)).unflatten(1, [self.groups, k, k])

    def layer_inference_applies(self, x: Tensor, backend: str) -> bool:
        """Whether :meth:`forward` runs the fused inference op (see ``fuse_inference``)."""
        return (
            self.fuse_inference
            and not self.training
            and not torch.is_grad_enabled()
            and backend == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and type(self.act) is nn.ReLU
            and _is_foldable_norm(self.norm)
            and not exporting_to_onnx()  # ONNX has no custom op: the lowered layer
        )

    def regeneration_applies(self) -> bool:
        """Whether the kernel branch is as built, so :func:`~involution.ops.regenerate.
        regenerate_involution2d` computes the layer: average pool (or identity), 1x1 convs
        without a reduce bias, a plain ``nn.BatchNorm2d``, torchvision's ``FrozenBatchNorm2d``
        (or identity), ReLU,
        ``generate_kernels`` and ``reduce_features`` not overridden."""
        cls = type(self)
        return (
            type(self.pool) in (nn.AvgPool2d, nn.Identity)
            and type(self.reduce) is nn.Conv2d
            and self.reduce.bias is None
            and type(self.span) is nn.Conv2d
            and type(self.act) is nn.ReLU
            and (type(self.norm) in (nn.BatchNorm2d, nn.Identity) or is_frozen_batchnorm(self.norm))
            and cls.generate_kernels is Involution2d.generate_kernels
            and cls.reduce_features is Involution2d.reduce_features
        )

    def training_regenerates(self) -> bool:
        """Whether a call now keeps only the input for backward (see ``regenerate_kernels``):
        training with gradients, switched on, not ``fused`` or ``exportable``, no hooks on the
        kernel branch's modules (they expect one call each)."""
        submodules = (self.pool, self.reduce, self.norm, self.act, self.span)
        return (
            self.regenerate_kernels
            and self.training
            and torch.is_grad_enabled()
            and not self.fused
            and not self.exportable
            and not exporting_to_onnx()
            and not any(m._forward_hooks or m._forward_pre_hooks for m in submodules)
        )

    def forward_training(self, x: Tensor) -> Tensor | None:
        """The layer keeping only ``x`` for backward (see ``regenerate_kernels``), or ``None``
        where that does not apply (not training, gradients disabled, switched off, ``fused`` or
        ``exportable``, hooks on the kernel branch's modules, which expect one call each, or a
        kernel branch that only checkpointing handles under ``torch.compile``)."""
        if not self.training_regenerates():
            return None
        if self.regeneration_applies():
            return regenerate_involution2d(self, x, resolve_backend(self.backend, x.device))
        if torch.compiler.is_compiling():
            return None  # the compiler's partitioner decides what is kept
        return recompute_layer(self, self.forward_kept, x)

    def layer_inference_backend(self, x: Tensor) -> str | None:
        """The concrete backend when :meth:`forward` runs the fused inference op on ``x``, else
        ``None``. The backend is resolved only in eval mode without gradients: once per call."""
        if self.training or torch.is_grad_enabled() or not self.fuse_inference:
            return None
        backend = resolve_backend(self.backend, x.device)
        return backend if self.layer_inference_applies(x, backend) else None

    def folded_reduce(self) -> tuple[Tensor, Tensor | None]:
        """The reduce conv with the eval-mode ``norm`` folded in: weight (C/r, C, 1, 1), bias
        (C/r,). With ``norm`` already folded (an identity), the conv's own parameters."""
        weight = self.reduce.weight
        if type(self.norm) is nn.Identity:
            return weight, self.reduce.bias
        scale, shift = batchnorm_affine(self.norm)
        bias = shift if self.reduce.bias is None else self.reduce.bias * scale + shift
        return weight * scale[:, None, None, None], bias

    def forward_layer(
        self,
        x: Tensor,
        backend: str,
        out_scale: Tensor | None = None,
        out_shift: Tensor | None = None,
        out_relu: bool = False,
        projection: nn.Conv2d | None = None,
        residual: Tensor | None = None,
        proj_relu: bool = False,
    ) -> Tensor:
        """The whole layer as one inference op, with an optional per-channel affine + ReLU after,
        then optionally a 1x1 ``projection`` conv, + ``residual``, ReLU (``proj_relu``).

        Requires :meth:`layer_inference_applies`; (B, C, H, W) -> (B, C, H_out, W_out), or
        (B, P, H_out, W_out) with a projection to P channels. In eager mode the op is checked
        and prepared (:func:`~involution.ops.functional.prepare_layer`) once per
        input shape, dtype and device, and again when a parameter or buffer involved changes:
        the checks took ~30 µs per call, as long as the op itself on 7x7 maps at batch 1.
        """
        projection_weights = (
            (None, None) if projection is None else (projection.weight, projection.bias)
        )
        key = None
        if not torch.compiler.is_compiling():
            norm = self.norm
            norm_state = (
                ()
                if type(norm) is nn.Identity
                else (norm.weight, norm.bias, norm.running_mean, norm.running_var)
            )
            states = tensor_states(
                self.reduce.weight,
                self.reduce.bias,
                *norm_state,
                self.span.weight,
                self.span.bias,
                out_scale,
                out_shift,
                *projection_weights,
            )
            if states is not None:
                key = (
                    x.shape,
                    x.dtype,
                    x.device,
                    None if residual is None else residual.shape,
                    backend,
                    out_relu,
                    proj_relu,
                    getattr(norm, "eps", None),
                    (self.kernel_size, self.stride, self.dilation, self.groups),
                    states,
                )
                prepared = self.__dict__.get("_prepared_layer")  # absent in modules pickled before
                if prepared is not None and prepared[0] == key:
                    return prepared[1](x, residual)
        reduce_weight, reduce_bias = self.folded_reduce()
        arguments = LayerArguments(
            reduce_weight=reduce_weight,
            reduce_bias=reduce_bias,
            span_weight=self.span.weight,
            span_bias=self.span.bias,
            kernel_size=self.kernel_size,
            groups=self.groups,
            stride=self.stride,
            dilation=self.dilation,
            out_scale=out_scale,
            out_shift=out_shift,
            out_relu=out_relu,
            backend=backend,
            proj_weight=projection_weights[0],
            proj_bias=projection_weights[1],
            residual=residual,
            proj_relu=proj_relu,
        )
        run = None if key is None else prepare_layer(x, arguments)
        if run is None:  # not in plain eager mode, or parameters without version counters
            return layer_forward(x, arguments)
        self._prepared_layer = (key, run)
        return run(x, residual)

    def __getstate__(self) -> dict:
        # The prepared op is a cache holding packed copies of the parameters: not copied.
        state = self.__dict__.copy()
        state["_prepared_layer"] = None
        return state

    def forward(self, x: Tensor) -> Tensor:
        # TorchScript compiles only the kernel branch and the op (the last line): it skips a
        # block only on a bare is_scripting() test, and it sees no class attributes (the
        # switches). The fused inference op depends on run-time state (grad mode, dtype,
        # device) that TorchScript and FX tracing cannot capture: they record the layer below.
        if not torch.jit.is_scripting():
            if self.exportable:
                padding = self.dilation * (self.kernel_size - 1) // 2
                return involution2d_lowered(
                    x,
                    self.generate_kernels(x),
                    (self.stride, self.stride),
                    (padding, padding),
                    (self.dilation, self.dilation),
                )
            if not isinstance(x, torch.fx.Proxy):
                backend = self.layer_inference_backend(x)
                if backend is not None:
                    return self.forward_layer(x, backend)
                output = self.forward_training(x)
                if output is not None:
                    return output
        return self.forward_kept(x)

    def forward_kept(self, x: Tensor) -> Tensor:
        """The kernel branch's modules, then the op (:func:`~involution.ops.involution2d`, or
        :func:`~involution.ops.involution2d_fused` when ``fused``): autograd keeps the kernels.
        """
        if not self.fused:
            return involution2d(
                x,
                self.generate_kernels(x),
                stride=self.stride,
                dilation=self.dilation,
                backend=self.backend,
            )
        return involution2d_fused(
            x,
            self.reduce_features(x),
            self.span.weight,
            self.span.bias,
            self.kernel_size,
            self.groups,
            stride=self.stride,
            dilation=self.dilation,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"dilation={self.dilation}, groups={self.groups}"
        )


def set_kernel_regeneration(
    model: nn.Module, enabled: bool, fuse_norm_act: bool | None = None
) -> nn.Module:
    """Set ``regenerate_kernels`` on every involution layer of ``model`` (returned; 1-D, 2-D
    and 3-D): the switch between regenerating the kernels in backward (default) and keeping
    them; and ``fuse_norm_act`` of every :class:`Involution2d` unless ``None`` (a following
    BatchNorm + ReLU in the regenerating op)."""
    for module in model.modules():
        if isinstance(module, KernelBranchLayer):
            module.regenerate_kernels = enabled
            if fuse_norm_act is not None and isinstance(module, Involution2d):
                module.fuse_norm_act = fuse_norm_act
    return model


class Involution2dAffine(nn.Module):
    """An :class:`Involution2d` followed by a fixed per-channel affine and an activation.

    ``out = act(scale * involution(x) + shift)``: what :func:`involution.models.fold_batchnorm`
    makes of an involution followed by an eval-mode BatchNorm (and ReLU). Where the
    involution's fused inference op applies (:meth:`Involution2d.layer_inference_applies`) and
    ``act`` is ReLU or the identity, the affine and the ReLU run inside that op, on each output
    pixel while it is in registers; otherwise step by step.

    Shape:
        (B, C, H, W) -> (B, C, H_out, W_out), as the involution.
    """

    def __init__(
        self, involution: Involution2d, scale: Tensor, shift: Tensor, act: nn.Module | None = None
    ) -> None:
        super().__init__()
        channels = involution.channels
        for name, value in (("scale", scale), ("shift", shift)):
            if tuple(value.shape) != (channels,):
                raise ValueError(
                    f"{name} must have shape ({channels},) for {involution}, "
                    f"got {tuple(value.shape)}"
                )
        self.involution = involution
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())
        self.act = nn.Identity() if act is None else act

    @classmethod
    def from_batchnorm(
        cls, involution: Involution2d, norm: nn.BatchNorm2d, act: nn.Module | None = None
    ) -> Involution2dAffine:
        """``act(norm(involution(x)))`` with the eval-mode ``norm`` as the affine."""
        with torch.no_grad():
            scale, shift = batchnorm_affine(norm)
        return cls(involution, scale, shift, act)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_projected(x)

    def forward_projected(
        self,
        x: Tensor,
        projection: nn.Conv2d | None = None,
        residual: Tensor | None = None,
        proj_relu: bool = False,
    ) -> Tensor:
        """``relu?(projection(self(x)) + residual)`` (the rest of a bottleneck after its
        spatial layer: its last 1x1 conv with the BatchNorm folded in, the shortcut, the ReLU),
        in the fused op when it applies; ``self(x)`` without ``projection``."""
        if projection is not None and not (
            projection.kernel_size == (1, 1)
            and projection.stride == (1, 1)
            and projection.padding in ((0, 0), "valid")
            and projection.groups == 1
        ):
            raise ValueError(f"projection must be a plain 1x1 conv, got {projection}")
        relu = type(self.act) is nn.ReLU
        backend = self.involution.layer_inference_backend(x)
        if (relu or type(self.act) is nn.Identity) and backend is not None:
            return self.involution.forward_layer(
                x, backend, self.scale, self.shift, relu, projection, residual, proj_relu
            )
        y = self.act(self.involution(x) * self.scale[:, None, None] + self.shift[:, None, None])
        if projection is None:
            return y
        y = projection(y) if residual is None else projection(y) + residual
        return torch.relu(y) if proj_relu else y
