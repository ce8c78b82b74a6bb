"""RedNet models (registered with timm on import) and the official-checkpoint converter.

Importing this package also registers the involution ops' flop formulas with
``torch.utils.flop_counter`` (see :mod:`involution.models.profile`).
"""

from involution.models import (
    compact,  # noqa: F401  (registers the compact variants)
    profile,  # noqa: F401  (registers the involution flop formulas)
)
from involution.models.convert import load_checkpoint, rednet_from_checkpoint
from involution.models.rednet import MODEL_DEPTHS, Bottleneck, RedNet, RedNetStem

__all__ = [
    "MODEL_DEPTHS",
    "Bottleneck",
    "RedNet",
    "RedNetStem",
    "load_checkpoint",
    "rednet_from_checkpoint",
]
