"""The front doors of the involution operator: :func:`involution2d`, :func:`involution2d_fused`
and, for inference, the whole layer :func:`involution2d_layer` (checked and prepared once for
repeated eager calls: :func:`prepare_involution2d_layer`).

Each checks its arguments (:mod:`involution.ops.checks`), applies autocast, resolves the backend
once and calls the registered ops (:mod:`involution.ops.registration`); the layer op's checks
give one :class:`~involution.ops.layer.Involution2dLayerSpec` (:func:`layer_spec`).
:func:`generate_kernels` is the span conv that turns reduced features into per-pixel kernels.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from involution.ops import registration
from involution.ops.backends import resolve_backend
from involution.ops.checks import (
    IntOrPair,
    as_pair,
    autocast,
    check_backend,
    check_dtypes,
    check_groups,
    check_rank,
    check_tensors,
    geometry,
)
from involution.ops.layer import Involution2dLayerSpec, LayerArguments, LayerRun
from involution.ops.layout import Pair, generate_kernels
from involution.ops.lowering import exporting_to_onnx

__all__ = [
    "generate_kernels",
    "involution2d",
    "involution2d_fused",
    "involution2d_layer",
    "prepare_involution2d_layer",
]


def involution2d(
    input: Tensor,
    weight: Tensor,
    stride: IntOrPair = 1,
    padding: IntOrPair | None = None,
    dilation: IntOrPair = 1,
    backend: str = "auto",
) -> Tensor:
    r"""Aggregate ``input`` with spatially varying, channel-shared kernels (involution).

    .. math::
        y[b, c, i, j] = \sum_{u, v} W[b, g(c), u, v, i, j]\,
                        x[b, c, i s_h + u d_h - p_h, j s_w + v d_w - p_w]

    with zero padding and contiguous groups, ``g(c) = c // (C // G)``, as in the official code.

    Args:
        input: (B, C, H, W) features. Any memory format; channels_last gives channels_last out.
        weight: (B, G, Kh, Kw, H_out, W_out) per-pixel kernels, one per group and output pixel.
            ``G`` must divide ``C``. ``weight.view(B, G*Kh*Kw, H_out, W_out)`` is the official
            kernel-channel order ``g*K*K + kh*K + kw``.
        stride: int or (sh, sw), each >= 1.
        padding: int or (ph, pw), each >= 0. ``None`` means ``d*(K-1)//2`` per dimension.
        dilation: int or (dh, dw), each >= 1.
        backend: ``"auto"`` (by device), ``"reference"`` (unfold), ``"cpu"`` (fast CPU path) or
            ``"triton"`` (CUDA kernels).

    Returns:
        (B, C, H_out, W_out) with ``H_out = floor((H + 2p - d(K-1) - 1) / s) + 1``.

    Half-precision inputs accumulate in float32. Under autocast both tensors are cast to the
    autocast dtype. Differentiable with respect to ``input`` and ``weight``.

    Outside eager PyTorch: ``torch.compile``, ``torch.export`` and ``torch.onnx.export`` see
    the custom op ``torch.ops.involution.involution2d`` (the latter translates it to ONNX
    operators, :mod:`involution.ops.onnx_translation`); TorchScript calls it directly (without
    these checks, ``backend="auto"`` resolved per call).
    """
    if torch.jit.is_scripting():  # the registered op, called directly
        dilation_hw = _int_list(dilation)
        kernel = [weight.shape[2], weight.shape[3]]
        return torch.ops.involution.involution2d(
            input,
            weight,
            _int_list(stride),
            _scripted_padding(padding, kernel, dilation_hw),
            dilation_hw,
            backend,
        )
    else:
        return _checked_involution2d(input, weight, stride, padding, dilation, backend)


def _checked_involution2d(
    input: Tensor,
    weight: Tensor,
    stride: IntOrPair,
    padding: IntOrPair | None,
    dilation: IntOrPair,
    backend: str,
) -> Tensor:
    """:func:`involution2d` in Python: check, autocast, then the eager path or the custom op."""
    check_tensors(input=input, weight=weight)
    check_rank("input", input, ("B", "C", "H", "W"))
    check_rank("weight", weight, ("B", "G", "Kh", "Kw", "H_out", "W_out"))
    check_backend(backend)
    batch, channels, height, width = input.shape
    w_batch, groups, kernel_h, kernel_w, out_h, out_w = weight.shape
    shapes = f"input {tuple(input.shape)}, weight {tuple(weight.shape)}"
    geo = geometry((height, width), (kernel_h, kernel_w), stride, padding, dilation)
    if w_batch != batch:
        raise ValueError(f"weight batch {w_batch} does not match input batch {batch} ({shapes})")
    check_groups(groups, channels, shapes)
    if (out_h, out_w) != geo.out_size:
        raise ValueError(
            f"weight spatial size {(out_h, out_w)} does not match the output size {geo.out_size} "
            f"of input {(height, width)} with kernel {(kernel_h, kernel_w)}, stride "
            f"{geo.stride}, padding {geo.padding}, dilation {geo.dilation}"
        )
    input, weight = autocast(input, weight)
    check_dtypes(input=input, weight=weight)

    concrete = resolve_backend(backend, input.device)
    args = (input, weight, geo.stride, geo.padding, geo.dilation, concrete)
    if registration.use_eager_path(input, weight):
        return registration.EagerInvolution2d.apply(*args)
    return registration.involution2d_op(*args)


def involution2d_fused(
    input: Tensor,
    reduced: Tensor,
    span_weight: Tensor,
    span_bias: Tensor | None,
    kernel_size: IntOrPair,
    groups: int,
    stride: IntOrPair = 1,
    padding: IntOrPair | None = None,
    dilation: IntOrPair = 1,
    backend: str = "auto",
) -> Tensor:
    """Involution whose kernels are the span conv of ``reduced``, fused into the aggregation.

    Equal (within rounding) to ``involution2d(input, W, stride, padding, dilation)`` with
    ``W = generate_kernels(reduced, span_weight, span_bias, kernel_size, groups)``, but on a
    backend with a fused forward (``"triton"``) ``W`` is never stored, and in every case autograd
    saves only the arguments and recomputes ``W`` in the backward. Differentiable with respect to
    ``input``, ``reduced``, ``span_weight`` and ``span_bias``.

    In :class:`~involution.ops.Involution2d` the span conv turns the reduced features (C/r
    channels) into G*K*K kernel channels, about three times the activation size for K=7 and 16
    channels per group, which the unfused path writes, reads back and keeps for the backward.

    Args:
        input: (B, C, H, W) features, NCHW or channels_last.
        reduced: (B, R, H_out, W_out) kernel-branch features (after reduce, norm, activation).
        span_weight: (G*Kh*Kw, R) or the conv layout (G*Kh*Kw, R, 1, 1).
        span_bias: (G*Kh*Kw,) or ``None``.
        kernel_size: int or (Kh, Kw).
        groups: G, dividing C.
        stride, padding, dilation, backend: as in :func:`involution2d`.

    Returns:
        (B, C, H_out, W_out), in the memory format of ``input``.

    TorchScript as for :func:`involution2d`; ONNX export computes the kernels, then
    :func:`involution2d`'s op.
    """
    if torch.jit.is_scripting():  # the registered op, called directly
        kernel = _int_list(kernel_size)
        dilation_hw = _int_list(dilation)
        return torch.ops.involution.involution2d_fused(
            input,
            reduced,
            span_weight.flatten(1),
            span_bias,
            kernel,
            _int_list(stride),
            _scripted_padding(padding, kernel, dilation_hw),
            dilation_hw,
            groups,
            backend,
        )
    else:
        return _checked_involution2d_fused(
            input,
            reduced,
            span_weight,
            span_bias,
            kernel_size,
            groups,
            stride,
            padding,
            dilation,
            backend,
        )


def _checked_involution2d_fused(
    input: Tensor,
    reduced: Tensor,
    span_weight: Tensor,
    span_bias: Tensor | None,
    kernel_size: IntOrPair,
    groups: int,
    stride: IntOrPair,
    padding: IntOrPair | None,
    dilation: IntOrPair,
    backend: str,
) -> Tensor:
    """:func:`involution2d_fused` in Python: check, autocast, then the custom op."""
    check_tensors(input=input, reduced=reduced, span_weight=span_weight, span_bias=span_bias)
    check_backend(backend)
    check_rank("input", input, ("B", "C", "H", "W"))
    check_rank("reduced", reduced, ("B", "R", "H_out", "W_out"))
    if span_weight.dim() == 4 and span_weight.shape[2:] == (1, 1):
        span_weight = span_weight.flatten(1)
    kernel_hw = as_pair("kernel_size", kernel_size)
    batch, channels, height, width = input.shape
    shapes = f"input {tuple(input.shape)}, reduced {tuple(reduced.shape)}"
    geo = geometry((height, width), kernel_hw, stride, padding, dilation)
    check_groups(groups, channels, shapes)
    rows = groups * kernel_hw[0] * kernel_hw[1]
    if tuple(span_weight.shape) != (rows, reduced.shape[1]):
        raise ValueError(
            f"span_weight must have shape (G*Kh*Kw, R) = {(rows, reduced.shape[1])}, got "
            f"{tuple(span_weight.shape)}"
        )
    if span_bias is not None and tuple(span_bias.shape) != (rows,):
        raise ValueError(f"span_bias must have shape ({rows},), got {tuple(span_bias.shape)}")
    if tuple(reduced.shape) != (batch, reduced.shape[1], *geo.out_size):
        raise ValueError(
            f"reduced must have shape (B={batch}, R, H_out, W_out={geo.out_size}), "
            f"got {tuple(reduced.shape)}"
        )
    input, reduced, span_weight, span_bias = autocast(input, reduced, span_weight, span_bias)
    check_dtypes(input=input, reduced=reduced, span_weight=span_weight, span_bias=span_bias)

    backend = resolve_backend(backend, input.device)
    if exporting_to_onnx():  # the plain op has an ONNX translation
        kernels = generate_kernels(reduced, span_weight, span_bias, kernel_hw, groups)
        return registration.involution2d_op(
            input, kernels, geo.stride, geo.padding, geo.dilation, backend
        )
    return registration.involution2d_fused_op(
        input,
        reduced,
        span_weight,
        span_bias,
        kernel_hw,
        geo.stride,
        geo.padding,
        geo.dilation,
        groups,
        backend,
    )


def _int_list(value: IntOrPair) -> list[int]:
    """An int or pair as the op schemas' int list (TorchScript's counterpart of ``as_pair``)."""
    if isinstance(value, int):
        return [value, value]
    return [value[0], value[1]]


def _scripted_padding(padding: IntOrPair | None, kernel: list[int], dilation: list[int]):
    if padding is None:
        return [dilation[0] * (kernel[0] - 1) // 2, dilation[1] * (kernel[1] - 1) // 2]
    return _int_list(padding)


def _as_matrix(name: str, weight: Tensor, rows: int | None, columns: int) -> Tensor:
    """A 1x1 conv weight (rows, columns[, 1, 1]) as a (rows, columns) matrix, shape-checked;
    ``rows=None`` accepts any number of rows."""
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        weight = weight.flatten(1)
    if weight.dim() != 2 or weight.shape[1] != columns or rows not in (None, weight.shape[0]):
        expected = ("R" if rows is None else rows, columns)
        raise ValueError(
            f"{name} must have shape {expected} or {(*expected, 1, 1)}, got {tuple(weight.shape)}"
        )
    return weight


def _check_vector(name: str, vector: Tensor | None, length: int) -> None:
    if vector is not None and tuple(vector.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(vector.shape)}")


def involution2d_layer(input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    r"""The whole :class:`~involution.ops.Involution2d` layer, for inference (no autograd).

    .. math::
        r = \mathrm{ReLU}(W_0\,\mathrm{pool}_s(x) + b_0),\quad
        W = W_1 r + b_1,\quad
        y = \mathrm{involution2d}(x, W),\quad
        \mathrm{out} = [\mathrm{ReLU}](\mathrm{scale}\cdot y + \mathrm{shift}),\quad
        [\,[\mathrm{ReLU}](W_3\,\mathrm{out} + b_3 + \mathrm{residual})\,]

    where :math:`\mathrm{pool}_s` is ``avg_pool2d(kernel=stride, stride, ceil_mode=True)`` (the
    identity for stride 1) and the padding is ``dilation * (K - 1) // 2``. The layer's kernel
    branch norm (an eval-mode BatchNorm) is expected folded into ``reduce_weight`` and
    ``reduce_bias``; ``out_scale``/``out_shift`` carry a following BatchNorm the same way.

    On the ``"cpu"`` backend (float32/float64) one C++ kernel computes all of it per block of
    output pixels, so neither the (B, G*K*K, H_out, W_out) kernels nor the reduced features
    are stored; otherwise the steps run one after another (identical results within rounding).

    Args (after ``input``, positional or by keyword, in this order: those of
    :class:`~involution.ops.layer.LayerArguments`):
        input: (B, C, H, W), NCHW or channels_last (the output follows).
        reduce_weight: (M, C) or (M, C, 1, 1); reduce_bias: (M,) or ``None``.
        span_weight: (G*K*K, M) or (G*K*K, M, 1, 1); span_bias: (G*K*K,) or ``None``.
        kernel_size: K, odd (int or pair).
        groups: G, dividing C.
        stride, dilation: int or pair (default 1).
        out_scale, out_shift: (C,) each, both or neither (default ``None``).
        out_relu: apply ReLU to the layer's output (default ``False``).
        backend: as in :func:`involution2d` (default ``"auto"``).
        proj_weight: (P, C) or (P, C, 1, 1): a 1x1 conv applied to the layer's output (a
            bottleneck's last conv, its BatchNorm folded in), computed on each block of pixels
            while it is in registers on the ``"cpu"`` backend; proj_bias: (P,) or ``None``.
        residual: (B, P, H_out, W_out) added after the projection, or ``None``.
        proj_relu: apply ReLU last (after the projection and the residual).

    Returns:
        (B, C, ceil(H / s_h), ceil(W / s_w)); (B, P, ...) with ``proj_weight``.

    Raises ``RuntimeError`` when gradients are enabled and a tensor requires them: use the
    layer's differentiable path (:class:`~involution.ops.Involution2d` in training mode or
    with gradients enabled) for training.
    """
    return layer_forward(input, LayerArguments(*args, **kwargs))


def prepare_involution2d_layer(input: Tensor, *args: Any, **kwargs: Any) -> LayerRun | None:
    """:func:`involution2d_layer` checked and prepared once, for many calls in eager mode.

    Same arguments and checks as :func:`involution2d_layer`, with ``input`` and ``residual`` as
    examples: returns ``run(input, residual)``, which computes ``involution2d_layer(input, ...,
    residual=residual, ...)`` without checking again, for inputs (B, C, H, W) and residuals
    (B, P, H_out, W_out) of the examples' shapes, dtype and device, with the parameter tensors
    unchanged (the ``"cpu"`` backend packs them once, here). ``None`` where the call would not
    run eagerly (under ``torch.compile``, a dispatch mode, tensor subclasses) or autocast casts
    the input: call :func:`involution2d_layer` there.
    """
    return prepare_layer(input, LayerArguments(*args, **kwargs))


# The two front doors take ``*args, **kwargs`` and bind them through LayerArguments: their
# declared signature is input + the dataclass's fields, for help(), IDEs and the API reference.
_LAYER_PARAMETERS = [
    inspect.Parameter("input", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="Tensor"),
    *inspect.signature(LayerArguments).parameters.values(),
]
involution2d_layer.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    _LAYER_PARAMETERS, return_annotation="Tensor"
)
prepare_involution2d_layer.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    _LAYER_PARAMETERS, return_annotation="LayerRun | None"
)


def layer_forward(input: Tensor, arguments: LayerArguments) -> Tensor:
    """:func:`involution2d_layer` with its arguments after ``input`` gathered: checked into a
    spec (:func:`layer_spec`), then run (the custom op where a tracer needs one)."""
    spec, input, residual = layer_spec(input, arguments)
    return registration.run_layer(spec, input, residual)


def prepare_layer(input: Tensor, arguments: LayerArguments) -> LayerRun | None:
    """:func:`prepare_involution2d_layer` with its arguments after ``input`` gathered."""
    spec, checked, _ = layer_spec(input, arguments)
    if checked is not input or not registration.use_eager_path(input, input):
        return None  # autocast cast the input, or not in plain eager mode
    return registration.prepare_layer(spec)


#: The parameter tensors of the layer op, in the order of its checks and of its schema.
_LAYER_PARAMETERS = (
    "reduce_weight",
    "reduce_bias",
    "span_weight",
    "span_bias",
    "out_scale",
    "out_shift",
    "proj_weight",
    "proj_bias",
)


def layer_spec(
    input: Tensor, arguments: LayerArguments
) -> tuple[Involution2dLayerSpec, Tensor, Tensor | None]:
    """:func:`involution2d_layer`'s checks and autocast, and its backend resolved, once:
    (spec, input, residual), the tensors cast where autocast is on.

    ``input`` (B, C, H, W) and ``arguments.residual`` (B, P, H_out, W_out) or ``None`` are
    the call's (or, for a prepared op, examples of its calls'): the spec holds for inputs of
    the same shape, dtype and device.
    """
    named = {
        "input": input,
        **{name: getattr(arguments, name) for name in _LAYER_PARAMETERS},
        "residual": arguments.residual,
    }
    check_tensors(**named)
    check_backend(arguments.backend)
    check_rank("input", input, ("B", "C", "H", "W"))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in named.values()):
        raise RuntimeError(
            "involution2d_layer is inference-only (no autograd); call it under torch.no_grad() "
            "or torch.inference_mode()"
        )
    kernel_hw = as_pair("kernel_size", arguments.kernel_size)
    if kernel_hw[0] % 2 == 0 or kernel_hw[1] % 2 == 0:
        raise ValueError(f"kernel_size must be odd for involution2d_layer, got {kernel_hw}")
    _, channels, height, width = input.shape
    geo = geometry((height, width), kernel_hw, arguments.stride, None, arguments.dilation)
    check_groups(arguments.groups, channels, f"input {tuple(input.shape)}")
    kernels = arguments.groups * kernel_hw[0] * kernel_hw[1]
    _check_layer_shapes(arguments, input, kernels, geo.out_size)
    # The tensors themselves (not the flattened views): the cpu backend recognises a model's
    # parameters across calls.
    cast = dict(zip(named, autocast(*named.values()), strict=True))
    check_dtypes(**cast)
    spec = Involution2dLayerSpec(
        kernel_size=kernel_hw,
        stride=geo.stride,
        padding=geo.padding,
        dilation=geo.dilation,
        groups=arguments.groups,
        backend=resolve_backend(arguments.backend, input.device),
        out_relu=arguments.out_relu,
        proj_relu=arguments.proj_relu,
        **{name: cast[name] for name in _LAYER_PARAMETERS},
    )
    return spec, cast["input"], cast["residual"]


def _check_layer_shapes(
    arguments: LayerArguments, input: Tensor, kernels: int, out_size: Pair
) -> None:
    """The shapes of the layer op's parameters and residual, for ``input`` (B, C, H, W),
    G*Kh*Kw = ``kernels`` kernel channels and an output of ``out_size`` (H_out, W_out)."""
    channels = input.shape[1]
    reduced = _as_matrix("reduce_weight", arguments.reduce_weight, None, channels).shape[0]
    _as_matrix("span_weight", arguments.span_weight, kernels, reduced)
    _check_vector("reduce_bias", arguments.reduce_bias, reduced)
    _check_vector("span_bias", arguments.span_bias, kernels)
    _check_vector("out_scale", arguments.out_scale, channels)
    _check_vector("out_shift", arguments.out_shift, channels)
    if (arguments.out_scale is None) != (arguments.out_shift is None):
        raise ValueError("out_scale and out_shift must be given together")
    if arguments.proj_weight is None:
        if arguments.proj_bias is not None or arguments.residual is not None or arguments.proj_relu:
            raise ValueError("proj_bias, residual and proj_relu need proj_weight")
        return
    projected = _as_matrix("proj_weight", arguments.proj_weight, None, channels).shape[0]
    _check_vector("proj_bias", arguments.proj_bias, projected)
    expected = (input.shape[0], projected, *out_size)
    residual = arguments.residual
    if residual is not None and tuple(residual.shape) != expected:
        raise ValueError(f"residual must have shape {expected}, got {tuple(residual.shape)}")
