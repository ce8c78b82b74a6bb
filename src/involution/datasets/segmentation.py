"""Semantic segmentation data: image + label-PNG pairs, joint augmentation, padded batches.

One reader serves every layout. A label file is a single-channel PNG (mode ``L``, ``P`` or
``I;16``) of class indices the size of its image; :data:`IGNORE_INDEX` (255) marks pixels
that are not scored. Layouts differ only in where the two files of a pair live:

- generic: ``root/images/<split>/**/<stem>.{png,jpg,...}`` + ``root/labels/<split>/**/<stem>.png``
  (the Fashion-MNIST scenes of :mod:`involution.datasets.scenes` are one);
- Cityscapes: ``leftImg8bit/<split>/<city>/<id>_leftImg8bit.png`` +
  ``gtFine/<split>/<city>/<id>_gtFine_labelTrainIds.png`` (19 classes; the train-id PNGs come
  from cityscapesScripts' ``createTrainIdLabelImgs``);
- ADE20K (SceneParsing): ``ADEChallengeData2016/images/{training,validation}/<id>.jpg`` +
  ``ADEChallengeData2016/annotations/{training,validation}/<id>.png``, 150 classes with 0 =
  "other": read with ``reduce_zero_label`` (0 -> 255, k -> k - 1), as mmseg does.

Augmentation runs on ``torchvision.transforms.v2`` tv_tensors, so one random draw moves image
and mask together (masks are always resized with nearest neighbour), and it is a pure function
of ``(seed, epoch, index)`` (see :func:`involution.datasets.sampling.sample_seeds`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from involution.datasets.sampling import (
    IMAGE_EXTENSIONS,
    SampleKey,
    sample_seeds,
    seeded_transform,
)

#: Label value of pixels that are neither trained on nor scored.
IGNORE_INDEX = 255

#: Cityscapes' 19 evaluation classes in train-id order (``*_gtFine_labelTrainIds.png``).
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

#: ADE20K SceneParsing's 150 classes (objectInfo150 order, label k + 1 in the PNGs).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
    "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan",
    "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip

_LABEL_MODES = ("L", "P", "I;16", "I")

# ----------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class PairLayout:
    """Where the image and label files of a split live and how their names pair up.

    A pair shares the key ``<path relative to its folder> minus its suffix``: e.g. with
    ``image_suffixes=("_leftImg8bit.png",)`` and ``label_suffix="_gtFine_labelTrainIds.png"``,
    ``aachen/aachen_000000_000019_leftImg8bit.png`` pairs with
    ``aachen/aachen_000000_000019_gtFine_labelTrainIds.png``.
    """

    image_dir: Path
    label_dir: Path
    image_suffixes: tuple[str, ...] = IMAGE_EXTENSIONS
    label_suffix: str = ".png"


def generic_layout(root: str | Path, split: str) -> PairLayout:
    """``root/images/<split>`` + ``root/labels/<split>``, any image extension, PNG labels."""
    root = Path(root)
    return PairLayout(root / "images" / split, root / "labels" / split)


def cityscapes_layout(root: str | Path, split: str) -> PairLayout:
    """``root/leftImg8bit/<split>`` + ``root/gtFine/<split>`` (train-id label PNGs)."""
    root = Path(root)
    return PairLayout(
        root / "leftImg8bit" / split,
        root / "gtFine" / split,
        image_suffixes=("_leftImg8bit.png",),
        label_suffix="_gtFine_labelTrainIds.png",
    )


def ade20k_layout(root: str | Path, split: str) -> PairLayout:
    """``root[/ADEChallengeData2016]/images/<split>`` + ``.../annotations/<split>``; split is
    ``training`` or ``validation``."""
    root = Path(root)
    if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    return PairLayout(
        root / "images" / split,
        root / "annotations" / split,
        image_suffixes=(".jpg", ".jpeg", ".png"),
        label_suffix=".png",
    )


def _files_by_key(folder: Path, suffixes: Sequence[str], what: str) -> dict[str, Path]:
    """Map ``relative path minus suffix`` -> file for every file under ``folder`` ending in
    one of ``suffixes`` (case-insensitive); two files with one key are an error."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    lowered = tuple(s.lower() for s in suffixes)
    found: dict[str, Path] = {}
    for dirpath, _, names in os.walk(folder, followlinks=True):
        for name in names:
            suffix = next((s for s in lowered if name.lower().endswith(s)), None)
            if suffix is None:
                continue
            path = Path(dirpath) / name
            key = str(path.relative_to(folder))[: -len(suffix)]
            if key in found:
                raise ValueError(f"two {what} files for {key!r}: {found[key]} and {path}")
            found[key] = path
    return found


