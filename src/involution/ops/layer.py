"""The fused inference layer op's arguments and plan: :class:`LayerArguments` (as a caller gives
them) and :class:`Involution2dLayerSpec` (checked once for an input shape, backend resolved).

The path of one call: the front door (:func:`~involution.ops.functional.involution2d_layer`, or
:meth:`Involution2d.forward_layer <involution.ops.Involution2d.forward_layer>`, which keeps the
prepared op per input shape) checks a :class:`LayerArguments` against the input into a spec
(:func:`~involution.ops.functional.layer_spec`); :mod:`involution.ops.registration` runs the
spec, through the backend's ``layer_prepare(spec)`` or step by step, and flattens it into the
custom op ``involution::involution2d_layer``'s tensors and scalars where a tracer needs the op.

Only types here (backends import them): no checks, no backends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor

from involution.ops.layout import IntOrPair, Pair, pair

__all__ = ["Involution2dLayerSpec", "LayerArguments", "LayerRun"]

#: A prepared layer op: ``run(input, residual) -> output`` (see :class:`Involution2dLayerSpec`).
LayerRun = Callable[[Tensor, Tensor | None], Tensor]


@dataclass(frozen=True)
class LayerArguments:
    """The arguments of :func:`~involution.ops.functional.involution2d_layer` after ``input``, in
    its order and with its defaults, unchecked (see that function for their meaning).

    Shapes: ``reduce_weight`` (M, C[, 1, 1]), ``reduce_bias`` (M,), ``span_weight``
    (G*Kh*Kw, M[, 1, 1]), ``span_bias`` (G*Kh*Kw,), ``out_scale`` and ``out_shift`` (C,),
    ``proj_weight`` (P, C[, 1, 1]), ``proj_bias`` (P,), ``residual`` (B, P, H_out, W_out).
    """

    reduce_weight: Tensor
    reduce_bias: Tensor | None
    span_weight: Tensor
    span_bias: Tensor | None
    kernel_size: IntOrPair
    groups: int
    stride: IntOrPair = 1
    dilation: IntOrPair = 1
    out_scale: Tensor | None = None
    out_shift: Tensor | None = None
    out_relu: bool = False
    backend: str = "auto"
    proj_weight: Tensor | None = None
    proj_bias: Tensor | None = None
    residual: Tensor | None = None
    proj_relu: bool = False


@dataclass(frozen=True, eq=False)
class Involution2dLayerSpec:
    r"""The whole :class:`~involution.ops.Involution2d` layer for inference, checked for inputs
    (B, C, H, W) of one shape, dtype and device: configuration and parameters.

    .. math::
        r = \mathrm{ReLU}(W_r\,\mathrm{pool}_s(x) + b_r),\quad
        y = \mathrm{involution2d}(x, W_s r + b_s),\quad
        \mathrm{out} = [\mathrm{ReLU}]([\mathrm{scale}\cdot y + \mathrm{shift}]),\quad
        [\,[\mathrm{ReLU}](W_p\,\mathrm{out} + b_p + \mathrm{residual})\,]

    Every tensor has the input's dtype and device (after autocast). The parameter tensors are
    the caller's own objects, not reshaped views: the ``"cpu"`` backend recognises a model's
    parameters across preparations (its packed copies are kept while they are unchanged).

    Attributes:
        kernel_size, stride, padding, dilation: (height, width) pairs; padding is
            ``dilation * (K - 1) // 2``, K odd.
        groups: G, dividing C.
        backend: the concrete backend (``"cpu"``, ``"reference"``, ...), resolved for the
            input's device.
        out_relu: ReLU after the affine epilogue; proj_relu: ReLU after projection + residual.
        reduce_weight: (M, C) or (M, C, 1, 1), the kernel branch's norm folded in;
            reduce_bias: (M,) or ``None``.
        span_weight: (G*Kh*Kw, M) or (G*Kh*Kw, M, 1, 1); span_bias: (G*Kh*Kw,) or ``None``.
        out_scale, out_shift: (C,) each, or both ``None`` (no affine epilogue).
        proj_weight: (P, C) or (P, C, 1, 1), or ``None`` (no projection); proj_bias: (P,) or
            ``None``.

    A prepared spec runs as ``run(input, residual)``: input (B, C, H, W), residual
    (B, P, H_out, W_out) or ``None`` -> (B, C or P, H_out, W_out), in the input's memory format,
    ``H_out = ceil(H / stride_h)``.
    """

    kernel_size: Pair
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int
    backend: str
    reduce_weight: Tensor
    reduce_bias: Tensor | None
    span_weight: Tensor
    span_bias: Tensor | None
    # The optional steps after the involution, off by default: the layer's output alone.
    out_relu: bool = False
    proj_relu: bool = False
    out_scale: Tensor | None = None
    out_shift: Tensor | None = None
    proj_weight: Tensor | None = None
    proj_bias: Tensor | None = None

    def op_arguments(self) -> dict[str, Any]:
        """The fields by name: the custom op ``involution::involution2d_layer`` takes them as
        its arguments (with ``input`` and ``residual``)."""
        return {field.name: getattr(self, field.name) for field in fields(self)}

    @classmethod
    def from_op_arguments(cls, arguments: Mapping[str, Any]) -> Involution2dLayerSpec:
        """The spec the custom op's ``arguments`` (by name; others ignored) carry, its geometry
        back in pairs (the schema's lists arrive as lists)."""
        values = {field.name: arguments[field.name] for field in fields(cls)}
        for name in ("kernel_size", "stride", "padding", "dilation"):
            values[name] = pair(values[name])
        return cls(**values)
