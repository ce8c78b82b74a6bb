"""RedNet models (registered with timm on import) and the official-checkpoint converter.

The per-stage profiler (:mod:`involution.models.profile`) counts the involution ops with the
flop formulas of :mod:`involution.ops.flops`.
"""

from involution.models import compact  # noqa: F401  (registers the compact variants)
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
]
