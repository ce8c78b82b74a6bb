"""Object detection and instance segmentation: torchvision's RetinaNet / Faster R-CNN / Mask
R-CNN on RedNet-FPN backbones (:data:`involution.models.detection.DETECTION_MODELS`), COCO data
and the COCO protocol.

- Data (``data.dataset``): ``coco`` reads ``detection.{train,val}_{images,annotations}`` under
  ``data.root``; ``fashion_mnist_scenes`` first builds (or reuses) the Fashion-MNIST scenes in
  ``data.root`` (default ``~/.cache/involution/fashion_mnist_scenes``) with ``data.scenes``,
  then reads them the same way. Images are resized in the dataset (shorter side
  ``detection.min_size``, longer side at most ``detection.max_size``), and the detector's own
  resize is set to the same sizes, so it leaves them as they are.
- Model: ``model.name`` is a :data:`DETECTION_MODELS` name, ``model.kwargs`` its builder's
  arguments (``backbone_kwargs``, ``fpn_channels``, ``trainable_stages``, ``norm_eval``, any
  torchvision detector argument), plus ``anchor_sizes`` (one list of sizes per feature level)
  and ``anchor_aspect_ratios``, which become torchvision's ``AnchorGenerator``.
- Loss: the terms of the detector's loss dict, which the engine adds up and logs one by one.
  Metrics: COCO box AP/AR (and mask AP/AR for Mask R-CNN) on the original images, see
  :mod:`involution.metrics.coco`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator

from involution.datasets.coco import (
    CocoDetection,
    collate_detection,
    detection_transform,
    image_transform,
)
from involution.datasets.sampling import read_image, subset_indices
from involution.datasets.scenes import prepare_scenes
from involution.metrics.coco import (
    coco_evaluate,
    format_coco_table,
    rescale_detections,
    to_coco_results,
)
from involution.models.detection import DETECTION_MODELS
from involution.train.config import Config
from involution.train.data import DataBundle
from involution.train.distributed import DistInfo, broadcast_from_main
from involution.train.tasks.base import Evaluation, Predictor, Task
from involution.train.tasks.drawing import class_colours, draw_instances

Batch = tuple[list[Tensor], list[dict[str, Any]]]


def _sources(config: Config) -> dict[str, tuple[Path, Path]]:
    """``{"train": (image folder, instances JSON), "val": (...)}`` of the configured data."""
    data = config["data"]
    if data["dataset"] == "fashion_mnist_scenes":
        root = prepare_scenes(data["root"], **data["scenes"])
        return {
            role: (root / "images" / role, root / "annotations" / f"instances_{role}.json")
            for role in ("train", "val")
        }
    if data["root"] is None:
        raise ValueError(
            "data.root must be set for data.dataset=coco (the folder holding the "
            "detection.{train,val}_images folders and _annotations files)"
        )
    root = Path(data["root"]).expanduser()
    det = config["detection"]
    return {
        role: (root / det[f"{role}_images"], root / det[f"{role}_annotations"])
        for role in ("train", "val")
    }


def _needs_masks(config: Config) -> bool:
    """Whether the configured model is a Mask R-CNN (its training targets need masks)."""
    return config["model"]["name"].startswith("maskrcnn")


class DetectionTask(Task):
    """Detection (and instance segmentation) with the COCO protocol."""

    name = "detection"
    key_metric = "bbox_AP"
    curve_metrics = ("bbox_AP", "bbox_AP50", "segm_AP")

    def build_data(self, config: Config, train: bool = True) -> DataBundle:
        """The train and val :class:`CocoDetection` sets (val only with ``train=False``),
        ``data.{train,val}_subset`` applied; classes are the category names in id order."""
        det = config["detection"]
        seed = config["train"]["seed"]
        sources = _sources(config)
        roles = ("train", "val") if train else ("val",)
        datasets: dict[str, CocoDetection] = {}
        for role in roles:
            images, annotations = sources[role]
            datasets[role] = CocoDetection(
                images,
                annotations,
                transform=detection_transform(
                    role == "train", det["min_size"], det["max_size"], det["hflip"]
                ),
                seed=seed,
                # Evaluation scores against the JSON: its samples need no decoded masks.
                masks=role == "train" and _needs_masks(config),
                categories=datasets["train"].categories if "train" in datasets else None,
            )
            size = config["data"][f"{role}_subset"]
            if size is not None:
                datasets[role].select(subset_indices(size, len(datasets[role]), seed).tolist())
        val = datasets["val"]
        return DataBundle(
            train=datasets.get("train", []),
            val=val,
            classes=list(val.categories.names),
            in_chans=3,
            collate_fn=collate_detection,
            group_ids=datasets["train"].group_ids if train else None,
        )

    def build_model(self, config: Config, classes: list[str], in_chans: int) -> nn.Module:
        """``DETECTION_MODELS[model.name](num_classes=len(classes) + 1, **model.kwargs)`` with
        the detector's resize set to ``detection.min_size`` / ``max_size``."""
        name = config["model"]["name"]
        if name not in DETECTION_MODELS:
            raise ValueError(
                f"unknown detection model {name!r}; choose one of {', '.join(DETECTION_MODELS)}"
            )
        if in_chans != 3:
            raise ValueError(f"the detectors take RGB images (in_chans=3), got in_chans={in_chans}")
        kwargs = dict(config["model"]["kwargs"])
        sizes = kwargs.pop("anchor_sizes", None)
        ratios = kwargs.pop("anchor_aspect_ratios", None)
        if sizes is not None:
            anchors = _anchor_generator(sizes, ratios)
            kwargs["anchor_generator" if "retinanet" in name else "rpn_anchor_generator"] = anchors
        elif ratios is not None:
            raise ValueError("model.kwargs.anchor_aspect_ratios needs anchor_sizes too")
        kwargs.setdefault("min_size", config["detection"]["min_size"])
        kwargs.setdefault("max_size", config["detection"]["max_size"])
        return DETECTION_MODELS[name](num_classes=len(classes) + 1, **kwargs)

    def to_device(self, batch: Batch, device: torch.device, channels_last: bool) -> Batch:
        """Images and target tensors on ``device`` as plain tensors. (Detectors pad and stack
        the images themselves, so ``channels_last`` has no input to apply to.)"""
        images, targets = batch
        moved_images = [image.as_subclass(Tensor).to(device, non_blocking=True) for image in images]
        moved_targets = [
            {
                key: value.as_subclass(Tensor).to(device, non_blocking=True)
                if isinstance(value, Tensor)
                else value
                for key, value in target.items()
            }
            for target in targets
        ]
        return moved_images, moved_targets

    def loss(self, net: nn.Module, batch: Batch, config: Config) -> dict[str, Tensor]:
        """The detector's losses as float terms named without torchvision's ``loss_`` prefix:
        ``classifier``, ``box_reg``, ``objectness``, ``rpn_box_reg`` and, for Mask R-CNN,
        ``mask`` (RetinaNet: ``classification``, ``bbox_regression``)."""
        images, targets = batch
        losses = net(images, targets)
        return {name.removeprefix("loss_"): value.float() for name, value in losses.items()}

    def start_evaluation(self, loader: Iterable[Any], info: DistInfo) -> Evaluation:
        """COCO box (and, for models that predict masks, mask) AP/AR over the loader's
        dataset (a :class:`CocoDetection`)."""
        dataset = getattr(loader, "dataset", None)
        if not isinstance(dataset, CocoDetection):
            raise TypeError(f"evaluate needs a loader over a CocoDetection, got {type(dataset)}")
        return _CocoEvaluation(dataset, info)

    def format_metrics(self, metrics: dict[str, float]) -> str:
        return "COCO metrics\n" + format_coco_table(metrics)

    def predictor(
        self, model: nn.Module, config: Config, classes: list[str], in_chans: int
    ) -> Predictor:
        return _Detector(model, config["detection"], classes)


