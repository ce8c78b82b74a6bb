"""Fashion-MNIST scenes: a deterministic COCO-format detection / segmentation dataset.

Each scene is a black grayscale canvas (width and height drawn independently in
``[min_size, max_size]``) holding ``items[0]..items[1]`` real Fashion-MNIST items. Train scenes
draw items from Fashion-MNIST's train split only, val scenes from its test split only. Each item
is rescaled (bilinear, PIL) from 28 x 28 to a square of side ``round(28 * scale)`` with
``scale`` uniform in ``scales``, and placed with its whole square inside the canvas.

Masks and composition:

* An item's mask is its own pixels: rescaled intensity ``> MASK_THRESHOLD * 255`` (0.1, i.e.
  values >= 26 of 255).
* Items are pasted in order. Inside its mask a later item overwrites what is below (it
  occludes earlier items); outside its mask (its faint border, all <= 25) it is combined by
  pixel-wise max, so it never changes a visible pixel of an earlier item.
* A placement is rejected when the tight box of the item's mask covers more than
  ``max_overlap`` of the smaller of its box and any earlier item's box (intersection over the
  smaller box, stricter than IoU); after ``PLACEMENT_TRIES`` rejected positions the item is
  left out.
* An instance's mask is its *visible* pixels; its box is the tight box of that mask. An item
  left with fewer than ``MIN_VISIBLE_PIXELS`` visible pixels or less than
  ``MIN_VISIBLE_FRACTION`` of its own mask is removed from the scene altogether (image
  included), so every pixel of an item in the image belongs to an annotated instance.

Layout written by :func:`build_scenes` (``<split>`` is ``train`` or ``val``)::

    out_dir/images/<split>/{id:06d}.png        8-bit grayscale ("L") scene
    out_dir/labels/<split>/{id:06d}.png        8-bit semantic label: 0 background, class + 1
    out_dir/annotations/instances_<split>.json COCO: images, annotations (bbox, area,
                                               compressed RLE segmentation, iscrowd 0 and an
                                               extra ``source`` field), categories 1..10
    out_dir/scenes.json                        format version + generation parameters

Each annotation's ``source`` records where it came from: ``split`` (Fashion-MNIST split),
``index`` (image index in that split), ``scale``, ``size`` (rescaled side), ``offset``
([x, y] of the rescaled square in the scene) and ``item_bbox`` (tight box of the item's whole
mask, before occlusion; the box the overlap bound applies to). Image and annotation ids start
at 1 (COCOeval treats annotation id 0 as "unmatched").

Scene ``i`` of a split is drawn from ``numpy.random.default_rng((seed, split, i))``, so a build
is byte-identical on rerun and growing ``train_scenes`` keeps the earlier scenes unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from PIL import Image
from pycocotools import mask as mask_utils

from involution.datasets.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    find_fashion_mnist,
    load_fashion_mnist,
)

#: Bump when the generator's output changes for the same parameters (forces a rebuild).
FORMAT_VERSION = 1
#: An item's pixels are those brighter than this fraction of 255.
MASK_THRESHOLD = 0.1
#: Side of a Fashion-MNIST item.
ITEM_SIZE = 28
#: Random positions tried for an item before it is left out.
PLACEMENT_TRIES = 50
#: Minimum visible part of an item, in pixels and as a fraction of its own mask.
MIN_VISIBLE_PIXELS = 16
MIN_VISIBLE_FRACTION = 0.5
#: Scene split -> the Fashion-MNIST split its items come from.
SOURCE_SPLITS = {"train": "train", "val": "test"}
PARAMS_FILE = "scenes.json"
#: Where training builds the scenes when ``data.root`` is unset.
DEFAULT_SCENES_ROOT = Path("~/.cache/involution/fashion_mnist_scenes")

_MASK_MIN_VALUE = int(MASK_THRESHOLD * 255) + 1  # > 25.5 on uint8


@dataclass(frozen=True)
class SceneParams:
    """Generation parameters of a scenes folder (see the module docstring)."""

    train_scenes: int = 4000
    val_scenes: int = 500
    min_size: int = 128
    max_size: int = 160
    items: tuple[int, int] = (2, 5)
    scales: tuple[float, float] = (1.0, 2.5)
    max_overlap: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("train_scenes", "val_scenes", "min_size", "max_size", "seed"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"scenes: {name} must be an int, got {value!r}")
        object.__setattr__(self, "items", tuple(int(v) for v in self.items))
        object.__setattr__(self, "scales", tuple(float(v) for v in self.scales))
        object.__setattr__(self, "max_overlap", float(self.max_overlap))
        if self.train_scenes < 1 or self.val_scenes < 1:
            raise ValueError(
                f"scenes: train_scenes and val_scenes must be >= 1, got "
                f"{self.train_scenes} and {self.val_scenes}"
            )
        if len(self.items) != 2 or not 1 <= self.items[0] <= self.items[1]:
            raise ValueError(
                f"scenes: items must be (low, high) with 1 <= low <= high, got {self.items}"
            )
        if len(self.scales) != 2 or not 0 < self.scales[0] <= self.scales[1]:
            raise ValueError(
                f"scenes: scales must be (low, high) with 0 < low <= high, got {self.scales}"
            )
        largest = round(ITEM_SIZE * self.scales[1])
        if not largest <= self.min_size <= self.max_size:
            raise ValueError(
                f"scenes: need round(28 * scales[1]) = {largest} <= min_size <= max_size, got "
                f"min_size={self.min_size}, max_size={self.max_size}"
            )
        if not 0.0 <= self.max_overlap <= 1.0:
            raise ValueError(f"scenes: max_overlap must be in [0, 1], got {self.max_overlap}")

    def to_json(self) -> dict[str, Any]:
        """The parameters as JSON values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class PlacedItem:
    """One Fashion-MNIST item placed in a scene."""

    index: int  # image index in the Fashion-MNIST split
    label: int  # class index 0..9
    scale: float
    patch: np.ndarray  # uint8 (size, size), the rescaled item
    mask: np.ndarray  # bool (size, size), its own pixels
    x: int  # column of the patch's top-left corner in the scene
    y: int  # row of the patch's top-left corner in the scene
    box: tuple[int, int, int, int] = field(init=False)  # x0, y0, x1, y1 (exclusive), scene

    def __post_init__(self) -> None:
        self.box = _shifted(_tight_box(self.mask), self.x, self.y)


