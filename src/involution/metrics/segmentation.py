"""Semantic segmentation scores from one confusion matrix.

Every score comes from a single (K, K) confusion matrix ``C[target, prediction]`` of pixel
counts, accumulated over all batches by torchmetrics' ``MulticlassConfusionMatrix`` (which
drops pixels labelled with the ignore index and sums the matrix over DDP ranks when it is
computed), so no score is an average of per-batch or per-image scores.

For class k, with TP = C[k, k], FP = column sum - TP and FN = row sum - TP:

- IoU_k = TP / (TP + FP + FN) and Acc_k = TP / (TP + FN);
- ``mIoU`` / ``mAcc`` = mean over the classes whose score is defined;
- ``aAcc`` = trace / total (overall pixel accuracy).

A class absent from both the targets and the predictions has IoU NaN (0 / 0) and a class
absent from the targets has Acc NaN; NaN classes are left out of the means (as mmseg does).
All scores are fractions in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

__all__ = ["IGNORE_INDEX", "confusion_matrix_metric", "iou_table", "segmentation_scores"]

#: The label of pixels that no score counts (unlabelled or ambiguous), as in mmseg and
#: Cityscapes; the segmentation datasets mark them the same way.
IGNORE_INDEX = 255


def confusion_matrix_metric(
    num_classes: int, ignore_index: int = IGNORE_INDEX
) -> MulticlassConfusionMatrix:
    """A torchmetrics accumulator of the (K, K) pixel confusion matrix.

    ``update(preds, target)`` takes class indices of one shape (e.g. (B, H, W) int64) and
    skips target pixels equal to ``ignore_index``; ``compute()`` returns the int64 matrix
    indexed [target, prediction], summed over DDP ranks. Inputs are not re-validated
    (``validate_args=False``): datasets check label values when they read them.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False)


def segmentation_scores(confmat: Tensor, classes: Sequence[str]) -> dict[str, float]:
    """``aAcc``, ``mIoU``, ``mAcc`` and per class ``IoU.<name>`` / ``Acc.<name>`` from a
    (K, K) confusion matrix indexed [target, prediction] (see the module docstring for NaN)."""
    if confmat.ndim != 2 or confmat.shape[0] != confmat.shape[1]:
        raise ValueError(f"confusion matrix must be square (K, K), got {tuple(confmat.shape)}")
    if confmat.shape[0] != len(classes):
        raise ValueError(
            f"confusion matrix is {confmat.shape[0]}x{confmat.shape[0]}, "
            f"but there are {len(classes)} class names"
        )
    counts = confmat.double().cpu()
    true_positive = counts.diagonal()
    target_total = counts.sum(dim=1)
    union = target_total + counts.sum(dim=0) - true_positive
    # 0 / 0 = NaN marks the classes a score is undefined for.
    iou = true_positive / union
    accuracy = true_positive / target_total
    total = counts.sum()
    scores = {
        "aAcc": float(true_positive.sum() / total) if total > 0 else math.nan,
        "mIoU": float(iou.nanmean()),
        "mAcc": float(accuracy.nanmean()),
    }
    scores.update({f"IoU.{name}": float(v) for name, v in zip(classes, iou, strict=True)})
    scores.update({f"Acc.{name}": float(v) for name, v in zip(classes, accuracy, strict=True)})
    return scores


def iou_table(scores: Mapping[str, float]) -> str:
    """A text table of per-class IoU and accuracy (in %) followed by the summary scores, from
    the dict of :func:`segmentation_scores` (keys may carry a prefix such as ``val_``)."""
    prefix = next((key[: -len("mIoU")] for key in scores if key.endswith("mIoU")), "")
    names = [key[len(prefix) + 4 :] for key in scores if key.startswith(f"{prefix}IoU.")]
    width = max([len("class"), *map(len, names)])

    def percent(value: float | None) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"

    lines = [f"{'class':<{width}}  {'IoU %':>7}  {'Acc %':>7}", f"{'-' * width}  -------  -------"]
    for name in names:
        iou = percent(scores[f"{prefix}IoU.{name}"])
        acc = percent(scores.get(f"{prefix}Acc.{name}"))
        lines.append(f"{name:<{width}}  {iou:>7}  {acc:>7}")
    summary = ", ".join(
        f"{key} {percent(scores.get(prefix + key))}%" for key in ("mIoU", "mAcc", "aAcc")
    )
    lines.append(summary)
    lines.append("n/a: class absent from the labels (IoU: from the labels and the predictions)")
    return "\n".join(lines)
