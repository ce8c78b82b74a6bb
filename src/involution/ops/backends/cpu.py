"""The ``"cpu"`` backend: C++ kernels (``involution._C``) parallelised with ``at::parallel_for``.

The kernels read the input in place (no unfolded K*K-times-larger tensor, forward or backward),
read feature maps channels_last so the innermost loop runs over the C/G channels of a group with
unit stride, and give each task its own slice of the result, so they are deterministic. float16
and bfloat16 are computed in float32. See ``src/involution/csrc/involution_cpu.cpp``.

Shapes: ``input`` (B, C, H, W), ``weight`` (B, G, Kh, Kw, H_out, W_out), ``output`` and
``grad_output`` (B, C, H_out, W_out). The output and ``grad_input`` come back in the input's
layout (NCHW or channels_last). The kernels are read, and ``grad_weight`` written, in the weight's
layout when it is pixel-major (the span conv's channels_last output viewed as kernels: no layout
copies in training), else contiguous.

:func:`layer_prepare` gives the whole Involution2d layer for inference in one kernel (see
``src/involution/csrc/involution_layer_cpu.cpp``): the kernel tensor is never stored.
:func:`span_backward` is the training layer's backward through the span conv and the
aggregation with the kernels regenerated per band of rows, likewise never stored whole
(``src/involution/csrc/involution_regen_cpu.cpp``). :func:`average_pool` is the kernel branch's
average pool in training (``src/involution/csrc/pool_cpu.cpp``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from involution.ops.layer import Involution2dLayerSpec, LayerRun
from involution.ops.layout import Pair, memory_format_of, tensor_states

#: Stride, padding or dilation of the 3-D op: (depth, height, width).
Triple = tuple[int, int, int]

try:
    from involution import _C
except ImportError as error:  # not built: the backend reports why instead of failing on import
    _C = None
    _IMPORT_ERROR: str | None = str(error)
else:
    _IMPORT_ERROR = None


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` on CPU when the extension is built, else why the backend cannot run."""
    if device.type != "cpu":
        return f"the cpu backend only runs on CPU tensors, not {device.type}"
    if _C is None:
        return (
            f"the C++ extension involution._C is not built ({_IMPORT_ERROR}); "
            "build it with `pip install --no-build-isolation -e .`"
        )
    return None


def forward(input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair) -> Tensor:
    """(B, C, H, W), (B, G, Kh, Kw, H_out, W_out) -> (B, C, H_out, W_out)."""
    return _C.forward(input, weight, stride, padding, dilation)


def backward_input(
    grad_output: Tensor, input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair
) -> Tensor:
    """Gradient with respect to ``input``: (B, C, H, W)."""
    return _C.backward_input(grad_output, input, weight, stride, padding, dilation)


def backward_weight(
    grad_output: Tensor, input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair
) -> Tensor:
    """Gradient with respect to ``weight``: (B, G, Kh, Kw, H_out, W_out)."""
    return _C.backward_weight(grad_output, input, weight, stride, padding, dilation)


def backward(
    grad_output: Tensor, input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair
) -> tuple[Tensor, Tensor]:
    """Both gradients, sharing the layout conversions of ``grad_output`` and ``input``."""
    return _C.backward(grad_output, input, weight, stride, padding, dilation)


#: reduce_weight -> (key, packed 1x1-conv parameters) for :func:`layer_prepare`.
_PACKED = WeakIdKeyDictionary()


def _packed(*tensors: Tensor | None) -> list[Tensor]:
    """The fused kernel's layout of the 1x1 convs' parameters (``_C.layer_pack`` of reduce
    weight and bias, span weight and bias, projection weight and bias), reused while the same
    tensors are unchanged (same storage and version counter): a model's parameters are packed
    once, not on every call. Inference tensors (no version counter, e.g. a BatchNorm folded on
    the fly under ``inference_mode``) are packed on every call."""
    reduce_weight = tensors[0]
    key = tensor_states(*tensors)
    if key is None:
        return _C.layer_pack(*tensors)
    cached = _PACKED.get(reduce_weight)
    if cached is None or cached[0] != key:
        cached = (key, _C.layer_pack(*tensors))
        _PACKED[reduce_weight] = cached
    return cached[1]


def layer_prepare(spec: Involution2dLayerSpec) -> LayerRun | None:
    """The whole layer of ``spec`` for inference as ``run(input, residual)``: (B, C, H, W) ->
    (B, C, H_out, W_out) in the input's layout, or (B, P, H_out, W_out) with a projection (plus
    ``residual`` (B, P, H_out, W_out) or ``None``); the parameters are packed here, once for all
    the calls of ``run``.

    float32 and float64 only (the parameters' dtype, the input's too), P a multiple of 16:
    ``None`` otherwise (the caller composes the steps instead).
    """
    if spec.reduce_weight.dtype not in (torch.float32, torch.float64):
        return None
    if spec.proj_weight is not None and spec.proj_weight.shape[0] % 16 != 0:
        return None
    packed = _packed(
        spec.reduce_weight,
        spec.reduce_bias,
        spec.span_weight,
        spec.span_bias,
        spec.proj_weight,
        spec.proj_bias,
    )
    # The kernel's arguments bound once: run is called for every forward of a prepared layer.
    geometry = (spec.kernel_size, spec.stride, spec.padding, spec.dilation, spec.groups)
    settings = (*geometry, spec.out_scale, spec.out_shift, spec.out_relu)
    proj_relu = spec.proj_relu

    def run(input: Tensor, residual: Tensor | None) -> Tensor:
        return _C.layer_forward(input, packed, *settings, residual, proj_relu)

    return run


