"""The Triton backend: fused gather kernels for CUDA GPUs (and CPU under ``TRITON_INTERPRET=1``).

Compared with the reference backend nothing K*K-times larger than the input is materialised:
each output value is accumulated in registers from the input and the kernel tensor. Supports
float32, float16 and bfloat16 (accumulated in float32) and float64 (accumulated in float64),
NCHW and channels_last inputs (read and written through their strides, no layout conversion),
any stride, padding, dilation, rectangular kernel and number of groups. Results are
deterministic: every output element is written by exactly one program, without atomics.

The kernels live in :mod:`involution.ops.backends.triton.kernels` (aggregation) and
:mod:`involution.ops.backends.triton.fused` (aggregation with on-the-fly kernel generation);
they are imported lazily so that this module, and :func:`unavailable_reason`, work without
Triton.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
from torch import Tensor

from involution.ops.layout import Pair, empty_output, generate_kernels, memory_format_of

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def interpreter_enabled() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def autotune_enabled() -> bool:
    """Whether the kernels are autotuned per shape on a GPU (``INVOLUTION_TRITON_AUTOTUNE``).

    ``INVOLUTION_TRITON_AUTOTUNE=0`` (read when the kernels are first imported) gives every
    kernel one fixed tiling instead: each new shape then costs one compilation rather than one
    per candidate, which keeps a GPU test run over hundreds of random shapes short.
    """
    setting = os.environ.get("INVOLUTION_TRITON_AUTOTUNE", "1").lower()
    return setting not in ("0", "false", "off", "no")


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` when the kernels can run on ``device``, else why not.

    CUDA devices need an importable Triton; CPU tensors additionally need the Triton
    interpreter (``TRITON_INTERPRET=1`` set before the kernels are first imported), which is
    how the test-suite runs these kernels without a GPU.
    """
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'involution[triton]')"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 7:
            return f"Triton needs compute capability 7.0 or newer, this GPU has {major}.{minor}"
        return None
    if device.type == "cpu" and interpreter_enabled():
        return None
    return (
        f"Triton kernels need a CUDA device, got {device.type!r} (CPU tensors run only under "
        "the Triton interpreter, TRITON_INTERPRET=1)"
    )


def _accumulator(dtype: torch.dtype):
    """The Triton accumulation dtype for tensors of ``dtype``."""
    import triton.language as tl

    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend supports {_SUPPORTED_DTYPES}, got {dtype}")
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid(programs: int):
    return lambda meta: (programs(meta),)


def _shape_args(input: Tensor, weight: Tensor) -> tuple[int, ...]:
    """(C, G, C/G, H, W, H_out, W_out), the shape arguments of every aggregation kernel."""
    _, channels, height, width = input.shape
    groups, _, _, out_h, out_w = weight.shape[1:]
    return channels, groups, channels // groups, height, width, out_h, out_w


def _conv_args(stride: Pair, padding: Pair, dilation: Pair) -> tuple[int, ...]:
    return (*stride, *padding, *dilation)


