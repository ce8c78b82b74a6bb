"""COCO-format detection datasets: an image folder plus an instances JSON, read with pycocotools.

Samples are ``(image, target)`` pairs of ``torchvision.tv_tensors``, ready for torchvision's
detection models after :func:`detection_transform` (resize of the shorter side, horizontal
flip, box sanitising):

- ``image``: :class:`~torchvision.tv_tensors.Image`, float32 (3, H, W) in [0, 1].
- ``target["boxes"]``: :class:`~torchvision.tv_tensors.BoundingBoxes` (N, 4), XYXY pixels.
- ``target["labels"]``: int64 (N,), contiguous labels 1..C (0 is torchvision's background):
  the category ids in sorted order (:class:`CategoryMap`).
- ``target["masks"]``: :class:`~torchvision.tv_tensors.Mask` uint8 (N, H, W), only with
  ``masks=True`` (polygons, uncompressed and compressed RLE, decoded by pycocotools).
- ``target["image_id"]`` (the JSON's id) and ``target["orig_size"]`` ``(height, width)`` of the
  file, so that predictions can be mapped back for COCO evaluation.

Imperfect data. An entry that cannot be read raises an error naming the JSON file and the
entry: a missing image file, an unknown image or category id, a box that is not four finite
numbers with non-negative width and height, a segmentation that is neither polygons nor an RLE
of the image's size, an image whose pixel size differs from its entry. Everything else is
accepted and, for *training targets only*, filtered by these rules (counted and reported once
per dataset as a warning; evaluation always scores against the JSON as it is):

- boxes are clipped to the image; a box left less than 1 pixel wide or high (degenerate, or
  outside the image) is dropped;
- crowd regions (``iscrowd: 1``) are dropped (COCOeval ignores detections that fall on them);
- a missing ``iscrowd`` means 0, a missing ``area`` is the segmentation's area (else the box's).
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from involution.datasets.sampling import SampleKey, read_image, sample_seeds, seeded_transform

#: Boxes narrower or lower than this (pixels, after clipping to the image) leave the targets.
MIN_BOX_SIZE = 1.0

Sample = tuple[tv_tensors.Image, dict[str, Any]]


@dataclass(frozen=True)
class CategoryMap:
    """COCO category ids <-> contiguous labels: label ``i + 1`` is category ``ids[i]``."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    def label(self, category_id: int) -> int:
        """The contiguous label (1..C) of ``category_id``."""
        return self.ids.index(category_id) + 1

    def category_id(self, label: int) -> int:
        """The COCO category id of contiguous label ``label`` (1..C)."""
        return self.ids[label - 1]


@dataclass
class FilterReport:
    """What the documented rules removed from or changed in the training targets."""

    annotations: int = 0
    clipped: int = 0
    dropped_boxes: int = 0
    crowd: int = 0

    def describe(self, source: Path) -> str | None:
        """One sentence, or None when nothing was filtered."""
        parts = []
        if self.clipped:
            parts.append(f"{self.clipped} boxes clipped to their image")
        if self.dropped_boxes:
            parts.append(
                f"{self.dropped_boxes} degenerate or out-of-image boxes (under "
                f"{MIN_BOX_SIZE:g} px after clipping) dropped"
            )
        if self.crowd:
            parts.append(f"{self.crowd} crowd regions left out (kept for evaluation)")
        if not parts:
            return None
        return f"{source}: of {self.annotations} annotations, " + "; ".join(parts)


# ----------------------------------------------------------------------------- validation


