"""COCO evaluation of torchvision-style detections with pycocotools' ``COCOeval``.

A detector returns, per image, ``boxes`` (N, 4) XYXY in the pixels of the image it was fed,
``labels`` (N,) contiguous 1..C, ``scores`` (N,) and, for Mask R-CNN, ``masks`` (N, 1, H, W)
probabilities. :func:`rescale_detections` maps them back to the original image's pixels,
:func:`to_coco_results` also to category ids in COCO's result format; :func:`coco_evaluate`
scores a set of results against the ground truth:

- ``{iou_type}_AP``: AP averaged over IoU 0.50:0.05:0.95 (the COCO metric), ``_AP50``,
  ``_AP75``; ``_APs``/``_APm``/``_APl``: objects under 32², between 32² and 96², over 96²
  pixels; ``_AR1``/``_AR10``/``_AR100``: recall with at most 1/10/100 detections per image,
  ``_ARs``/``_ARm``/``_ARl``. All in [0, 1]; -1 where the ground truth has no object of that
  size (pycocotools' convention).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from contextlib import redirect_stdout
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

#: COCOeval's ``stats``, in order.
STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")


def rescale_detections(
    prediction: dict[str, Tensor], input_size: tuple[int, int], original_size: tuple[int, int]
) -> dict[str, Tensor]:
    """A detector's output for an image resized from ``original_size`` to ``input_size``
    (``(height, width)`` each), mapped back to the original pixels, on the CPU in float32.

    ``boxes`` (N, 4) XYXY are scaled per axis; ``masks`` (N, 1, H, W) probabilities are
    resized bilinearly to (N, 1, original height, original width); ``labels`` and ``scores``
    are kept.
    """
    (in_h, in_w), (out_h, out_w) = input_size, original_size
    scale = torch.tensor([out_w / in_w, out_h / in_h, out_w / in_w, out_h / in_h])
    result = {
        "boxes": prediction["boxes"].detach().float().cpu() * scale,
        "labels": prediction["labels"].detach().cpu(),
        "scores": prediction["scores"].detach().float().cpu(),
    }
    if "masks" in prediction:
        masks = prediction["masks"].detach().float().cpu()
        if len(masks) and masks.shape[-2:] != (out_h, out_w):
            masks = torch.nn.functional.interpolate(
                masks, size=(out_h, out_w), mode="bilinear", align_corners=False
            )
        result["masks"] = masks.reshape(len(masks), 1, out_h, out_w)
    return result


def to_coco_results(
    prediction: dict[str, Tensor],
    image_id: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    category_ids: Sequence[int],
    mask_threshold: float = 0.5,
) -> dict[str, list[dict[str, Any]]]:
    """One image's detections as COCO results, per IoU type (``"bbox"``, and ``"segm"`` when
    the prediction has masks).

    Args:
        prediction: ``boxes`` (N, 4) XYXY in the pixels of the ``input_size`` image,
            ``labels`` (N,) in 1..C, ``scores`` (N,), optionally ``masks`` (N, 1, H, W) in
            [0, 1] at ``input_size``.
        image_id: the ground truth's image id.
        input_size: ``(height, width)`` of the image the detector was fed.
        original_size: ``(height, width)`` of the image the ground truth refers to.
        category_ids: ``category_ids[label - 1]`` is the COCO category id of ``label``.
        mask_threshold: mask probability from which a pixel belongs to the object.

    Returns:
        ``{"bbox": [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...],
        "segm": [{"image_id", "category_id", "segmentation": RLE, "score"}, ...]}``.
    """
    prediction = rescale_detections(prediction, input_size, original_size)
    boxes = prediction["boxes"]
    boxes[:, 2:] -= boxes[:, :2]
    scores = prediction["scores"].tolist()
    categories = [category_ids[label - 1] for label in prediction["labels"].tolist()]
    results: dict[str, list[dict[str, Any]]] = {
        "bbox": [
            {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
            for c, b, s in zip(categories, boxes.tolist(), scores, strict=True)
        ]
    }
    if "masks" in prediction:
        binary = (prediction["masks"][:, 0] >= mask_threshold).numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        results["segm"] = []
        for c, rle, s in zip(categories, rles, scores, strict=True):
            rle["counts"] = rle["counts"].decode("ascii")  # JSON- and pickle-friendly
            results["segm"].append(
                {"image_id": image_id, "category_id": c, "segmentation": rle, "score": s}
            )
    return results


def _load_results(coco_gt: COCO, results: list[dict[str, Any]]) -> COCO:
    """``coco_gt.loadRes(results)``, quietly, without touching ``results``, and for an empty
    list too (every AP is then 0)."""
    if results:
        with redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(copy.deepcopy(results))
    empty = COCO()
    empty.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    with redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def coco_evaluate(
    coco_gt: COCO,
    results: dict[str, list[dict[str, Any]]],
    image_ids: Sequence[int] | None = None,
    iou_types: Sequence[str] = ("bbox",),
) -> dict[str, float]:
    """COCOeval's 12 statistics per IoU type, as ``{f"{iou_type}_{name}": value}``.

    Args:
        coco_gt: the ground truth.
        results: per IoU type, COCO results (as :func:`to_coco_results` returns, concatenated
            over images).
        image_ids: the images that were evaluated (default: every image of ``coco_gt``); the
            ground truth of other images is ignored.
        iou_types: ``"bbox"`` and/or ``"segm"``.
    """
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
        coco_dt = _load_results(coco_gt, results.get(iou_type, []))
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(image_ids))
        with redirect_stdout(io.StringIO()):  # COCOeval prints its progress and summary
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for name, value in zip(STAT_NAMES, evaluator.stats, strict=True):
            metrics[f"{iou_type}_{name}"] = float(value)
    return metrics


def format_coco_table(metrics: dict[str, float]) -> str:
    """The COCO statistics in ``metrics`` as a table: one row per IoU type, "-" where the
    ground truth has no object of that size."""
    rows = [t for t in IOU_TYPES if f"{t}_AP" in metrics]
    header = f"{'':<6}" + "".join(f"{name:>7}" for name in STAT_NAMES)
    lines = [header]
    for iou_type in rows:
        cells = []
        for name in STAT_NAMES:
            value = metrics.get(f"{iou_type}_{name}", -1.0)
            cells.append(f"{value:>7.3f}" if value >= 0 else f"{'-':>7}")
        lines.append(f"{iou_type:<6}" + "".join(cells))
    return "\n".join(lines)
