"""Semantic segmentation: Semantic FPN / UPerNet on RedNet, cross-entropy, mIoU.

- Data (``data.dataset``): ``folder`` (``data.root/images/<split>`` + ``labels/<split>``, class
  names in ``segmentation.classes``), ``cityscapes`` (train-id labels, 19 classes), ``ade20k``
  (150 classes, zero label reduced; splits ``training``/``validation``) and
  ``fashion_mnist_scenes`` (background + the 10 Fashion-MNIST classes, built on first use from
  ``data.scenes`` into ``data.root``). See :mod:`involution.datasets.segmentation`.
- Model: ``SEGMENTATION_MODELS[model.name](num_classes=len(classes), **model.kwargs)``.
- Loss: pixel cross-entropy ignoring label 255 on ``"out"``, plus ``segmentation.aux_weight``
  (0.4) times the same on ``"aux"`` when the model has an auxiliary head (as mmseg).
- Evaluation: one confusion matrix over the evaluation set and every rank
  (:mod:`involution.metrics.segmentation`): ``mIoU``, ``mAcc``, ``aAcc``, ``IoU.<class>``,
  ``Acc.<class>``, fractions in [0, 1]. Inference is whole-image or sliding-window
  (``segmentation.inference``); logits are resized to each label's size before the argmax.
- Prediction: colour overlays of the predicted masks (``--out DIR``) and per-class pixel shares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.utils import draw_segmentation_masks

from involution.datasets.fashion_mnist import FASHION_MNIST_CLASSES
from involution.datasets.sampling import subset_indices
from involution.datasets.scenes import prepare_scenes
from involution.datasets.segmentation import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    IGNORE_INDEX,
    AugmentSettings,
    PairLayout,
    SegmentationBatch,
    SegmentationDataset,
    ade20k_layout,
    cityscapes_layout,
    collate_segmentation,
    eval_transform,
    generic_layout,
    read_image,
    scan_pairs,
    train_transform,
)
from involution.metrics.segmentation import confusion_matrix_metric, iou_table, segmentation_scores
from involution.train.config import Config
from involution.train.data import DataBundle
from involution.train.distributed import DistInfo
from involution.train.tasks.base import Evaluation, Predictor, Task
from involution.train.tasks.drawing import class_colours

#: Class names of the Fashion-MNIST scenes' label maps (0 background, k = Fashion-MNIST k - 1).
SCENES_CLASSES: tuple[str, ...] = ("background", *FASHION_MNIST_CLASSES)
#: A class of this name is left undrawn by ``predict``.
BACKGROUND = "background"
INFERENCE_MODES = ("whole", "slide")


# ----------------------------------------------------------------------------- inference


@dataclass(frozen=True)
class Inference:
    """How logits are computed for evaluation and prediction.

    ``whole``: one forward pass over the (padded) batch. ``slide`` (mmseg's slide mode):
    windows of ``crop`` (h, w) every ``stride`` (h, w), the last row/column shifted back to end
    at the image border, each window's logits added into place and divided by the number of
    windows covering the pixel. Images smaller than ``crop`` make one window of their size.
    """

    mode: str = "whole"
    crop: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.mode not in INFERENCE_MODES:
            raise ValueError(
                f"segmentation.inference must be one of {INFERENCE_MODES}, got {self.mode!r}"
            )
        if self.mode == "slide":
            for name, value in (("slide_crop", self.crop), ("slide_stride", self.stride)):
                if value is None or len(value) != 2 or min(value) < 1:
                    raise ValueError(
                        f"segmentation.inference=slide needs segmentation.{name} = [h, w] of "
                        f"positive ints, got {value!r}"
                    )

    @classmethod
    def from_config(cls, config: Config) -> Inference:
        seg = config["segmentation"]
        crop, stride = seg["slide_crop"], seg["slide_stride"]
        return cls(
            seg["inference"],
            tuple(crop) if crop is not None else None,
            tuple(stride) if stride is not None else None,
        )

    def __call__(self, model: nn.Module, images: Tensor) -> Tensor:
        """Logits (B, K, H, W) of images (B, C, H, W)."""
        if self.mode == "whole":
            return model(images)["out"]
        return sliding_window_logits(model, images, self.crop, self.stride)


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis: every ``stride``, the last one moved back
    so it ends at ``size`` (one window at 0 when ``size <= crop``)."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, size - crop), 0) for i in range(count)})


def sliding_window_logits(
    model: nn.Module, images: Tensor, crop: Sequence[int], stride: Sequence[int]
) -> Tensor:
    """Logits (B, K, H, W) of images (B, C, H, W) averaged over overlapping windows (see
    :class:`Inference`)."""
    height, width = images.shape[-2:]
    logits: Tensor | None = None
    counts = images.new_zeros((1, 1, height, width))
    for top in window_starts(height, crop[0], stride[0]):
        for left in window_starts(width, crop[1], stride[1]):
            bottom, right = min(top + crop[0], height), min(left + crop[1], width)
            window = model(images[..., top:bottom, left:right])["out"].float()
            if logits is None:
                logits = window.new_zeros((*window.shape[:2], height, width))
            logits[..., top:bottom, left:right] += window
            counts[..., top:bottom, left:right] += 1
    return logits / counts


def _resize_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of logits (B, K, h, w) to ``size`` (no-op when equal)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- helpers


def _pair(config: Config, key: str) -> tuple[int, int] | None:
    value = config["segmentation"][key]
    if value is None:
        return None
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(f"segmentation.{key} must be [h, w] of positive ints, got {value!r}")
    return (value[0], value[1])


def _normalization(config: Config) -> tuple[list[float], list[float]]:
    mean = config["data"]["mean"] or list(IMAGENET_DEFAULT_MEAN)
    std = config["data"]["std"] or list(IMAGENET_DEFAULT_STD)
    if len(mean) == 1:
        mean = mean * 3
    if len(std) == 1:
        std = std * 3
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"data.mean/std need 1 or 3 values (RGB), got {mean} and {std}")
    return list(mean), list(std)


def dataset_spec(config: Config) -> tuple[list[str], Callable[[str], PairLayout], bool]:
    """Class names, split -> file layout, and whether to reduce the zero label, for
    ``config["data"]``."""
    data, seg = config["data"], config["segmentation"]
    kind = data["dataset"]
    if kind == "fashion_mnist_scenes":
        root = prepare_scenes(data["root"], **data["scenes"])
        return list(SCENES_CLASSES), lambda split: generic_layout(root, split), False
    if data["root"] is None:
        raise ValueError(f"data.root must be set for data.dataset={kind}")
    root = Path(data["root"]).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    if kind == "cityscapes":
        return list(CITYSCAPES_CLASSES), lambda split: cityscapes_layout(root, split), False
    if kind == "ade20k":
        return list(ADE20K_CLASSES), lambda split: ade20k_layout(root, split), True
    if kind != "folder":
        raise ValueError(f"data.dataset={kind!r} is not a segmentation dataset")
    classes = seg["classes"]
    if not classes or not all(isinstance(name, str) for name in classes):
        raise ValueError(
            "data.dataset=folder needs segmentation.classes: the class names, label value i "
            f"being classes[i], got {classes!r}"
        )
    if len(classes) > IGNORE_INDEX:
        raise ValueError(f"at most {IGNORE_INDEX} classes (255 is the ignore label)")
    return list(classes), lambda split: generic_layout(root, split), seg["reduce_zero_label"]


# ----------------------------------------------------------------------------- the task


class SegmentationTask(Task):
    """Semantic segmentation (see the module docstring). Batches are
    :class:`~involution.datasets.segmentation.SegmentationBatch`."""

    name = "segmentation"
    key_metric = "mIoU"
    curve_metrics = ("mIoU", "mAcc", "aAcc")
    picture_suffix = "_segmentation"

    def build_data(self, config: Config, train: bool = True) -> DataBundle:
        data, seg = config["data"], config["segmentation"]
        seed = config["train"]["seed"]
        classes, layout, reduce_zero_label = dataset_spec(config)
        mean, std = _normalization(config)
        val_pairs = scan_pairs(layout(data["val_split"]))
        val_pairs = [val_pairs[i] for i in subset_indices(data["val_subset"], len(val_pairs), seed)]
        val = SegmentationDataset(
            val_pairs,
            classes,
            eval_transform(mean, std, _pair(config, "eval_scale")),
            False,
            seed,
            reduce_zero_label,
        )
        # The evaluation set carries how it is inferred (evaluate() sees only the loader).
        val.inference = Inference.from_config(config)
        train_set: SegmentationDataset | list = []
        if train:
            crop_size = _pair(config, "crop_size")
            if crop_size is None:
                raise ValueError("segmentation.crop_size must be set to [h, w]")
            settings = AugmentSettings(
                crop_size=crop_size,
                scale=_pair(config, "scale"),
                ratio_range=tuple(seg["ratio_range"]),
                cat_max_ratio=seg["cat_max_ratio"],
                flip=seg["flip"],
                color_jitter=seg["color_jitter"],
            )
            pairs = scan_pairs(layout(data["train_split"]))
            pairs = [pairs[i] for i in subset_indices(data["train_subset"], len(pairs), seed)]
            train_set = SegmentationDataset(
                pairs, classes, train_transform(settings, mean, std), True, seed, reduce_zero_label
            )
        return DataBundle(train_set, val, classes, 3, collate_fn=collate_segmentation)

    def build_model(self, config: Config, classes: list[str], in_chans: int) -> nn.Module:
        """``SEGMENTATION_MODELS[model.name](num_classes=len(classes), **model.kwargs)``."""
        from involution.models.segmentation import SEGMENTATION_MODELS

        name = config["model"]["name"]
        if name not in SEGMENTATION_MODELS:
            raise ValueError(
                f"unknown segmentation model {name!r}; choose one of "
                f"{', '.join(sorted(SEGMENTATION_MODELS))}"
            )
        if in_chans != 3:
            raise ValueError(f"segmentation models take RGB images (3 channels), got {in_chans}")
        return SEGMENTATION_MODELS[name](num_classes=len(classes), **config["model"]["kwargs"])

    def to_device(
        self, batch: SegmentationBatch, device: torch.device, channels_last: bool
    ) -> SegmentationBatch:
        images = batch.images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return batch._replace(images=images, masks=batch.masks.to(device, non_blocking=True))

    def loss(self, net: nn.Module, batch: SegmentationBatch, config: Config) -> Tensor:
        """Cross-entropy over the labelled pixels of ``out`` (+ aux_weight x that of ``aux``)."""
        outputs = net(batch.images)
        loss = pixel_cross_entropy(outputs["out"], batch.masks)
        if "aux" in outputs:
            aux = pixel_cross_entropy(outputs["aux"], batch.masks)
            loss = loss + config["segmentation"]["aux_weight"] * aux
        return loss

    def start_evaluation(self, loader: Iterable[Any], info: DistInfo) -> Evaluation:
        """Scores of one confusion matrix over ``loader`` and every rank (module docstring)."""
        return _ConfusionEvaluation(loader.dataset, info)

    def format_metrics(self, metrics: dict[str, float]) -> str:
        return "\n" + iou_table(metrics)

    def predictor(
        self, model: nn.Module, config: Config, classes: list[str], in_chans: int
    ) -> Predictor:
        mean, std = _normalization(config)
        transform = eval_transform(mean, std, _pair(config, "eval_scale"))
        return _Segmenter(model, transform, Inference.from_config(config), classes)


class _ConfusionEvaluation(Evaluation):
    """One confusion matrix over the evaluation set, inferred as the dataset's ``inference``
    says, logits resized to each label's size before the argmax."""

    def __init__(self, dataset: SegmentationDataset, info: DistInfo) -> None:
        self.classes: list[str] = dataset.classes
        self.inference: Inference = getattr(dataset, "inference", Inference())
        self.metric = confusion_matrix_metric(len(self.classes)).to(info.device)

    def forward(self, model: nn.Module, batch: SegmentationBatch) -> Tensor:
        return self.inference(model, batch.images)

    def update(self, batch: SegmentationBatch, outputs: Tensor) -> None:
        logits = outputs.float()
        # Per sample: drop the batch padding, bring the logits to the label's size.
        sizes = zip(batch.image_sizes.tolist(), batch.mask_sizes.tolist(), strict=True)
        for i, ((h, w), (mask_h, mask_w)) in enumerate(sizes):
            valid = _resize_logits(logits[i : i + 1, :, :h, :w], (mask_h, mask_w))
            self.metric.update(valid.argmax(dim=1), batch.masks[i : i + 1, :mask_h, :mask_w])

    def compute(self) -> dict[str, float]:
        # compute() sums the matrices of all ranks (torchmetrics' dist sync).
        confmat = self.metric.compute()
        if confmat.sum() == 0:
            raise ValueError("the evaluation set has no labelled pixel")
        return segmentation_scores(confmat, self.classes)


class _Segmenter(Predictor):
    """An image's ``topk`` classes by pixel share and, to draw, the image with the predicted
    classes overlaid (alpha 0.5, one fixed colour per class, a class named "background" left
    undrawn)."""

    def __init__(
        self,
        model: nn.Module,
        transform: Callable[[Any], Any],
        inference: Inference,
        classes: list[str],
    ) -> None:
        self.model = model
        self.transform = transform
        self.inference = inference
        self.classes = classes
        self.palette = class_colours(len(classes))
        self.device = next(model.parameters()).device

    def __call__(self, path: Path, topk: int, draw: bool) -> tuple[str, Tensor | None]:
        classes = self.classes
        image = read_image(path)
        batch = self.transform(tv_tensors.Image(image)).as_subclass(Tensor)[None].to(self.device)
        logits = _resize_logits(self.inference(self.model, batch).float(), image.shape[-2:])
        prediction = logits.argmax(dim=1)[0].cpu()
        shares = torch.bincount(prediction.flatten(), minlength=len(classes)) / prediction.numel()
        top = shares.topk(min(topk, len(classes)))
        lines = [str(path)]
        for share, k in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            if share > 0:
                lines.append(f"  {100 * share:6.2f}%  {classes[k]}")
        if not draw:
            return "\n".join(lines), None
        drawn = [k for k in range(len(classes)) if classes[k] != BACKGROUND]
        masks = prediction[None] == torch.tensor(drawn)[:, None, None]
        overlay = draw_segmentation_masks(
            image, masks, alpha=0.5, colors=[self.palette[k] for k in drawn]
        )
        return "\n".join(lines), overlay


def pixel_cross_entropy(logits: Tensor, masks: Tensor) -> Tensor:
    """Mean cross-entropy of logits (B, K, H, W) over the pixels of masks (B, H, W) that are not
    :data:`IGNORE_INDEX` (0, not NaN, when every pixel is ignored)."""
    total = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (masks != IGNORE_INDEX).sum().clamp(min=1)


TASK = SegmentationTask()

__all__ = [
    "SCENES_CLASSES",
    "TASK",
    "Inference",
    "SegmentationTask",
    "pixel_cross_entropy",
    "sliding_window_logits",
    "window_starts",
]
