"""RedNet models, registered with timm, and the official-checkpoint converter.

The RedNets are registered with timm's model registry (``timm.create_model("rednet50")``) by
:func:`register_with_timm`, which :mod:`involution` calls when timm is imported (or at once if
it already is). The names below are imported on first read, so that the ``involution convert``
and ``profile`` commands (:mod:`involution.models.cli`) load quickly.

The per-stage profiler (:mod:`involution.models.profile`) counts the involution ops with the
flop formulas of :mod:`involution.ops.flops`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and the API reference; imported on first read below
    from involution.models.convert import load_checkpoint, rednet_from_checkpoint
    from involution.models.fold import fold_batchnorm
    from involution.models.rednet import MODEL_DEPTHS, Bottleneck, RedNet, RedNetStem

__all__ = [
    "MODEL_DEPTHS",
    "Bottleneck",
    "RedNet",
    "RedNetStem",
    "fold_batchnorm",
    "load_checkpoint",
    "rednet_from_checkpoint",
    "register_with_timm",
]

#: Public names -> the module that defines them (imported when first read).
_LAZY = {
    "MODEL_DEPTHS": "involution.models.rednet",
    "Bottleneck": "involution.models.rednet",
    "RedNet": "involution.models.rednet",
    "RedNetStem": "involution.models.rednet",
    "fold_batchnorm": "involution.models.fold",
    "load_checkpoint": "involution.models.convert",
    "rednet_from_checkpoint": "involution.models.convert",
}
#: The modules whose ``@register_model`` functions register RedNet variants with timm. Each
#: imports only timm and :mod:`~involution.models.cfgs` before registering, so that either
#: can be imported while the other is half imported.
TIMM_MODULES = ("involution.models.rednet", "involution.models.compact")


def register_with_timm() -> None:
    """Register every RedNet variant with timm (imports timm)."""
    for module in TIMM_MODULES:
        importlib.import_module(module)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'involution.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
