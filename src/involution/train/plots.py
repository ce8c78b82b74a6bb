"""Loss and validation-metric curves of a run, drawn from its metrics records."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines

import matplotlib.pyplot as plt

from involution.train.checkpoint import atomic_path


def plot_curves(records: list[dict[str, Any]], path: Path, metrics: Sequence[str]) -> None:
    """Write a PNG with the losses (left) and the validation ``metrics`` (right) against epochs.

    ``records`` are metrics lines: training ones carry ``train_loss`` and a fractional
    ``epoch``, evaluation ones ``val_<metric>`` (``val_loss`` where the task has one, and
    ``ema_val_<metric>`` with an EMA) at whole epochs. The EMA curve is drawn for the first of
    ``metrics``.
    """
    train = [r for r in records if "train_loss" in r]
    val = [r for r in records if any(f"val_{m}" in r for m in metrics)]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot([r["epoch"] for r in train], [r["train_loss"] for r in train], label="train")
    with_loss = [r for r in val if "val_loss" in r]
    if with_loss:
        epochs = [r["epoch"] for r in with_loss]
        ax_loss.plot(epochs, [r["val_loss"] for r in with_loss], "o-", label="val")
    keys = [(f"val_{m}", m) for m in metrics] + [(f"ema_val_{metrics[0]}", f"EMA {metrics[0]}")]
    for key, label in keys:
        points = [(r["epoch"], r[key]) for r in val if key in r]
        if points:
            ax_metric.plot(*zip(*points, strict=True), "o-", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_metric.set(xlabel="epoch", title="validation")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