def scan_pairs(layout: PairLayout) -> list[tuple[Path, Path]]:
    """Every (image, label) pair of ``layout``, sorted by key.

    Raises ``FileNotFoundError`` naming the files when an image has no label or a label no
    image, or when a folder is missing or holds no images.
    """
    images = _files_by_key(layout.image_dir, layout.image_suffixes, "image")
    labels = _files_by_key(layout.label_dir, (layout.label_suffix,), "label")
    if not images:
        raise FileNotFoundError(
            f"no images ({', '.join(layout.image_suffixes)}) under {layout.image_dir}"
        )
    problems = [
        f"image {images[key]} has no label {layout.label_dir / (key + layout.label_suffix)}"
        for key in sorted(images.keys() - labels.keys())
    ]
    problems += [
        f"label {labels[key]} has no image {layout.image_dir / key}"
        f"{{{','.join(layout.image_suffixes)}}}"
        for key in sorted(labels.keys() - images.keys())
    ]
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise FileNotFoundError(f"unpaired segmentation files: {shown}{more}")
    return [(images[key], labels[key]) for key in sorted(images)]


# ----------------------------------------------------------------------------- reading


def read_image(path: Path) -> Tensor:
    """An image file as uint8 RGB (3, H, W)."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def read_label(path: Path, num_classes: int, reduce_zero_label: bool = False) -> Tensor:
    """A label PNG as uint8 class indices (H, W), checked against ``num_classes``.

    With ``reduce_zero_label`` 0 becomes :data:`IGNORE_INDEX` and every other k becomes k - 1
    (255 stays 255). Raises ``ValueError`` naming the file for a multi-channel image or a
    value that is neither a class index nor 255.
    """
    try:
        with Image.open(path) as image:
            if image.mode not in _LABEL_MODES:
                raise ValueError(
                    f"label {path} has mode {image.mode!r}; expected a single-channel PNG of "
                    f"class indices (modes {', '.join(_LABEL_MODES)})"
                )
            array = np.asarray(image).astype(np.int64)
    except (OSError, UnidentifiedImageError) as err:
        raise OSError(f"cannot read label {path}: {err}") from err
    if reduce_zero_label:
        array = np.where(array == 0, IGNORE_INDEX + 1, array) - 1
        array[array == IGNORE_INDEX - 1] = IGNORE_INDEX
    bad = ((array >= num_classes) & (array != IGNORE_INDEX)) | (array < 0)
    if bad.any():
        values = np.unique(array[bad])
        raise ValueError(
            f"label {path} holds value(s) {values[:10].tolist()} outside the {num_classes} "
            f"classes 0..{num_classes - 1} and not the ignore index {IGNORE_INDEX}"
            + (" (after reduce_zero_label)" if reduce_zero_label else "")
        )
    return torch.from_numpy(array.astype(np.uint8))


# ----------------------------------------------------------------------------- transforms


class RandomRescale(v2.Transform):
    """Resize keeping the aspect ratio so the image fits ``scale * ratio`` (mmseg's
    ``Resize(img_scale, ratio_range, keep_ratio=True)``): the factor is the smaller of
    ``max(scale) * ratio / long side`` and ``min(scale) * ratio / short side``, with ``ratio``
    uniform in ``ratio_range``. Images bilinear, masks nearest."""

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] = (1.0, 1.0)) -> None:
        super().__init__()
        if len(scale) != 2 or min(scale) <= 0:
            raise ValueError(f"scale must be two positive sizes, got {scale}")
        if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(
                f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}"
            )
        self.long, self.short = max(scale), min(scale)
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        low, high = self.ratio_range
        ratio = low + (high - low) * float(torch.rand(()))
        factor = min(
            self.long * ratio / max(height, width), self.short * ratio / min(height, width)
        )
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, params["size"], antialias=True)


class RandomCategoryCrop(v2.Transform):
    """Random crop of at most ``size`` (h, w) (whole image along a shorter side).

    With ``cat_max_ratio < 1`` (mmseg's ``RandomCrop``) up to 10 crops are drawn until no single
    class covers ``cat_max_ratio`` or more of the crop's labelled pixels (the last draw is kept
    otherwise); it needs a ``tv_tensors.Mask`` among the inputs.
    """

    def __init__(self, size: Sequence[int], cat_max_ratio: float = 1.0, tries: int = 10) -> None:
        super().__init__()
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"crop size must be two positive sizes (h, w), got {size}")
        if not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        self.size = (int(size[0]), int(size[1]))
        self.cat_max_ratio = cat_max_ratio
        self.tries = tries

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h, crop_w = min(self.size[0], height), min(self.size[1], width)
        mask = next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)
        tries = self.tries if self.cat_max_ratio < 1 and mask is not None else 1
        for _ in range(tries):
            top = int(torch.randint(height - crop_h + 1, ()))
            left = int(torch.randint(width - crop_w + 1, ()))
            if tries == 1:
                break
            crop = mask[..., top : top + crop_h, left : left + crop_w]
            counts = torch.bincount(crop[crop != IGNORE_INDEX].flatten().long())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(
            F.crop, inpt, params["top"], params["left"], params["height"], params["width"]
        )


class PadTo(v2.Transform):
    """Pad on the bottom and right up to ``size`` (h, w): images with 0 (after normalisation:
    the mean colour), masks with :data:`IGNORE_INDEX`."""

    def __init__(self, size: Sequence[int]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(0, self.size[1] - width), max(0, self.size[0] - height)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        fill = IGNORE_INDEX if isinstance(inpt, tv_tensors.Mask) else 0
        return self._call_kernel(F.pad, inpt, params["padding"], fill=fill)


@dataclass
class AugmentSettings:
    """Training augmentation, in mmseg's order: rescale, crop, flip, colour, normalise, pad.

    Attributes:
        crop_size: (h, w) of the training crops (smaller images are padded up to it).
        scale: (h, w) base scale of :class:`RandomRescale`; ``None``: no rescaling.
        ratio_range: random factor range applied to ``scale``.
        cat_max_ratio: see :class:`RandomCategoryCrop` (1.0: plain random crop).
        flip: random horizontal flip with probability 0.5.
        color_jitter: brightness 0.875-1.125x, contrast and saturation 0.5-1.5x, hue +-0.1
            turn (close to, not the same as, mmseg's ``PhotoMetricDistortion``: additive
            brightness +-32, each step with probability 0.5).
    """

    crop_size: tuple[int, int]
    scale: tuple[int, int] | None = None
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 1.0
    flip: bool = True
    color_jitter: bool = False


def _to_float_normalized(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(list(mean), list(std)),
    ]


def train_transform(
    settings: AugmentSettings, mean: Sequence[float], std: Sequence[float]
) -> v2.Compose:
    """Joint transform of ``(tv_tensors.Image uint8 (3, H, W), tv_tensors.Mask (H, W))`` ->
    (float normalised (3, h, w), mask (h, w)) with ``(h, w) = settings.crop_size``."""
    steps: list[v2.Transform] = []
    if settings.scale is not None:
        steps.append(RandomRescale(settings.scale, settings.ratio_range))
    steps.append(RandomCategoryCrop(settings.crop_size, settings.cat_max_ratio))
    if settings.flip:
        steps.append(v2.RandomHorizontalFlip())
    if settings.color_jitter:
        steps.append(v2.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.1))
    steps += _to_float_normalized(mean, std)
    steps.append(PadTo(settings.crop_size))
    return v2.Compose(steps)


def eval_transform(
    mean: Sequence[float], std: Sequence[float], scale: Sequence[int] | None = None
) -> v2.Compose:
    """Image-only transform for evaluation and prediction: optional keep-ratio resize to fit
    ``scale`` (h, w), then normalisation. Masks are passed as plain tensors so they keep their
    size: scores are computed at the label's resolution."""
    steps: list[v2.Transform] = [RandomRescale(scale)] if scale is not None else []
    return v2.Compose(steps + _to_float_normalized(mean, std))


