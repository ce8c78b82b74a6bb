"""FLOP formulas of the involution ops for :mod:`torch.utils.flop_counter` (registered on import).

Every output element of the aggregation costs K*K multiply-adds, in the forward pass and in each
of the two gradients (twice that for the backward op that computes both). The fused op adds its
span conv (R -> G*K*K per output pixel), the inference layer op its reduce conv (C -> R per
output pixel) too. Formulas return FLOPs, 2 per multiply-add, as
``FlopCounterMode`` counts them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.flop_counter import register_flop_formula

# Importing the registration defines the custom ops the formulas below attach to.
import involution.ops.registration  # noqa: F401

__all__ = [
    "fused_flop",
    "involution_backward_flop",
    "involution_both_gradients_flop",
    "involution_flop",
    "layer_flop",
]


def involution_flop(
    input_shape: Sequence[int], weight_shape: Sequence[int], *args: Any, out_shape: Sequence[int]
) -> int:
    """FLOPs (2 per multiply-add) of an involution: K*K multiply-adds per output element.

    ``weight_shape`` is (B, G, Kh, Kw, H_out, W_out) and ``out_shape`` (B, C, H_out, W_out).
    """
    return 2 * math.prod(out_shape) * weight_shape[2] * weight_shape[3]


def involution_backward_flop(
    grad_output_shape: Sequence[int],
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    *args: Any,
    out_shape: Sequence[int],
) -> int:
    """Each backward op is one more K*K multiply-adds per element of ``grad_output``."""
    return 2 * math.prod(grad_output_shape) * weight_shape[2] * weight_shape[3]


def fused_flop(
    input_shape: Sequence[int],
    reduced_shape: Sequence[int],
    span_weight_shape: Sequence[int],
    span_bias_shape: Sequence[int] | None,
    kernel_size: Sequence[int],
    *args: Any,
    out_shape: Sequence[int],
) -> int:
    """The fused op = the span 1x1 conv (R -> G*K*K per output pixel) + the aggregation."""
    batch, _, out_h, out_w = out_shape
    span_macs = batch * out_h * out_w * math.prod(span_weight_shape)
    return 2 * (span_macs + math.prod(out_shape) * kernel_size[0] * kernel_size[1])


def layer_flop(
    input_shape: Sequence[int],
    reduce_weight_shape: Sequence[int],
    reduce_bias_shape: Sequence[int] | None,
    span_weight_shape: Sequence[int],
    span_bias_shape: Sequence[int] | None,
    kernel_size: Sequence[int],
    *args: Any,
    out_shape: Sequence[int],
) -> int:
    """The layer op = reduce 1x1 conv (C -> R) + span 1x1 conv (R -> G*K*K) per output pixel +
    the aggregation (pooling and epilogue not counted, like BN and ReLU)."""
    batch, _, out_h, out_w = out_shape
    pixels = batch * out_h * out_w
    conv_macs = pixels * (math.prod(reduce_weight_shape) + math.prod(span_weight_shape))
    return 2 * (conv_macs + math.prod(out_shape) * kernel_size[0] * kernel_size[1])


register_flop_formula(torch.ops.involution.involution2d)(involution_flop)
register_flop_formula(torch.ops.involution.involution2d_layer)(layer_flop)
register_flop_formula(torch.ops.involution.involution2d_fused)(fused_flop)
register_flop_formula(
    [
        torch.ops.involution.involution2d_backward_input,
        torch.ops.involution.involution2d_backward_weight,
    ]
)(involution_backward_flop)


@register_flop_formula(torch.ops.involution.involution2d_backward)
def involution_both_gradients_flop(*args: Any, out_shape: Any) -> int:
    """grad_input and grad_weight: twice the cost of one gradient."""
    return 2 * involution_backward_flop(*args, out_shape=None)
