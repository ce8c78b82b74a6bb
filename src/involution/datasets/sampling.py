"""Per-sample seeding and file reading shared by every dataset.

Random augmentation is a pure function of ``(seed, epoch, sample index)``: samplers yield
:data:`SampleKey` ``(epoch, index)`` keys, datasets derive each sample's seed with
:func:`sample_seeds` and run their random transform under it with :func:`seeded_transform`.
A run therefore sees the same augmented images whatever the number of workers, ranks or
resumptions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

#: File suffixes read as images by the folder datasets.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: ``(epoch, index)``: what samplers yield and datasets are indexed by.
SampleKey = tuple[int, int]

T = TypeVar("T")


def sample_seeds(
    seed: int, epoch: int | np.ndarray, indices: np.ndarray | Sequence[int]
) -> np.ndarray:
    """64-bit seeds, one per sample, mixing (seed, epoch, index) with SplitMix64. Shape (N,);
    ``epoch`` is a scalar or one value per index."""
    with np.errstate(over="ignore"):
        x = np.asarray(indices, dtype=np.uint64)
        x = x + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = x ^ (np.asarray(epoch, dtype=np.uint64) * np.uint64(0xBF58476D1CE4E5B9))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def seeded_transform(transform: Callable[[Any], T], seed: int, sample: Any) -> T:
    """``transform(sample)`` with torch's CPU generator seeded by ``seed``; the generator's
    previous state is restored afterwards (torchvision's transforms draw from the global one)."""
    generator = torch.default_generator
    state = generator.get_state()
    try:
        generator.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        return transform(sample)
    finally:
        generator.set_state(state)


def subset_indices(n: int | None, total: int, seed: int) -> np.ndarray:
    """A fixed random choice of ``n`` of ``total`` indices, sorted (all when ``n`` is None)."""
    if n is None or n >= total:
        return np.arange(total)
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    generator = torch.Generator().manual_seed(seed)
    return np.sort(torch.randperm(total, generator=generator)[:n].numpy())


def read_image(path: str) -> Image.Image:
    """The image file at ``path`` as RGB; an unreadable file raises ``OSError`` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err


__all__ = [
    "IMAGE_EXTENSIONS",
    "SampleKey",
    "read_image",
    "sample_seeds",
    "seeded_transform",
    "subset_indices",
]
