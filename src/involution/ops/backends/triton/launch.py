"""What every Triton launcher does around its kernel, written once for all the variants.

Settings read from the environment, the autotuner's tilings (read from ``tilings.json``), the
accumulation dtype, the problem's sizes, the tensor a pass writes, the fused forward's operands
and flags, and the launch itself: a 1-D grid, on the operands' GPU, with the arguments in the
order every kernel of this package takes them (pointers, sizes, a tuple of strides per strided
tensor, the (stride, padding, dilation) pairs as one tuple, constexprs).

Triton is imported lazily, so that the backend interface, which reads the settings, works
without it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from involution.ops.layout import Pair, empty_output, memory_format_of

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: (stride, padding, dilation), each an (h, w) pair.
Geometry = tuple[Pair, Pair, Pair]


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


#: The kernels' autotune search spaces, data beside this module (see :func:`autotune_configs`).
TILINGS_PATH = Path(__file__).with_name("tilings.json")


def autotune_configs(family: str) -> list[Any]:
    """The ``triton.Config`` candidates of the kernels of ``family``, an entry of
    :data:`TILINGS_PATH`: the tiling's constexpr ``names`` and rows of (value per name...,
    warps, stages).

    The interpreter cannot benchmark, so it gets the ``interpreted`` rows (one small tiling
    that still exercises partial blocks in the test shapes); with autotuning off a GPU gets the
    ``fixed`` rows, else the ``tuned`` search space.
    """
    import triton
    from triton import knobs

    tilings = json.loads(TILINGS_PATH.read_text())[family]
    if knobs.runtime.interpret:
        rows = tilings["interpreted"]
    elif not autotune_enabled():
        rows = tilings["fixed"]
    else:
        rows = tilings["tuned"]
    names = tilings["names"]
    configs = []
    for row in rows:
        warps, stages = row[len(names) :]
        kwargs = dict(zip(names, row[: len(names)], strict=True))
        configs.append(triton.Config(kwargs, num_warps=warps, num_stages=stages))
    return configs


def accumulator(dtype: torch.dtype) -> Any:
    """The Triton accumulation dtype for tensors of ``dtype``; ``TypeError`` if unsupported."""
    import triton.language as tl

    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend supports {SUPPORTED_DTYPES}, got {dtype}")
    return tl.float64 if dtype == torch.float64 else tl.float32


def pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (``n`` >= 1)."""
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints: how many blocks of ``b`` cover ``a``."""
    return -(-a // b)


@dataclass(frozen=True)
class Sizes:
    """The sizes of one problem: input (B, C, H, W), kernels (B, G, Kh, Kw, H_out, W_out)."""

    batch: int
    channels: int
    height: int
    width: int
    groups: int
    kernel_h: int
    kernel_w: int
    out_h: int
    out_w: int

    @classmethod
    def of(cls, input_shape: Sequence[int], weight_shape: Sequence[int]) -> Sizes:
        """From ``input_shape`` (B, C, H, W) and ``weight_shape`` (B, G, Kh, Kw, H_out, W_out)."""
        batch, channels, height, width = input_shape
        groups, kernel_h, kernel_w, out_h, out_w = weight_shape[1:]
        return cls(batch, channels, height, width, groups, kernel_h, kernel_w, out_h, out_w)

    @property
    def group_channels(self) -> int:
        """C/G, the channels of one group."""
        return self.channels // self.groups

    @property
    def spatial(self) -> tuple[int, int, int, int]:
        """(H, W, H_out, W_out), in the order the kernels take them."""
        return self.height, self.width, self.out_h, self.out_w

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """(B, G, Kh, Kw, H_out, W_out)."""
        return (self.batch, self.groups, self.kernel_h, self.kernel_w, self.out_h, self.out_w)


@dataclass(frozen=True, eq=False)
class Aggregation:
    """One aggregation pass ready to launch: what its kernel reads and writes, and its sizes.

    ``pointers`` are (first operand, second operand, empty result) in kernel order: for
    ``forward`` input (B, C, H, W), weight (B, G, Kh, Kw, H_out, W_out) and the output
    (B, C, H_out, W_out) in the memory format of the input; for ``backward_input``
    grad_output, weight and grad_input (B, C, H, W) in the memory format of the input; for
    ``backward_weight`` grad_output, input and a contiguous grad_weight shaped as the weight.
    ``pixels`` are the (rows, columns) of one image that its programs cover: the input's for
    ``backward_input`` (an input pixel gathers its gradient), else the output's.
    ``split_channels`` is false for ``backward_weight``, whose programs reduce over whole
    groups' channels.
    """

    pointers: tuple[Tensor, Tensor, Tensor]
    sizes: Sizes
    pixels: Pair
    split_channels: bool

    @classmethod
    def of(
        cls, pass_name: str, input: Tensor, weight: Tensor, grad_output: Tensor | None
    ) -> Aggregation:
        """Pass ``pass_name`` (``forward``, ``backward_input`` or ``backward_weight``)."""
        sizes = Sizes.of(input.shape, weight.shape)
        if pass_name == "forward":
            output = empty_output(input, weight.shape[4:])
            return cls((input, weight, output), sizes, (sizes.out_h, sizes.out_w), True)
        assert grad_output is not None, pass_name
        if pass_name == "backward_input":
            grad_input = torch.empty_like(input, memory_format=memory_format_of(input))
            return cls((grad_output, weight, grad_input), sizes, (sizes.height, sizes.width), True)
        grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        return cls((grad_output, input, grad_weight), sizes, (sizes.out_h, sizes.out_w), False)

    def launch(
        self,
        kernel: Any,
        programs: Callable[[dict[str, Any]], int],
        dims: tuple[int, ...],
        strided: tuple[Tensor, ...],
        geometry: Geometry,
        **constexprs: Any,
    ) -> Tensor:
        """:func:`run_kernel` on the pointers, with the kernel size and accumulation dtype
        (``KH``, ``KW``, ``ACC_DTYPE``) added to ``constexprs``; returns the result."""
        run_kernel(
            kernel,
            programs,
            self.pointers,
            dims,
            strided,
            geometry,
            KH=self.sizes.kernel_h,
            KW=self.sizes.kernel_w,
            ACC_DTYPE=accumulator(self.pointers[0].dtype),
            **constexprs,
        )
        return self.pointers[-1]


@dataclass(frozen=True, eq=False)
class FusedProblem:
    """One fused forward: the aggregation with the kernels generated from ``reduced``.

    ``input`` (B, C, H, W), NCHW or channels_last; ``reduced`` (B, R, H_out, W_out), the kernel
    branch's features before the span conv; ``span_weight`` (G*Kh*Kw, R), the span conv's
    weight, row ``g*Kh*Kw + kh*Kw + kw``; ``span_bias`` (G*Kh*Kw,) or ``None``.
    """

    input: Tensor
    reduced: Tensor
    span_weight: Tensor
    span_bias: Tensor | None
    kernel_size: Pair
    geometry: Geometry

    @property
    def sizes(self) -> Sizes:
        """G from the span weight's G*Kh*Kw rows, (H_out, W_out) from ``reduced``."""
        kernel_h, kernel_w = self.kernel_size
        groups = self.span_weight.shape[0] // (kernel_h * kernel_w)
        weight_shape = (self.input.shape[0], groups, kernel_h, kernel_w, *self.reduced.shape[-2:])
        return Sizes.of(self.input.shape, weight_shape)

    def launch(
        self,
        kernel: Any,
        programs: Callable[[dict[str, Any]], int],
        dims: tuple[int, ...],
        **constexprs: Any,
    ) -> Tensor:
        """:func:`run_kernel` of a fused forward kernel; returns the output (B, C, H_out, W_out),
        in the memory format of the input.

        Pointers: the input, ``reduced``, the span weight made contiguous, the span bias (the
        span weight stands in when there is none: ``HAS_BIAS`` is then false and it is never
        read) and the output; strides: the input's, ``reduced``'s and the output's. The kernel
        size and the dtype flags (:meth:`flags`) are added to ``constexprs``.
        """
        flags = self.flags()
        span_weight = self.span_weight.contiguous()
        output = empty_output(self.input, self.reduced.shape[-2:])
        bias = self.span_bias if self.span_bias is not None else span_weight
        run_kernel(
            kernel,
            programs,
            (self.input, self.reduced, span_weight, bias, output),
            dims,
            (self.input, self.reduced, output),
            self.geometry,
            KH=self.kernel_size[0],
            KW=self.kernel_size[1],
            **flags,
            **constexprs,
        )
        return output

    def flags(self) -> dict[str, bool]:
        """The fused kernels' dtype flags (``TypeError`` for an unsupported dtype): ``HAS_BIAS``,
        ``IEEE_DOT`` (float32 products in full precision, not TF32) and ``DOT_IN_FP32``."""
        dtype = self.input.dtype
        accumulator(dtype)  # rejects unsupported dtypes with a clear message
        # The interpreter's tl.dot mishandles bfloat16 operands (NumPy has no bfloat16): there
        # they are upcast, which is exact: products of bfloat16 values are exact in float32.
        upcast = dtype == torch.bfloat16 and interpreter_enabled()
        return {
            "HAS_BIAS": self.span_bias is not None,
            "IEEE_DOT": dtype == torch.float32 or upcast,
            "DOT_IN_FP32": upcast,
        }


def device_guard(tensor: Tensor) -> contextlib.AbstractContextManager:
    # Launch on the tensor's GPU, not on the current one (multi-GPU).
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def run_kernel(
    kernel: Any,
    programs: Callable[[dict[str, Any]], int],
    pointers: tuple[Tensor, ...],
    sizes: tuple[int, ...],
    strided: tuple[Tensor, ...],
    geometry: Geometry,
    **constexprs: Any,
) -> None:
    """Run ``kernel`` on a 1-D grid of ``programs(meta)`` programs on the GPU of ``pointers``.

    The arguments go in the order every kernel of this package takes: the ``pointers``, the
    ``sizes``, the strides of each ``strided`` tensor (one tuple each), the ``geometry`` (a
    tuple of (h, w) tuples, as :mod:`~.taps` reads it), then the ``constexprs`` by name (the
    autotuner adds the tiling). Triton specialises the entries of a tuple as it does scalar
    arguments (a unit stride becomes a constant).
    """
    strides = [tuple(tensor.stride()) for tensor in strided]
    conv = tuple(tuple(pair) for pair in geometry)
    with device_guard(pointers[0]):
        kernel[lambda meta: (programs(meta),)](*pointers, *sizes, *strides, conv, **constexprs)
