"""ONNX translation of ``torch.ops.involution.involution2d`` for ``torch.onnx.export``.

Imported by :mod:`involution.ops` when onnxscript (the ``onnx`` extra, which
``torch.onnx.export(..., dynamo=True)`` needs anyway) is installed: it registers
:func:`involution2d_onnx` in onnxscript's default torchlib registry, from which the exporter
builds its translation table, so the plain ``torch.onnx.export(model, (x,), f, dynamo=True)``
translates the op with no extra argument.

The exporter thus captures the op as one node (its fake implementation gives the shapes) and
this function writes it in standard ONNX operators, in the ``"shifts"`` formulation of
:mod:`involution.ops.lowering` (the fastest in onnxruntime; see ``involution bench
onnx-lowering``): pad once, then for each of the Kh*Kw taps a strided Slice of the padded input,
a Mul with the tap's kernel plane and an Add, so nothing larger than the input is ever stored.
Emitting these nodes directly, instead of tracing the same formulation in ATen operators with
symbolic shapes, keeps the export of a 7x7 layer to about a second. Batch, height and width
stay dynamic: slice ends are counted from the far edge, reshapes read the sizes at run time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.registration import torch_op

__all__ = ["aggregate_onnx", "involution2d_onnx"]

#: Slice end meaning "to the end of the axis".
_TO_END = 2**63 - 1


class _Constants:
    """One Constant node per distinct int list in a translated op (slices share their bounds)."""

    def __init__(self) -> None:
        self._made: dict[tuple[int, ...], object] = {}

    def __call__(self, *values: int):
        if values not in self._made:
            self._made[values] = op.Constant(value_ints=list(values))
        return self._made[values]


def _taps(ints: _Constants, tensor, axis: int, tap: int, kernel: int, stride: int, dilation: int):
    """The positions along ``axis`` that kernel tap ``tap`` reads for every output position."""
    end = (kernel - 1 - tap) * dilation
    return op.Slice(
        tensor, ints(tap * dilation), ints(-end if end else _TO_END), ints(axis), ints(stride)
    )


def aggregate_onnx(
    input,
    weight,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str = "auto",
):
    """The aggregation op in ONNX operators, over ``dims = len(stride)`` spatial dimensions:
    ``input`` (B, C, *N), ``weight`` (B, G, *K, *N_out) -> (B, C, *N_out), e.g. (B, C, H, W)
    and (B, G, Kh, Kw, H_out, W_out) -> (B, C, H_out, W_out). The translation of the 2-D op and
    of the 3-D one (:mod:`involution.ops.onnx_translation_nd`).

    ``backend`` is the PyTorch kernel choice and has no meaning in ONNX.
    """
    dims = len(stride)
    ints = _Constants()
    channels = input.shape[1]
    groups, kernel = weight.shape[1], [weight.shape[2 + i] for i in range(dims)]
    taps = math.prod(kernel)
    padded = op.Pad(input, ints(0, 0, *padding, 0, 0, *padding))
    # (B, G, C/G, *N_pad): taps broadcast against the (B, G, 1, *N_out) planes
    grouped = op.Reshape(
        padded,
        op.Concat(
            op.Shape(padded, start=0, end=1),
            ints(groups, channels // groups),
            op.Shape(padded, start=2, end=2 + dims),
            axis=0,
        ),
    )
    planes = op.Reshape(
        weight,
        op.Concat(
            op.Shape(weight, start=0, end=2),
            ints(taps),
            op.Shape(weight, start=2 + dims, end=2 + 2 * dims),
            axis=0,
        ),
    )
    planes = op.Split(planes, axis=2, num_outputs=taps) if taps > 1 else [planes]

    def shifted(tensor, dim: int) -> Iterator:
        """Every tap's slice in row-major tap order; a slice along ``dim`` serves the later
        dimensions' taps."""
        if dim == dims:
            yield tensor
            return
        for tap in range(kernel[dim]):
            sliced = _taps(ints, tensor, 3 + dim, tap, kernel[dim], stride[dim], dilation[dim])
            yield from shifted(sliced, dim + 1)

    output = None
    for tap, plane in zip(shifted(grouped, 0), planes, strict=True):
        term = op.Mul(tap, plane)
        output = term if output is None else op.Add(output, term)
    return op.Reshape(
        output,
        op.Concat(op.Shape(input, start=0, end=2), op.Shape(output, start=3, end=3 + dims), axis=0),
    )


#: The translation registered for ``torch.ops.involution.involution2d``.
involution2d_onnx = torch_op("involution::involution2d", trace_only=True)(aggregate_onnx)
