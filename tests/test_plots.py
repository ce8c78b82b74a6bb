"""The run's curves draw each task's validation metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from involution.train.plots import plot_curves
from involution.train.tasks import get_task

# matplotlib's first three cycle colours: the curves of metrics[0], metrics[1], metrics[2].
CYCLE = [(0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)]


def _records(metrics: dict[str, float]) -> list[dict]:
    train = [{"epoch": e / 2, "step": e, "train_loss": 2.0 / e} for e in range(1, 7)]
    val = [
        {"epoch": e, "step": 2 * e, **{f"val_{k}": v * e for k, v in metrics.items()}}
        for e in (1, 2, 3)
    ]
    return train + val


def _colour_pixels(path: Path, colour: tuple[int, int, int]) -> tuple[int, int]:
    """Pixels of ``colour`` in the left and right halves of the PNG at ``path``."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    near = np.abs(pixels - np.array(colour)).sum(-1) < 30
    half = pixels.shape[1] // 2
    return int(near[:, :half].sum()), int(near[:, half:].sum())


@pytest.mark.parametrize(
    ("task", "values"),
    [
        ("classification", {"loss": 1.0, "top1": 20.0, "top5": 30.0}),
        ("detection", {"bbox_AP": 0.2, "bbox_AP50": 0.3, "segm_AP": 0.1}),
        ("segmentation", {"mIoU": 0.2, "mAcc": 0.25, "aAcc": 0.3}),
    ],
)
def test_each_task_curve_metric_is_drawn(tmp_path: Path, task: str, values: dict) -> None:
    metrics = get_task(task).curve_metrics
    assert set(metrics) <= set(values)
    path = tmp_path / "curves.png"
    plot_curves(_records(values), path, metrics)
    for colour in CYCLE[: len(metrics)]:
        assert _colour_pixels(path, colour)[1] > 50  # a line per metric on the right
    # Without those records the right panel stays empty.
    plot_curves(_records({"other": 1.0}), path, metrics)
    assert _colour_pixels(path, CYCLE[0])[1] == 0