# ----------------------------------------------------------------------------- dataset


class SegmentationDataset(Dataset):
    """(image, mask) pairs read from disk, indexed by :data:`SampleKey` ``(epoch, index)``.

    Args:
        pairs: (image path, label path) per sample, see :func:`scan_pairs`.
        classes: class names; label values must be below ``len(classes)`` or 255.
        transform: from :func:`train_transform` (joint) or :func:`eval_transform` (image only).
        train: whether ``transform`` is joint (training) or image-only (evaluation).
        seed: run seed, mixed with ``(epoch, index)`` to seed each sample's augmentation.
        reduce_zero_label: see :func:`read_label`.

    Returns per sample: image float (3, h, w), mask int64 (H, W) (the same size as the image
    in training; the label's own size in evaluation).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        classes: Sequence[str],
        transform: Callable[[Any], Any],
        train: bool,
        seed: int,
        reduce_zero_label: bool = False,
    ) -> None:
        self.pairs = list(pairs)
        self.classes = list(classes)
        self.transform = transform
        self.train = train
        self.seed = seed
        self.reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> tuple[Tensor, Tensor]:
        """The raw pair ``index``: uint8 image (3, H, W) and uint8 mask (H, W), sizes checked."""
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        mask = read_label(label_path, len(self.classes), self.reduce_zero_label)
        if image.shape[1:] != mask.shape:
            raise ValueError(
                f"image {image_path} is {image.shape[2]}x{image.shape[1]} but its label "
                f"{label_path} is {mask.shape[1]}x{mask.shape[0]} (width x height)"
            )
        return image, mask

    def __getitem__(self, key: SampleKey) -> tuple[Tensor, Tensor]:
        epoch, index = key
        image, mask = self.read(index)
        seed = int(sample_seeds(self.seed, epoch, [index])[0])
        if self.train:
            image, mask = seeded_transform(
                self.transform, seed, (tv_tensors.Image(image), tv_tensors.Mask(mask))
            )
        else:
            image = seeded_transform(self.transform, seed, tv_tensors.Image(image))
        return image.as_subclass(Tensor), mask.as_subclass(Tensor).long()


class SegmentationBatch(NamedTuple):
    """A padded batch.

    images: float (B, 3, H, W), each sample top-left, zero-padded; masks: int64 (B, H', W'),
    padded with :data:`IGNORE_INDEX`; image_sizes / mask_sizes: int64 (B, 2) valid (h, w).
    """

    images: Tensor
    masks: Tensor
    image_sizes: Tensor
    mask_sizes: Tensor


def _pad_stack(tensors: Sequence[Tensor], fill: float) -> Tensor:
    height = max(t.shape[-2] for t in tensors)
    width = max(t.shape[-1] for t in tensors)
    if all(t.shape[-2:] == (height, width) for t in tensors):
        return torch.stack(list(tensors))
    out = tensors[0].new_full((len(tensors), *tensors[0].shape[:-2], height, width), fill)
    for i, t in enumerate(tensors):
        out[i, ..., : t.shape[-2], : t.shape[-1]] = t
    return out


def collate_segmentation(samples: Sequence[tuple[Tensor, Tensor]]) -> SegmentationBatch:
    """Stack (image, mask) samples, padding different sizes (see :class:`SegmentationBatch`)."""
    images = [s[0] for s in samples]
    masks = [s[1] for s in samples]
    return SegmentationBatch(
        _pad_stack(images, 0.0),
        _pad_stack(masks, IGNORE_INDEX),
        torch.tensor([i.shape[-2:] for i in images], dtype=torch.int64),
        torch.tensor([m.shape[-2:] for m in masks], dtype=torch.int64),
    )
