"""timm's pretrained configs of the RedNets: input size, normalisation, crop, classifier name
and first conv, read by ``timm.data.resolve_data_config`` and timm's weight loading.

Kept apart from :mod:`involution.models.rednet` so that every module registering RedNet
variants with timm (:mod:`~involution.models.rednet`, :mod:`~involution.models.compact`) can
build its configs without importing the others.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = ["rednet_cfg"]


def rednet_cfg(**overrides: Any) -> dict[str, Any]:
    """An ImageNet RedNet's config (3 x 224 x 224, 1000 classes), with ``overrides``."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1",
        "classifier": "fc",
        "license": "mit",
        "origin_url": "https://github.com/d-li14/involution",
        "paper_ids": "arXiv:2103.06255",
        **overrides,
    }