class _CocoEvaluation(Evaluation):
    """Every rank detects on its shard; the results are gathered and scored on rank 0 and the
    metrics broadcast, so every rank returns the same dict."""

    def __init__(self, dataset: CocoDetection, info: DistInfo) -> None:
        self.dataset = dataset
        self.info = info
        self.results: dict[str, list[dict[str, Any]]] = {"bbox": [], "segm": []}
        self.image_ids: list[int] = []
        self.masks = False

    def forward(self, model: nn.Module, batch: Batch) -> list[dict[str, Tensor]]:
        return model(batch[0])

    def update(self, batch: Batch, outputs: list[dict[str, Tensor]]) -> None:
        images, targets = batch
        for image, target, output in zip(images, targets, outputs, strict=True):
            found = to_coco_results(
                output,
                target["image_id"],
                tuple(image.shape[-2:]),
                target["orig_size"],
                self.dataset.categories.ids,
            )
            for iou_type, entries in found.items():
                self.results[iou_type] += entries
            self.image_ids.append(target["image_id"])
            self.masks = self.masks or "masks" in output

    def compute(self) -> dict[str, float]:
        shards = [(self.results, self.image_ids, self.masks)]
        if self.info.distributed:
            shards = [None] * self.info.world_size
            dist.all_gather_object(shards, (self.results, self.image_ids, self.masks))
        metrics: dict[str, float] = {}
        if self.info.is_main:
            merged: dict[str, list[dict[str, Any]]] = {"bbox": [], "segm": []}
            for shard_results, _, _ in shards:
                for iou_type, entries in shard_results.items():
                    merged[iou_type] += entries
            all_ids = [i for _, ids, _ in shards for i in ids]
            if not all_ids:
                raise ValueError("the evaluation set is empty")
            iou_types = ("bbox", "segm") if any(m for _, _, m in shards) else ("bbox",)
            metrics = coco_evaluate(self.dataset.coco, merged, all_ids, iou_types)
        return broadcast_from_main(metrics, self.info)