def _entry(kind: str, position: int, item: Any) -> str:
    """``annotation #3 (id 12, image_id 5)``: how errors name an entry of the JSON."""
    if not isinstance(item, dict):
        return f"{kind} #{position}"
    keys = ("id", "image_id", "file_name") if kind != "category" else ("id", "name")
    details = ", ".join(f"{k} {item[k]!r}" for k in keys if k in item)
    return f"{kind} #{position}" + (f" ({details})" if details else "")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_segmentation(segmentation: Any, height: int, width: int) -> str | None:
    """Why ``segmentation`` is not usable for an image of ``height`` x ``width`` (None: fine)."""
    if isinstance(segmentation, list):
        if not segmentation:
            return "segmentation is an empty list of polygons"
        for polygon in segmentation:
            if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
                return f"polygon {polygon!r} is not a list of numbers"
            if len(polygon) < 6 or len(polygon) % 2:
                return (
                    f"polygon of {len(polygon)} numbers (needs an even count, at least 6: "
                    "x1, y1, x2, y2, x3, y3, ...)"
                )
        return None
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if size != [height, width]:
            return f"RLE size {size!r} differs from the image's [height, width] {[height, width]}"
        if isinstance(counts, list) and all(isinstance(c, int) and c >= 0 for c in counts):
            if sum(counts) != height * width:
                return f"uncompressed RLE counts sum to {sum(counts)}, not {height * width} pixels"
            return None
        if isinstance(counts, str | bytes) and counts:
            return None
        return "RLE counts must be a list of non-negative ints or a compressed string"
    return f"segmentation must be a list of polygons or an RLE dict, got {type(segmentation)}"


def _check_images(path: Path, images: Any, images_dir: Path) -> None:
    if not isinstance(images, list):
        raise ValueError(f"{path}: 'images' must be a list")
    seen: set[int] = set()
    missing = []
    for position, image in enumerate(images):
        entry = _entry("image", position, image)
        if not isinstance(image, dict):
            raise ValueError(f"{path}: {entry} is not an object")
        for key, kind in (("id", int), ("file_name", str), ("width", int), ("height", int)):
            if not isinstance(image.get(key), kind) or isinstance(image.get(key), bool):
                raise ValueError(
                    f"{path}: {entry}: '{key}' must be {kind.__name__}, got {image.get(key)!r}"
                )
        if image["width"] <= 0 or image["height"] <= 0:
            raise ValueError(f"{path}: {entry}: width and height must be positive")
        if image["id"] in seen:
            raise ValueError(f"{path}: {entry}: duplicate image id {image['id']}")
        seen.add(image["id"])
        if not os.path.isfile(images_dir / image["file_name"]):
            missing.append(f"{images_dir / image['file_name']} ({entry})")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(
            f"{path}: missing image file {', '.join(missing[:3])}{more} (image folder {images_dir})"
        )


def _check_categories(path: Path, categories: Any) -> CategoryMap:
    if not isinstance(categories, list) or not categories:
        raise ValueError(f"{path}: 'categories' must be a non-empty list")
    names: dict[int, str] = {}
    for position, category in enumerate(categories):
        entry = _entry("category", position, category)
        if not isinstance(category, dict) or not isinstance(category.get("id"), int):
            raise ValueError(f"{path}: {entry}: needs an integer 'id'")
        if category["id"] in names:
            raise ValueError(f"{path}: {entry}: duplicate category id {category['id']}")
        names[category["id"]] = str(category.get("name", category["id"]))
    ids = tuple(sorted(names))
    return CategoryMap(ids, tuple(names[i] for i in ids))


def _check_annotation(
    path: Path, position: int, ann: Any, images: dict[int, dict], categories: CategoryMap
) -> None:
    """Raise ValueError naming ``ann`` when it is malformed; fill in iscrowd and area."""
    entry = _entry("annotation", position, ann)
    if not isinstance(ann, dict):
        raise ValueError(f"{path}: {entry} is not an object")
    if not isinstance(ann.get("id"), int):
        raise ValueError(f"{path}: {entry}: needs an integer 'id'")
    image = images.get(ann.get("image_id"))
    if image is None:
        raise ValueError(f"{path}: {entry}: unknown image_id {ann.get('image_id')!r}")
    if ann.get("category_id") not in categories.ids:
        raise ValueError(
            f"{path}: {entry}: unknown category_id {ann.get('category_id')!r} "
            f"(categories: {list(categories.ids)})"
        )
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise ValueError(
            f"{path}: {entry}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}"
        )
    if bbox[2] < 0 or bbox[3] < 0:
        raise ValueError(f"{path}: {entry}: bbox {bbox} has a negative width or height")
    crowd = ann.setdefault("iscrowd", 0)
    if crowd not in (0, 1):
        raise ValueError(f"{path}: {entry}: iscrowd must be 0 or 1, got {crowd!r}")
    segmentation = ann.get("segmentation")
    if segmentation is not None:
        problem = _check_segmentation(segmentation, image["height"], image["width"])
        if problem:
            raise ValueError(f"{path}: {entry}: malformed segmentation: {problem}")
    if "area" not in ann:
        ann["area"] = float(bbox[2] * bbox[3])
        if segmentation is not None:
            rle = _to_rle(segmentation, image["height"], image["width"])
            ann["area"] = float(mask_utils.area(rle))
    elif not _is_number(ann["area"]):
        raise ValueError(f"{path}: {entry}: area must be a number, got {ann['area']!r}")


