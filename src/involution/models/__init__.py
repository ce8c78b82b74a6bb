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
from typing import TYPE_CHECKING

from involution.lazy import lazy_getattr

if TYPE_CHECKING:  # for type checkers and the API reference; imported on first read below
    from involution.models.convert import load_checkpoint, rednet_from_checkpoint
    from involution.models.fold import fold_batchnorm
    from involution.models.rednet import (
        MODEL_DEPTHS,
        Bottleneck,
        RedNet,
        RedNetArch,
        RedNetStem,
    )

__all__ = [
    "MODEL_DEPTHS",
    "Bottleneck",
    "RedNet",
    "RedNetArch",
    "RedNetStem",
    "fold_batchnorm",
    "load_checkpoint",
    "rednet_from_checkpoint",
    "register_with_timm",
]

# Public names by the module that defines them, imported when first read.
__getattr__ = lazy_getattr(
    __name__,
    {
        "involution.models.rednet": (
            "MODEL_DEPTHS",
            "Bottleneck",
            "RedNet",
            "RedNetArch",
            "RedNetStem",
        ),
        "involution.models.fold": ("fold_batchnorm",),
        "involution.models.convert": ("load_checkpoint", "rednet_from_checkpoint"),
    },
    globals(),
)
#: The modules whose ``@register_model`` functions register RedNet variants with timm. Each
#: imports only timm and :mod:`~involution.models.cfgs` before registering, so that either
#: can be imported while the other is half imported.
TIMM_MODULES = ("involution.models.rednet", "involution.models.compact")


def register_with_timm() -> None:
    """Register every RedNet variant with timm (imports timm)."""
    for module in TIMM_MODULES:
        importlib.import_module(module)
