"""RedNet models (registered with timm on import) and the official-checkpoint converter."""

from involution.models import compact  # noqa: F401  (registers the compact variants)
from involution.models.rednet import MODEL_DEPTHS, Bottleneck, RedNet, RedNetStem

__all__ = ["MODEL_DEPTHS", "Bottleneck", "RedNet", "RedNetStem"]
