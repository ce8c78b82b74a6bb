"""ONNX translation of ``torch.ops.involution.involution3d`` (and so of the 1-D op, which is
the 3-D op on views) for ``torch.onnx.export(..., dynamo=True)``.

Registered in onnxscript's torchlib registry on import of :mod:`involution.ops` when onnxscript
is installed, like the 2-D translation (:mod:`involution.ops.onnx_translation`), in the same
"shifts" formulation: pad once, then per kernel tap a strided Slice of the padded input, a Mul
with the tap's kernel plane and an Add; nothing larger than the input is stored.
"""

from __future__ import annotations

from onnxscript.function_libs.torch_lib.registration import torch_op

from involution.ops.onnx_translation import aggregate_onnx

__all__ = ["involution3d_onnx"]


#: The translation registered for ``torch.ops.involution.involution3d``: the 2-D op's, which
#: reads the number of spatial dimensions from ``stride``.
involution3d_onnx = torch_op("involution::involution3d", trace_only=True)(aggregate_onnx)
