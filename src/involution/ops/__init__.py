"""The involution operator: front doors, ``torch.library`` registration, module and backends.

- :mod:`~involution.ops.functional`: :func:`involution2d`, :func:`involution2d_fused` and the
  inference-only whole layer :func:`involution2d_layer` (checked once for repeated calls:
  ``prepare_involution2d_layer``), the front doors that check arguments
  (:mod:`~involution.ops.checks`) and pick a backend;
- :mod:`~involution.ops.layer`: the layer op's arguments and its plan, checked once per input
  shape (:class:`~involution.ops.layer.Involution2dLayerSpec`, what backends' ``layer_prepare``
  take);
- :mod:`~involution.ops.registration`: the ``torch.ops.involution.*`` custom ops, their fakes
  and autograd, and the eager fast path;
- :mod:`~involution.ops.modules`: :class:`Involution2d`, kernel generation plus aggregation;
- :mod:`~involution.ops.nd`, :mod:`~involution.ops.registration_nd`,
  :mod:`~involution.ops.modules_nd`: the same for 1-D and 3-D (:func:`involution1d`,
  :func:`involution3d`, :class:`Involution1d`, :class:`Involution3d`);
- :mod:`~involution.ops.backends`: ``reference``, ``cpu`` (C++) and ``triton`` implementations;
- :mod:`~involution.ops.lowering`: the op in standard PyTorch operators, for ``exportable``
  layers; :mod:`~involution.ops.onnx_translation`: the op in ONNX operators, registered for
  ``torch.onnx.export`` when onnxscript is installed;
- :mod:`~involution.ops.flops`: FLOP formulas for ``torch.utils.flop_counter`` (registered on
  import).

Needs only PyTorch (and Triton for the ``"triton"`` backend): no timm.
"""

import importlib.util

from involution.ops import flops  # noqa: F401  (registers the ops' flop formulas)
from involution.ops.backends import BACKENDS
from involution.ops.functional import involution2d, involution2d_fused, involution2d_layer
from involution.ops.modules import Involution2d, Involution2dAffine, set_kernel_regeneration
from involution.ops.modules_nd import Involution1d, Involution3d
from involution.ops.nd import involution1d, involution3d

if importlib.util.find_spec("onnxscript") is not None:
    # torch.onnx.export builds its translation table from onnxscript's registry when it starts
    # (registers the ONNX translations of the 2-D and of the 1-D/3-D ops)
    from involution.ops import onnx_translation, onnx_translation_nd  # noqa: F401

__all__ = [
    "BACKENDS",
    "Involution1d",
    "Involution2d",
    "Involution2dAffine",
    "Involution3d",
    "involution1d",
    "involution2d",
    "involution2d_fused",
    "involution2d_layer",
    "involution3d",
    "set_kernel_regeneration",
]