@dataclass
class Scene:
    """A composed scene: image and owner map (H, W), the items that remain visible."""

    image: np.ndarray  # uint8 (H, W)
    owner: np.ndarray  # int16 (H, W): index into ``items`` of the visible item, -1 background
    items: list[PlacedItem]


# ----------------------------------------------------------------------------- geometry


def rescale_item(item: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a uint8 (28, 28) item to uint8 (size, size)."""
    return np.asarray(Image.fromarray(item).resize((size, size), Image.Resampling.BILINEAR))


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box (x0, y0, x1, y1), x1/y1 exclusive, of a non-empty bool (H, W) mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _shifted(box: tuple[int, int, int, int], x: int, y: int) -> tuple[int, int, int, int]:
    return box[0] + x, box[1] + y, box[2] + x, box[3] + y


def overlap_over_smaller(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Intersection area of boxes ``a`` and ``b`` (x0, y0, x1, y1) over the smaller box's area."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return width * height / smaller


# ----------------------------------------------------------------------------- one scene


def _compose(height: int, width: int, items: list[PlacedItem]) -> Scene:
    """Paste ``items`` in order: overwrite inside each mask, pixel-wise max outside it."""
    image = np.zeros((height, width), np.uint8)
    owner = np.full((height, width), -1, np.int16)
    for k, item in enumerate(items):
        size = item.patch.shape[0]
        region = (slice(item.y, item.y + size), slice(item.x, item.x + size))
        np.maximum(image[region], item.patch, out=image[region])
        image[region][item.mask] = item.patch[item.mask]
        owner[region][item.mask] = k
    return Scene(image, owner, items)


def draw_scene(
    rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, params: SceneParams
) -> Scene:
    """One scene from items of ``images`` (N, 28, 28) uint8 with ``labels`` (N,)."""
    width, height = (int(v) for v in rng.integers(params.min_size, params.max_size + 1, 2))
    count = int(rng.integers(params.items[0], params.items[1] + 1))
    placed: list[PlacedItem] = []
    for _ in range(count):
        index = int(rng.integers(len(images)))
        scale = float(rng.uniform(*params.scales))
        size = round(ITEM_SIZE * scale)
        patch = rescale_item(images[index], size)
        mask = patch >= _MASK_MIN_VALUE
        if not mask.any():
            continue
        local_box = _tight_box(mask)
        for _ in range(PLACEMENT_TRIES):
            x = int(rng.integers(width - size + 1))
            y = int(rng.integers(height - size + 1))
            box = _shifted(local_box, x, y)
            if all(overlap_over_smaller(box, p.box) <= params.max_overlap for p in placed):
                placed.append(PlacedItem(index, int(labels[index]), scale, patch, mask, x, y))
                break
    return compose_visible(height, width, placed)


def compose_visible(height: int, width: int, placed: list[PlacedItem]) -> Scene:
    """Compose ``placed`` in order, leaving out items occluded below the visible minimum."""
    scene = _compose(height, width, placed)
    # Drop items occluded below the minimum and recompose once: removing an item only
    # uncovers items pasted before it, so the remaining ones keep enough visible pixels.
    visible = np.bincount(scene.owner[scene.owner >= 0], minlength=len(placed))
    own = [int(p.mask.sum()) for p in placed]
    keep = [
        p
        for p, seen, total in zip(placed, visible, own, strict=True)
        if seen >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * total)
    ]
    return scene if len(keep) == len(placed) else _compose(height, width, keep)


def scene_annotations(
    scene: Scene, image_id: int, first_annotation_id: int, source_split: str
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """COCO annotations of ``scene`` and its semantic label map uint8 (H, W) (0 background,
    class index + 1 elsewhere)."""
    annotations = []
    for k, item in enumerate(scene.items):
        visible = scene.owner == k
        x0, y0, x1, y1 = _tight_box(visible)
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        ix0, iy0, ix1, iy1 = item.box
        annotations.append(
            {
                "id": first_annotation_id + k,
                "image_id": image_id,
                "category_id": item.label + 1,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": int(visible.sum()),
                "iscrowd": 0,
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
                "source": {
                    "split": source_split,
                    "index": item.index,
                    "scale": item.scale,
                    "size": int(item.patch.shape[0]),
                    "offset": [item.x, item.y],
                    "item_bbox": [ix0, iy0, ix1 - ix0, iy1 - iy0],
                },
            }
        )
    classes = np.array([item.label + 1 for item in scene.items], np.uint8)
    label = np.zeros(scene.owner.shape, np.uint8)
    shown = scene.owner >= 0
    label[shown] = classes[scene.owner[shown]]
    return annotations, label


# ----------------------------------------------------------------------------- the folder


def _write_split(
    out: Path, split: str, count: int, params: SceneParams, fashion_mnist: Path
) -> None:
    """Write ``count`` scenes of ``split`` ("train" / "val") with their annotation file."""
    source_split = SOURCE_SPLITS[split]
    images, labels = load_fashion_mnist(fashion_mnist, source_split)
    split_code = list(SOURCE_SPLITS).index(split)
    image_dir = out / "images" / split
    label_dir = out / "labels" / split
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    coco_images: list[dict[str, Any]] = []
    coco_annotations: list[dict[str, Any]] = []
    for i in range(count):
        rng = np.random.default_rng((params.seed, split_code, i))
        scene = draw_scene(rng, images, labels, params)
        image_id = i + 1
        name = f"{image_id:06d}.png"
        annotations, label = scene_annotations(
            scene, image_id, len(coco_annotations) + 1, source_split
        )
        Image.fromarray(scene.image).save(image_dir / name)
        Image.fromarray(label).save(label_dir / name)
        height, width = scene.image.shape
        coco_images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        coco_annotations += annotations
    coco = {
        "info": {
            "description": f"Fashion-MNIST scenes ({split}: items from Fashion-MNIST "
            f"{source_split})",
            "version": str(FORMAT_VERSION),
        },
        "images": coco_images,
        "annotations": coco_annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "fashion"}
            for k, name in enumerate(FASHION_MNIST_CLASSES)
        ],
    }
    (out / "annotations").mkdir(exist_ok=True)
    # dumps (C encoder) then write: json.dump to a file streams through the slow Python one.
    text = json.dumps(coco, separators=(",", ":"))
    (out / "annotations" / f"instances_{split}.json").write_text(text)


def _scene_counts(params: SceneParams) -> dict[str, int]:
    return {"train": params.train_scenes, "val": params.val_scenes}


def _is_scenes_folder(path: Path) -> bool:
    """Whether ``path`` may be replaced: empty, or holding only what a build writes."""
    written = {"images", "labels", "annotations", PARAMS_FILE}
    return all(entry.name in written for entry in os.scandir(path))


def _replace_folder(built: Path, out: Path) -> None:
    """Move the finished ``built`` folder to ``out``, replacing a previous build there."""
    if out.exists():
        if not out.is_dir() or not _is_scenes_folder(out):
            raise FileExistsError(
                f"{out} exists and is not a Fashion-MNIST scenes folder; refusing to replace it"
            )
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(built, out)
        shutil.rmtree(old)
    else:
        os.replace(built, out)


def build_scenes(
    out_dir: str | Path, *, fashion_mnist_root: str | Path | None = None, **params: Any
) -> Path:
    """Build the scenes folder at ``out_dir`` (replacing a previous build) and return its path.

    ``params`` are :class:`SceneParams` fields: ``train_scenes=4000, val_scenes=500,
    min_size=128, max_size=160, items=(2, 5), scales=(1.0, 2.5), max_overlap=0.15, seed=0``.
    ``fashion_mnist_root`` is passed to :func:`find_fashion_mnist`. The folder is built in a
    temporary sibling and renamed into place, so ``out_dir`` is never left half-written.
    """
    scene_params = SceneParams(**params)
    out = Path(out_dir).expanduser().resolve()
    fashion_mnist = find_fashion_mnist(fashion_mnist_root)
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        for split, count in _scene_counts(scene_params).items():
            _write_split(building, split, count, scene_params, fashion_mnist)
        description = {"format_version": FORMAT_VERSION, "params": scene_params.to_json()}
        # Written last: its presence marks a complete build.
        with open(building / PARAMS_FILE, "w") as f:
            json.dump(description, f, indent=2)
        _replace_folder(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return out


def is_complete(root: str | Path, params: SceneParams) -> bool:
    """Whether ``root`` holds a complete build of ``params`` with this format version."""
    root = Path(root)
    try:
        with open(root / PARAMS_FILE) as f:
            description = json.load(f)
    except (OSError, ValueError):
        return False
    if description != {"format_version": FORMAT_VERSION, "params": params.to_json()}:
        return False
    for split, count in _scene_counts(params).items():
        names = {f"{i:06d}.png" for i in range(1, count + 1)}
        if not (root / "annotations" / f"instances_{split}.json").is_file():
            return False
        for kind in ("images", "labels"):
            folder = root / kind / split
            if not folder.is_dir() or not names <= set(os.listdir(folder)):
                return False
    return True


def ensure_scenes(
    root: str | Path, *, fashion_mnist_root: str | Path | None = None, **params: Any
) -> Path:
    """The scenes folder at ``root`` for ``params`` (see :func:`build_scenes`): reused when it is
    complete and was built with the same parameters, rebuilt otherwise."""
    root = Path(root).expanduser().resolve()
    if is_complete(root, SceneParams(**params)):
        return root
    return build_scenes(root, fashion_mnist_root=fashion_mnist_root, **params)


def prepare_scenes(
    root: str | Path | None,
    *,
    fashion_mnist_root: str | Path | None = None,
    **params: Any,
) -> Path:
    """:func:`ensure_scenes` for training: ``root`` None means :data:`DEFAULT_SCENES_ROOT`, and
    under torch.distributed rank 0 builds while the other ranks wait, then they reuse it."""
    root = Path(root or DEFAULT_SCENES_ROOT).expanduser()
    parallel = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if parallel and dist.get_rank() != 0:
        dist.barrier()  # rank 0 builds first
    root = ensure_scenes(root, fashion_mnist_root=fashion_mnist_root, **params)
    if parallel and dist.get_rank() == 0:
        dist.barrier()
    return root


def scene_statistics(root: str | Path) -> dict[str, dict[str, Any]]:
    """Per split: ``scenes``, ``instances``, ``mean_instances`` per scene and ``per_class``
    instance counts (class name -> count), read from the annotation files."""
    stats = {}
    for split in SOURCE_SPLITS:
        path = Path(root) / "annotations" / f"instances_{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: build the scenes first")
        with open(path) as f:
            coco = json.load(f)
        names = {c["id"]: c["name"] for c in coco["categories"]}
        per_class = dict.fromkeys(names.values(), 0)
        for annotation in coco["annotations"]:
            per_class[names[annotation["category_id"]]] += 1
        scenes = len(coco["images"])
        instances = len(coco["annotations"])
        stats[split] = {
            "scenes": scenes,
            "instances": instances,
            "mean_instances": instances / scenes if scenes else 0.0,
            "per_class": per_class,
        }
    return stats