def _to_rle(segmentation: Any, height: int, width: int) -> dict:
    """One compressed RLE of a polygon list, an uncompressed or a compressed RLE."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def load_coco(annotations: str | Path, images_dir: str | Path) -> tuple[COCO, CategoryMap]:
    """Read, check and index an instances JSON whose ``file_name``s live in ``images_dir``.

    Raises ``FileNotFoundError`` (the JSON or an image file is missing) or ``ValueError``
    naming the file and entry of anything malformed (see the module docstring).
    """
    path, images_dir = Path(annotations), Path(images_dir)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder {images_dir} (for {path}) does not exist")
    try:
        dataset = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(dataset, dict) or "images" not in dataset or "categories" not in dataset:
        raise ValueError(f"{path}: a COCO instances file needs 'images' and 'categories'")
    dataset.setdefault("annotations", [])
    _check_images(path, dataset["images"], images_dir)
    categories = _check_categories(path, dataset["categories"])
    if not isinstance(dataset["annotations"], list):
        raise ValueError(f"{path}: 'annotations' must be a list")
    images = {image["id"]: image for image in dataset["images"]}
    ann_ids: set[int] = set()
    for position, ann in enumerate(dataset["annotations"]):
        _check_annotation(path, position, ann, images, categories)
        if ann["id"] in ann_ids:
            raise ValueError(f"{path}: {_entry('annotation', position, ann)}: duplicate id")
        ann_ids.add(ann["id"])
    coco = COCO()
    coco.dataset = dataset
    with redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco, categories


# ----------------------------------------------------------------------------- samples


def detection_transform(train: bool, min_size: int, max_size: int, hflip: float) -> v2.Compose:
    """``(image, target)`` -> the same with the image float32 in [0, 1], its shorter side
    resized to ``min_size`` (the longer one kept within ``max_size``), flipped horizontally
    with probability ``hflip`` when ``train``; boxes clamped to the image, and boxes under
    :data:`MIN_BOX_SIZE` dropped with their labels and masks."""
    steps: list[v2.Transform] = [v2.Resize(min_size, max_size=max_size, antialias=True)]
    if train and hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    steps += [
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=MIN_BOX_SIZE),
        v2.ToDtype(torch.float32, scale=True),
    ]
    return v2.Compose(steps)


def image_transform(min_size: int, max_size: int) -> v2.Compose:
    """An image alone (no target), as :func:`detection_transform` prepares it for evaluation:
    uint8 (3, H, W) -> float32 (3, H', W') in [0, 1], shorter side ``min_size``, longer side
    at most ``max_size``."""
    return v2.Compose(
        [
            v2.Resize(min_size, max_size=max_size, antialias=True),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


class CocoDetection(Dataset):
    """A COCO-format detection dataset indexed by ``(epoch, index)`` keys.

    ``index`` runs over the images in ascending id order; the augmentation of a sample is
    seeded by ``(seed, epoch, index)``, so it does not depend on workers, ranks or resumption.
    Training targets follow the filter rules of the module docstring; :attr:`coco` (the
    checked JSON, unfiltered) is the ground truth for evaluation.

    Args:
        images_dir: folder the JSON's ``file_name`` entries are relative to.
        annotations: the instances JSON.
        transform: applied to ``(image, target)``; e.g. :func:`detection_transform`.
        seed: the run's seed (mixed with epoch and index per sample).
        masks: also decode instance masks (``target["masks"]``).
        categories: the categories the dataset must have (e.g. the training set's).
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotations: str | Path,
        *,
        transform: Callable[[Sample], Sample],
        seed: int = 0,
        masks: bool = False,
        categories: CategoryMap | None = None,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.annotations = Path(annotations)
        self.coco, self.categories = load_coco(annotations, images_dir)
        if categories is not None and categories != self.categories:
            raise ValueError(
                f"{annotations}: categories {list(self.categories.names)} differ from the "
                f"expected {list(categories.names)}"
            )
        self.transform = transform
        self.seed = seed
        self.masks = masks
        self.image_ids = sorted(self.coco.imgs)
        self.report = FilterReport()
        self._targets = [self._training_target(image_id) for image_id in self.image_ids]
        message = self.report.describe(self.annotations)
        if message:
            warnings.warn(message, stacklevel=2)

    def _training_target(self, image_id: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """Clipped XYXY boxes float32 (N, 4), labels int64 (N,) and the N annotations kept."""
        image = self.coco.imgs[image_id]
        width, height = image["width"], image["height"]
        boxes, labels, kept = [], [], []
        for ann in self.coco.imgToAnns[image_id]:
            self.report.annotations += 1
            if ann["iscrowd"]:
                self.report.crowd += 1
                continue
            if self.masks and ann.get("segmentation") is None:
                raise ValueError(
                    f"{self.annotations}: annotation id {ann['id']} (image_id {image_id}) has no "
                    "segmentation, but masks were requested"
                )
            x, y, w, h = ann["bbox"]
            box = [min(max(x, 0), width), min(max(y, 0), height)]
            box += [min(max(x + w, 0), width), min(max(y + h, 0), height)]
            if box[2] - box[0] < MIN_BOX_SIZE or box[3] - box[1] < MIN_BOX_SIZE:
                self.report.dropped_boxes += 1
                continue
            self.report.clipped += box != [x, y, x + w, y + h]
            boxes.append(box)
            labels.append(self.categories.label(ann["category_id"]))
            kept.append(ann)
        return (
            np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            np.asarray(labels, dtype=np.int64),
            kept,
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    def select(self, positions: Sequence[int]) -> None:
        """Keep only the samples at ``positions`` (e.g. a fixed random subset), in that order;
        evaluation then covers only their images."""
        self.image_ids = [self.image_ids[i] for i in positions]
        self._targets = [self._targets[i] for i in positions]

    @property
    def group_ids(self) -> list[int]:
        """Aspect-ratio group of every sample: 0 for landscape or square, 1 for portrait."""
        return [
            int(self.coco.imgs[i]["width"] < self.coco.imgs[i]["height"]) for i in self.image_ids
        ]

    def read_image(self, index: int) -> torch.Tensor:
        """The image file of sample ``index`` as uint8 (3, H, W), checked against its entry."""
        entry = self.coco.imgs[self.image_ids[index]]
        path = self.images_dir / entry["file_name"]
        try:
            image = read_image(str(path))
        except OSError as err:
            raise OSError(f"{err} (image id {entry['id']} of {self.annotations})") from err
        if image.size != (entry["width"], entry["height"]):
            raise ValueError(
                f"{self.annotations}: image id {entry['id']}: {path} is "
                f"{image.width}x{image.height} pixels, its entry says "
                f"{entry['width']}x{entry['height']}"
            )
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)

    def __getitem__(self, key: SampleKey) -> Sample:
        epoch, index = key
        image_id = self.image_ids[index]
        height, width = self.coco.imgs[image_id]["height"], self.coco.imgs[image_id]["width"]
        boxes, labels, anns = self._targets[index]
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(boxes), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.from_numpy(labels),
            "image_id": image_id,
            "orig_size": (height, width),
        }
        if self.masks:
            masks = np.zeros((len(anns), height, width), dtype=np.uint8)
            for i, ann in enumerate(anns):
                masks[i] = mask_utils.decode(_to_rle(ann["segmentation"], height, width))
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        image = tv_tensors.Image(self.read_image(index))
        seed = int(sample_seeds(self.seed, epoch, [index])[0])
        return seeded_transform(self.transform, seed, (image, target))


def collate_detection(batch: Sequence[Sample]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Samples -> (list of images, list of targets): torchvision's detectors batch images of
    different sizes themselves."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
