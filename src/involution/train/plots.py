"""Loss and accuracy curves of a run, drawn from its metrics records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines

import matplotlib.pyplot as plt

from involution.train.checkpoint import atomic_path


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Write a PNG with train/val loss (left) and val top-1/top-5 (right) against epochs.

    ``records`` are metrics lines: training ones carry ``train_loss`` and a fractional
    ``epoch``, evaluation ones ``val_loss``, ``val_top1`` ... at whole epochs.
    """
    train = [r for r in records if "train_loss" in r]
    val = [r for r in records if "val_top1" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot([r["epoch"] for r in train], [r["train_loss"] for r in train], label="train")
    if val:
        epochs = [r["epoch"] for r in val]
        ax_loss.plot(epochs, [r["val_loss"] for r in val], "o-", label="val")
        for key, label in (("val_top1", "top-1"), ("val_top5", "top-5"), ("ema_val_top1", "EMA")):
            if any(key in r for r in val):
                ax_acc.plot(epochs, [r.get(key) for r in val], "o-", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