def _device_guard(tensor: Tensor):
    # Launch on the tensor's GPU, not on the current one (multi-GPU).
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def forward(input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair) -> Tensor:
    """Output (B, C, H_out, W_out) in the memory format of ``input`` (B, C, H, W)."""
    from involution.ops.backends.triton import kernels

    acc = _accumulator(input.dtype)
    input = input.contiguous(memory_format=memory_format_of(input))
    weight = weight.contiguous()
    batch, channels = input.shape[:2]
    groups, kh, kw, out_h, out_w = weight.shape[1:]
    output = empty_output(input, (out_h, out_w))
    cg = channels // groups

    def programs(meta) -> int:
        pixel_blocks = (out_h * out_w + meta["BLOCK_P"] - 1) // meta["BLOCK_P"]
        return batch * groups * pixel_blocks * ((cg + meta["BLOCK_C"] - 1) // meta["BLOCK_C"])

    with _device_guard(input):
        kernels.forward_kernel[_grid(programs)](
            input,
            weight,
            output,
            *_shape_args(input, weight),
            *input.stride(),
            *output.stride(),
            *_conv_args(stride, padding, dilation),
            KH=kh,
            KW=kw,
            ACC_DTYPE=acc,
        )
    return output


def backward_input(
    grad_output: Tensor, input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair
) -> Tensor:
    """Gradient (B, C, H, W) of the output with respect to ``input``, in its memory format."""
    from involution.ops.backends.triton import kernels

    acc = _accumulator(input.dtype)
    weight = weight.contiguous()
    batch, channels, height, width = input.shape
    groups, kh, kw = weight.shape[1:4]
    grad_input = torch.empty_like(input, memory_format=memory_format_of(input))
    cg = channels // groups

    def programs(meta) -> int:
        pixel_blocks = (height * width + meta["BLOCK_P"] - 1) // meta["BLOCK_P"]
        return batch * groups * pixel_blocks * ((cg + meta["BLOCK_C"] - 1) // meta["BLOCK_C"])

    with _device_guard(input):
        kernels.backward_input_kernel[_grid(programs)](
            grad_output,
            weight,
            grad_input,
            *_shape_args(input, weight),
            *grad_output.stride(),
            *grad_input.stride(),
            *_conv_args(stride, padding, dilation),
            KH=kh,
            KW=kw,
            ACC_DTYPE=acc,
        )
    return grad_input


def backward_weight(
    grad_output: Tensor, input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair
) -> Tensor:
    """Gradient (B, G, Kh, Kw, H_out, W_out) of the output with respect to ``weight``."""
    from involution.ops.backends.triton import kernels

    acc = _accumulator(input.dtype)
    input = input.contiguous(memory_format=memory_format_of(input))
    batch = input.shape[0]
    groups, kh, kw, out_h, out_w = weight.shape[1:]
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)

    def programs(meta) -> int:
        return batch * groups * ((out_h * out_w + meta["BLOCK_P"] - 1) // meta["BLOCK_P"])

    with _device_guard(input):
        kernels.backward_weight_kernel[_grid(programs)](
            grad_output,
            input,
            grad_weight,
            *_shape_args(input, weight),
            *grad_output.stride(),
            *input.stride(),
            *_conv_args(stride, padding, dilation),
            KH=kh,
            KW=kw,
            ACC_DTYPE=acc,
        )
    return grad_weight


def fused_forward(
    input: Tensor,
    reduced: Tensor,
    span_weight: Tensor,
    span_bias: Tensor | None,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> Tensor:
    """Involution output (B, C, H_out, W_out) with the kernels generated on the fly.

    Args:
        input: (B, C, H, W), NCHW or channels_last.
        reduced: (B, R, H_out, W_out), the kernel branch's features before the span conv.
        span_weight: (G*Kh*Kw, R), the span conv's weight; row ``g*Kh*Kw + kh*Kw + kw``.
        span_bias: (G*Kh*Kw,) or ``None``.

    float64 has no fast matrix-product path in Triton, so for it the kernels are materialised
    by a 1x1 convolution and aggregated by :func:`forward`.
    """
    from involution.ops.backends.triton import fused

    kh, kw = kernel_size
    batch, channels = input.shape[:2]
    rows, reduced_channels = span_weight.shape
    groups = rows // (kh * kw)
    out_h, out_w = reduced.shape[-2:]
    if input.dtype == torch.float64:
        weight = generate_kernels(reduced, span_weight, span_bias, kernel_size, groups)
        return forward(input, weight, stride, padding, dilation)
    _accumulator(input.dtype)

    input = input.contiguous(memory_format=memory_format_of(input))
    span_weight = span_weight.contiguous()
    output = empty_output(input, (out_h, out_w))
    # The interpreter's tl.dot mishandles bfloat16 operands (NumPy has no bfloat16); there the
    # operands are upcast, which is exact: products of bfloat16 values are exact in float32.
    upcast = input.dtype == torch.bfloat16 and interpreter_enabled()
    # tl.dot needs every tile dimension to be at least 16.
    kk_pad = max(16, 1 << (kh * kw - 1).bit_length())

    def programs(meta) -> int:
        return batch * groups * ((out_h * out_w + meta["BLOCK_P"] - 1) // meta["BLOCK_P"])

    with _device_guard(input):
        fused.fused_forward_kernel[_grid(programs)](
            input,
            reduced,
            span_weight,
            span_bias if span_bias is not None else span_weight,
            output,
            channels,
            groups,
            channels // groups,
            reduced_channels,
            *input.shape[2:],
            out_h,
            out_w,
            *input.stride(),
            *reduced.stride(),
            *output.stride(),
            *_conv_args(stride, padding, dilation),
            KH=kh,
            KW=kw,
            KK_PAD=kk_pad,
            HAS_BIAS=span_bias is not None,
            IEEE_DOT=input.dtype == torch.float32 or upcast,
            DOT_IN_FP32=upcast,
        )
    return output
