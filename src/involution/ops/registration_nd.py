"""Registration of the 3-D involution operator with ``torch.library`` (1-D goes through it).

``torch.ops.involution.involution3d`` is a ``torch.library.custom_op`` with a fake
implementation and a registered autograd formula, so ``torch.compile(fullgraph=True)`` traces
through it, and ``torch.onnx.export`` translates it (:mod:`involution.ops.onnx_translation_nd`).
Its backward is one more op, ``involution::involution3d_backward``, that computes only the
gradients asked for (the other comes back empty) so that a backend can share work between them.

A 1-D involution is this op on (B, C, 1, 1, L) views (see :func:`~involution.ops.nd.involution1d`).

Backends implement the op with two functions (see :mod:`involution.ops.backends`):

- ``forward3d(input, weight, stride, padding, dilation) -> output``
- ``backward3d(grad_output, input, weight, stride, padding, dilation, needs_input,
  needs_weight) -> (grad_input or None, grad_weight or None)``

with ``input`` (B, C, D, H, W), ``weight`` (B, G, Kd, Kh, Kw, D_out, H_out, W_out), ``output``
and ``grad_output`` (B, C, D_out, H_out, W_out), ``stride``/``padding``/``dilation`` triples.
The ops take already-validated arguments: call the front doors in :mod:`involution.ops.nd`.
Outputs follow the input's memory format (channels_last_3d in, channels_last_3d out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from involution.ops.backends import get_backend, resolve_backend
from involution.ops.layout import aggregation_output, empty_output, memory_format_of
from involution.ops.registration import AGGREGATE_SCHEMA, GRADIENT_SCHEMA, setup_context

Triple = tuple[int, int, int]


def triple(values: Sequence[int]) -> Triple:
    """The op schemas pass triples as lists of ints."""
    return int(values[0]), int(values[1]), int(values[2])


def backend_3d(name: str, device: torch.device) -> ModuleType:
    """The module of backend ``name`` (``"auto"`` resolved for ``device``), which must have the
    3-D functions; ``RuntimeError`` naming the backend otherwise."""
    concrete = resolve_backend(name, device) if name == "auto" else name
    module = get_backend(concrete)
    if not hasattr(module, "forward3d"):
        raise RuntimeError(
            f"involution backend {concrete!r} has no 1-D/3-D involution; use 'auto', "
            "'reference', 'cpu' or 'triton'"
        )
    return module


@torch.library.custom_op(
    "involution::involution3d", mutates_args=(), schema=f"({AGGREGATE_SCHEMA}) -> Tensor"
)
def involution3d_op(input: Tensor, weight: Tensor, *conv_args: Any) -> Tensor:
    """y[b, c, o] = sum_k weight[b, g(c), k, o] * x_pad[b, c, o * stride + k * dilation];
    ``conv_args``: (stride, padding, dilation, backend)."""
    stride, padding, dilation, backend = conv_args
    return aggregation_output(
        input,
        weight.shape[5:],
        lambda: backend_3d(backend, input.device).forward3d(
            input, weight, triple(stride), triple(padding), triple(dilation)
        ),
    )


@involution3d_op.register_fake
def _(input, weight, stride, padding, dilation, backend):
    return empty_output(input, weight.shape[5:])


@torch.library.custom_op(
    "involution::involution3d_backward",
    mutates_args=(),
    schema=f"({GRADIENT_SCHEMA}, bool needs_input, bool needs_weight) -> (Tensor, Tensor)",
)
def involution3d_backward_op(*args: Any) -> tuple[Tensor, Tensor]:
    """(grad_input in the input's layout, grad_weight contiguous) of :func:`involution3d_op`,
    for (grad_output, the op's arguments, needs_input, needs_weight); an empty (0,) tensor in
    place of a gradient not asked for."""
    grad_output, input, weight, stride, padding, dilation, backend, needs_input, needs_weight = args
    grad_input = grad_weight = None
    if input.numel() == 0:
        grad_input, grad_weight = torch.zeros_like(input), torch.zeros_like(weight)
    elif needs_input or needs_weight:
        grad_input, grad_weight = backend_3d(backend, input.device).backward3d(
            grad_output,
            input,
            weight,
            triple(stride),
            triple(padding),
            triple(dilation),
            needs_input,
            needs_weight,
        )
    return (
        grad_input.contiguous(memory_format=memory_format_of(input))
        if needs_input
        else input.new_empty(0),
        grad_weight.contiguous() if needs_weight else weight.new_empty(0),
    )


@involution3d_backward_op.register_fake
def _(grad_output, input, weight, stride, padding, dilation, backend, needs_input, needs_weight):
    return (
        torch.empty_like(input, memory_format=memory_format_of(input))
        if needs_input
        else input.new_empty(0),
        torch.empty_like(weight, memory_format=torch.contiguous_format)
        if needs_weight
        else weight.new_empty(0),
    )


def _backward(ctx, grad_output: Tensor):
    input, weight = ctx.saved_tensors
    needs_input, needs_weight = ctx.needs_input_grad[:2]
    grad_input, grad_weight = involution3d_backward_op(
        grad_output, input, weight, *ctx.conv_args, needs_input, needs_weight
    )
    return (
        grad_input if needs_input else None,
        grad_weight if needs_weight else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("involution::involution3d", _backward, setup_context=setup_context)


@register_flop_formula(torch.ops.involution.involution3d)
def involution3d_flop(
    input_shape: Sequence[int], weight_shape: Sequence[int], *args: Any, out_shape: Sequence[int]
) -> int:
    """FLOPs (2 per multiply-add) for ``FlopCounterMode``: Kd*Kh*Kw multiply-adds per output
    element (the backward op: that per element of each gradient asked for)."""
    return 2 * math.prod(out_shape) * math.prod(weight_shape[2:5])


@register_flop_formula(torch.ops.involution.involution3d_backward)
def involution3d_backward_flop(
    grad_output_shape: Sequence[int],
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    *args: Any,
    out_shape: Sequence[int],
) -> int:
    needs = sum(math.prod(shape) > 0 for shape in out_shape)
    return 2 * needs * math.prod(grad_output_shape) * math.prod(weight_shape[2:5])
