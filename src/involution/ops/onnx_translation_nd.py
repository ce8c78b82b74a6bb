"""ONNX translation of ``torch.ops.involution.involution3d`` (and so of the 1-D op, which is
the 3-D op on views) for ``torch.onnx.export(..., dynamo=True)``.

Registered in onnxscript's torchlib registry on import of :mod:`involution.ops` when onnxscript
is installed, like the 2-D translation (:mod:`involution.ops.onnx_translation`), in the same
"shifts" formulation: pad once, then per kernel tap a strided Slice of the padded input, a Mul
with the tap's kernel plane and an Add; nothing larger than the input is stored.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.registration import torch_op

__all__ = ["involution3d_onnx"]

#: Slice end meaning "to the end of the axis".
_TO_END = 2**63 - 1


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _taps(tensor, axis: int, tap: int, kernel: int, stride: int, dilation: int):
    """The positions along ``axis`` that kernel tap ``tap`` reads for every output position."""
    end = (kernel - 1 - tap) * dilation
    return op.Slice(
        tensor, _ints(tap * dilation), _ints(-end if end else _TO_END), _ints(axis), _ints(stride)
    )


@torch_op("involution::involution3d", trace_only=True)
def involution3d_onnx(
    input,
    weight,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str = "auto",
):
    """``input`` (B, C, D, H, W), ``weight`` (B, G, Kd, Kh, Kw, D_out, H_out, W_out) ->
    (B, C, D_out, H_out, W_out). ``backend`` has no meaning in ONNX."""
    channels = input.shape[1]
    groups, kernel = weight.shape[1], [weight.shape[2], weight.shape[3], weight.shape[4]]
    taps = kernel[0] * kernel[1] * kernel[2]
    pd, ph, pw = padding
    padded = op.Pad(input, _ints(0, 0, pd, ph, pw, 0, 0, pd, ph, pw))
    # (B, G, C/G, D_pad, H_pad, W_pad): taps broadcast against (B, G, 1, D_out, H_out, W_out)
    grouped = op.Reshape(
        padded,
        op.Concat(
            op.Shape(padded, start=0, end=1),
            _ints(groups, channels // groups),
            op.Shape(padded, start=2, end=5),
            axis=0,
        ),
    )
    planes = op.Reshape(
        weight,
        op.Concat(
            op.Shape(weight, start=0, end=2), _ints(taps), op.Shape(weight, start=5, end=8), axis=0
        ),
    )
    planes = op.Split(planes, axis=2, num_outputs=taps) if taps > 1 else [planes]
    output = None
    index = 0
    for kd in range(kernel[0]):
        depth = _taps(grouped, 3, kd, kernel[0], stride[0], dilation[0])
        for kh in range(kernel[1]):
            row = _taps(depth, 4, kh, kernel[1], stride[1], dilation[1])
            for kw in range(kernel[2]):
                tap = _taps(row, 5, kw, kernel[2], stride[2], dilation[2])
                term = op.Mul(tap, planes[index])
                output = term if output is None else op.Add(output, term)
                index += 1
    return op.Reshape(
        output,
        op.Concat(op.Shape(input, start=0, end=2), op.Shape(output, start=3, end=6), axis=0),
    )
