"""Pictures of predictions for ``involution predict --out``: class colours, drawing, PNG files.

Drawing goes through ``torchvision.utils`` (``draw_bounding_boxes``,
``draw_segmentation_masks``) on uint8 (3, H, W) images.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

Colour = tuple[int, int, int]


def class_colours(count: int) -> list[Colour]:
    """``count`` distinct, saturated RGB colours (hues spaced by the golden ratio), stable for
    a class index whatever ``count`` is."""
    colours = []
    for index in range(count):
        hue = (index * 0.618033988749895) % 1.0
        red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
        colours.append((round(255 * red), round(255 * green), round(255 * blue)))
    return colours


def draw_instances(
    image: Tensor,
    boxes: Tensor,
    captions: Sequence[str],
    colours: Sequence[Colour],
    masks: Tensor | None = None,
    mask_alpha: float = 0.45,
) -> Tensor:
    """``image`` uint8 (3, H, W) with N instances drawn: ``masks`` bool (N, H, W) blended in
    first, then ``boxes`` (N, 4) XYXY pixels with their ``captions``, one colour each.
    Returns uint8 (3, H, W)."""
    if masks is not None and len(masks):
        image = draw_segmentation_masks(image, masks, alpha=mask_alpha, colors=list(colours))
    if len(boxes):
        image = draw_bounding_boxes(
            image, boxes, labels=list(captions), colors=list(colours), width=2
        )
    return image


def save_png(image: Tensor, path: Path) -> None:
    """Write a uint8 (C, H, W) image (C = 1 or 3) as a PNG file, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = image.detach().to("cpu", torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(
        np.ascontiguousarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    ).save(path)
