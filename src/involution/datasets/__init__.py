"""Datasets: Fashion-MNIST's IDX files (:mod:`~involution.datasets.fashion_mnist`), the
classification sets read from them, from ImageFolder trees or made up
(:mod:`~involution.datasets.classification`), the "Fashion-MNIST scenes" built for the
detection and segmentation demos (:mod:`~involution.datasets.scenes`: COCO boxes, RLE masks,
semantic labels), COCO-format detection data (:mod:`~involution.datasets.coco`) and
segmentation image/label layouts (:mod:`~involution.datasets.segmentation`).

Only the torch-free generators are imported here; the torch datasets are imported from their
modules.
"""

from involution.datasets.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    find_fashion_mnist,
    load_fashion_mnist,
)
from involution.datasets.scenes import SceneParams, build_scenes, ensure_scenes, scene_statistics

__all__ = [
    "FASHION_MNIST_CLASSES",
    "SceneParams",
    "build_scenes",
    "ensure_scenes",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "scene_statistics",
]
