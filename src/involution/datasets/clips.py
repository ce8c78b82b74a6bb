"""Moving Fashion-MNIST: short clips of a real Fashion-MNIST item moving across the frames.

Each clip is ``frames`` frames of a ``canvas`` x ``canvas`` grey canvas on which one item
(a Fashion-MNIST image, 2x2 average-pooled to 14x14) moves in a straight line by ``speed`` pixels
per frame in one of four directions. The label is ``item class * 4 + direction``: telling
directions apart needs the time axis, telling items apart the image, so a 3-D model needs both.

Pure numpy, deterministic for a seed; built from the Fashion-MNIST files found by
:func:`~involution.datasets.fashion_mnist.find_fashion_mnist` (no download when installed).
"""

from __future__ import annotations

import numpy as np

from involution.datasets.fashion_mnist import FASHION_MNIST_CLASSES

#: Direction index -> (dy, dx) per frame in units of ``speed``.
DIRECTIONS: tuple[tuple[str, tuple[int, int]], ...] = (
    ("right", (0, 1)),
    ("left", (0, -1)),
    ("down", (1, 0)),
    ("up", (-1, 0)),
)
CLIP_CLASSES: tuple[str, ...] = tuple(
    f"{item} moving {direction}" for item in FASHION_MNIST_CLASSES for direction, _ in DIRECTIONS
)
ITEM_SIZE = 14


def make_clips(
    images: np.ndarray,
    labels: np.ndarray,
    count: int,
    frames: int = 8,
    canvas: int = 32,
    speed: int = 2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` clips (N, 1, frames, canvas, canvas) float32 in [0, 1] and labels (N,) int64.

    ``images`` (M, 28, 28) uint8 and ``labels`` (M,) are Fashion-MNIST items, drawn at random;
    each clip's start is random such that the item stays inside the canvas on every frame.
    """
    travel = speed * (frames - 1)
    if canvas < ITEM_SIZE + travel:
        raise ValueError(
            f"canvas {canvas} is too small for a {ITEM_SIZE}-pixel item moving {travel} pixels"
        )
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(images), count)
    items = images[picks].reshape(count, ITEM_SIZE, 2, ITEM_SIZE, 2).mean(axis=(2, 4)) / 255.0
    directions = rng.integers(0, len(DIRECTIONS), count)
    clips = np.zeros((count, 1, frames, canvas, canvas), dtype=np.float32)
    for n in range(count):
        dy, dx = DIRECTIONS[directions[n]][1]
        # Start so that the whole path stays inside: the moving axis has `travel` less room.
        room_y = canvas - ITEM_SIZE - (travel if dy else 0)
        room_x = canvas - ITEM_SIZE - (travel if dx else 0)
        y0 = rng.integers(0, room_y + 1) + (travel if dy < 0 else 0)
        x0 = rng.integers(0, room_x + 1) + (travel if dx < 0 else 0)
        for t in range(frames):
            y, x = y0 + dy * speed * t, x0 + dx * speed * t
            clips[n, 0, t, y : y + ITEM_SIZE, x : x + ITEM_SIZE] = items[n]
    return clips, labels[picks] * len(DIRECTIONS) + directions