class _Detector(Predictor):
    """An image's detections scoring at least ``detection.score_threshold`` (at most ``topk``,
    best first) and, to draw, their boxes, class names, scores and masks on the original
    image."""

    def __init__(self, model: nn.Module, det: dict[str, Any], classes: list[str]) -> None:
        self.model = model
        self.threshold = det["score_threshold"]
        self.transform = image_transform(det["min_size"], det["max_size"])
        self.classes = classes
        self.colours = class_colours(len(classes))
        self.device = next(model.parameters()).device

    def __call__(self, path: Path, topk: int, draw: bool) -> tuple[str, Tensor | None]:
        original = torch.from_numpy(np.array(read_image(str(path)))).permute(2, 0, 1)
        resized = self.transform(original)
        output = self.model([resized.as_subclass(Tensor).to(self.device)])[0]
        found = rescale_detections(output, tuple(resized.shape[-2:]), tuple(original.shape[-2:]))
        keep = (found["scores"] >= self.threshold).nonzero().flatten()[:topk]
        labels = found["labels"][keep].tolist()
        names = [self.classes[label - 1] for label in labels]
        scores = found["scores"][keep].tolist()
        boxes = found["boxes"][keep]
        lines = [f"{path}: {len(keep)} detections (score >= {self.threshold:g})"]
        for name, score, box in zip(names, scores, boxes.tolist(), strict=True):
            corners = ", ".join(f"{v:.0f}" for v in box)
            lines.append(f"  {score:5.3f}  {name:<14} [{corners}]")
        if not draw:
            return "\n".join(lines), None
        masks = found["masks"][keep, 0] >= 0.5 if "masks" in found else None
        drawn = draw_instances(
            original,
            boxes,
            [f"{name} {score:.2f}" for name, score in zip(names, scores, strict=True)],
            [self.colours[label - 1] for label in labels],
            masks,
        )
        return "\n".join(lines), drawn


def _anchor_generator(
    sizes: list[list[int]] | list[int], ratios: list[float] | list[list[float]] | None
) -> AnchorGenerator:
    """torchvision's ``AnchorGenerator`` from YAML lists: ``sizes`` per feature level (a flat
    list means one size per level), ``ratios`` shared by all levels or one list per level
    (default 0.5, 1, 2)."""
    per_level = tuple(tuple(s) if isinstance(s, list | tuple) else (s,) for s in sizes)
    ratios = ratios or [0.5, 1.0, 2.0]
    if all(isinstance(r, list | tuple) for r in ratios):
        aspect = tuple(tuple(r) for r in ratios)
    else:
        aspect = (tuple(ratios),) * len(per_level)
    if len(aspect) != len(per_level):
        raise ValueError(
            f"anchor_aspect_ratios has {len(aspect)} levels, anchor_sizes {len(per_level)}"
        )
    return AnchorGenerator(per_level, aspect)


TASK = DetectionTask()

__all__ = ["TASK", "DetectionTask"]