def forward3d(
    input: Tensor, weight: Tensor, stride: Triple, padding: Triple, dilation: Triple
) -> Tensor:
    """(B, C, D, H, W), (B, G, Kd, Kh, Kw, D_out, H_out, W_out) -> (B, C, D_out, H_out, W_out),
    in the input's layout (``src/involution/csrc/involution_nd_cpu.cpp``)."""
    return torch.ops.involution_nd_cpu.forward3d(input, weight, stride, padding, dilation)


def backward3d(*args: Tensor | Triple | bool) -> tuple[Tensor | None, Tensor | None]:
    """(grad_input or ``None``, grad_weight or ``None``) for the backend's 3-D arguments
    (grad_output, input, weight, stride, padding, dilation, needs_input, needs_weight; see
    :mod:`involution.ops.registration_nd`), both in one parallel region."""
    return torch.ops.involution_nd_cpu.backward3d(*args)


def span_backward(
    grad_output: Tensor,
    input: Tensor,
    activated: Tensor,
    span_weight: Tensor,
    span_bias: Tensor | None,
    kernel_size: int,
    stride: int,
    dilation: int,
    needs: tuple[bool, bool, bool],
    output_affine: Tensor | None = None,
) -> tuple[Tensor | None, ...]:
    """The Involution2d layer's backward through its aggregation and span conv, the kernels
    regenerated per band of rows from ``activated`` and never stored whole
    (``src/involution/csrc/involution_regen_cpu.cpp``); float32 and float64.

    With ``output_affine`` (3, C), rows (A, B, D), ``grad_output`` is a gradient g and the
    layer's output gets ``A * g + B + D * y`` per channel, y the layer's output aggregated again
    per band (the gradient through a BatchNorm after the layer, y never stored).

    grad_output (B, C, H_out, W_out), input (B, C, H, W), activated (B, M, H_out, W_out) (the
    kernel branch's ReLU output), span_weight (G*K*K, M, 1, 1), span_bias (G*K*K,) or ``None``;
    padding ``dilation * (kernel_size - 1) // 2``. Returns (the aggregation's grad_input in the
    input's layout, grad_activated (B, M, H_out, W_out) in activated's layout, grad_span_weight
    shaped as span_weight, grad_span_bias), each of the first, third and fourth ``None`` where
    ``needs`` (input, span weight, span bias) says it is not needed or the bias is absent.
    """
    grad_input, grad_activated, grad_span_weight, grad_span_bias = (
        torch.ops.involution_regen_cpu.span_backward(
            grad_output,
            input,
            activated,
            span_weight,
            span_bias,
            kernel_size,
            stride,
            dilation,
            needs[0],
            output_affine,
        )
    )
    return (
        grad_input if needs[0] else None,
        grad_activated,
        grad_span_weight.view(span_weight.shape) if needs[1] else None,
        grad_span_bias if needs[2] and span_bias is not None else None,
    )


def average_pool(input: Tensor, stride: int) -> Tensor:
    """The kernel branch's ``F.avg_pool2d(input, stride, stride, ceil_mode=True)``, its values
    bitwise, vectorised over the output columns (NCHW) or the channels (channels_last)
    (``src/involution/csrc/pool_cpu.cpp``): (B, C, H, W) -> (B, C, ceil(H / stride),
    ceil(W / stride)) in the input's layout; float32 and float64, contiguous in either
    layout."""
    return torch.ops.involution_pool_cpu.average_pool(input, stride)


def average_pool_backward_add_(grad_input: Tensor, grad_output: Tensor, stride: int) -> None:
    """``grad_input += avg_pool2d_backward(grad_output)`` of :func:`average_pool`, in place and
    in one pass (ATen's backward writes a zeroed map to add separately). ``grad_input`` (B, C,
    H, W), float32 or float64, contiguous in NCHW or channels_last; ``grad_output`` the pooled
    shape."""
    torch.ops.involution_pool_cpu.average_pool_backward_add_(grad_input, grad_output, stride)


if _C is not None:  # the ops are registered when the extension loads

    @torch.library.register_fake("involution_pool_cpu::average_pool")
    def _(input, stride):
        batch, channels, height, width = input.shape
        return input.new_empty(
            batch, channels, -(-height // stride), -(-width // stride)
        ).contiguous(memory_format=memory_format_of(input))

    @torch.library.register_fake("involution_pool_cpu::average_pool_backward_add_")
    def _(grad_input, grad_output, stride):
        return None

    @torch.library.register_fake("involution_regen_cpu::span_backward")
    def _(grad_output, input, activated, span_weight, span_bias, *rest, **keywords):
        # rest: kernel_size, stride, dilation, needs_input[, output_affine]; output_affine
        # (positional or keyword) changes no shape.
        needs_input = rest[3]
        grad_input = (
            torch.empty_like(input, memory_format=memory_format_of(input))
            if needs_input
            else input.new_empty(0)
        )
        kernels, reduced = span_weight.shape[0], activated.shape[1]
        return (
            grad_input,
            torch.empty_like(activated, memory_format=memory_format_of(activated)),
            span_weight.new_empty(kernels, reduced),
            span_weight.new_empty(kernels),
        )
