"""Fashion-MNIST scenes: determinism, provenance, mask/box/label consistency, COCO, reuse."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from involution.cli import main
from involution.datasets.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    find_fashion_mnist,
    load_fashion_mnist,
)
from involution.datasets.scenes import (
    MIN_VISIBLE_PIXELS,
    PARAMS_FILE,
    PlacedItem,
    SceneParams,
    build_scenes,
    compose_visible,
    ensure_scenes,
    overlap_over_smaller,
    rescale_item,
)

SMALL = {"train_scenes": 20, "val_scenes": 10, "seed": 3}
SPLITS = {"train": "train", "val": "test"}


@pytest.fixture(scope="module")
def fashion_mnist() -> Path:
    try:
        return find_fashion_mnist(download=False)
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST not available: {err}")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory, fashion_mnist: Path) -> Path:
    return build_scenes(
        tmp_path_factory.mktemp("scenes") / "fm", fashion_mnist_root=fashion_mnist, **SMALL
    )


def _coco(root: Path, split: str) -> dict[str, Any]:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def _png(root: Path, kind: str, split: str, name: str) -> np.ndarray:
    with Image.open(root / kind / split / name) as image:
        assert image.mode == "L"
        return np.asarray(image)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_build_is_byte_identical_on_rerun(scenes: Path, tmp_path: Path, fashion_mnist: Path):
    again = build_scenes(tmp_path / "again", fashion_mnist_root=fashion_mnist, **SMALL)
    first, second = _files(scenes), _files(again)
    assert len(first) == 2 * (20 + 10) + 3
    assert first == second
    # Scene i depends only on (seed, split, i): fewer scenes give a prefix of the same scenes.
    fewer = build_scenes(
        tmp_path / "fewer", fashion_mnist_root=fashion_mnist, **{**SMALL, "train_scenes": 5}
    )
    for i in range(1, 6):
        name = f"images/train/{i:06d}.png"
        assert (fewer / name).read_bytes() == first[name]
    other_seed = build_scenes(
        tmp_path / "other", fashion_mnist_root=fashion_mnist, **{**SMALL, "seed": 4}
    )
    assert (other_seed / "images/val/000001.png").read_bytes() != first["images/val/000001.png"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_items_come_from_their_split_pixel_for_pixel(scenes: Path, fashion_mnist: Path, split):
    images, labels = load_fashion_mnist(fashion_mnist, SPLITS[split])
    coco = _coco(scenes, split)
    files = {image["id"]: image["file_name"] for image in coco["images"]}
    for annotation in coco["annotations"]:
        source = annotation["source"]
        assert source["split"] == SPLITS[split]
        assert annotation["category_id"] == labels[source["index"]] + 1
        size = source["size"]
        assert size == round(28 * source["scale"])
        assert 1.0 <= source["scale"] <= 2.5
        patch = rescale_item(images[source["index"]], size)
        scene = _png(scenes, "images", split, files[annotation["image_id"]])
        visible = mask_utils.decode(annotation["segmentation"]).astype(bool)
        x, y = source["offset"]
        window = (slice(y, y + size), slice(x, x + size))
        # Every visible pixel lies in the item's square and shows the item's own pixel.
        assert visible.sum() == visible[window].sum()
        np.testing.assert_array_equal(scene[window][visible[window]], patch[visible[window]])
        # item_bbox is the tight box of the item's whole mask (threshold 0.1 * 255).
        rows, cols = np.nonzero(patch > 0.1 * 255)
        assert source["item_bbox"] == [
            x + cols.min(),
            y + rows.min(),
            cols.max() - cols.min() + 1,
            rows.max() - rows.min() + 1,
        ]


@pytest.mark.parametrize("split", ["train", "val"])
def test_masks_boxes_and_labels_agree(scenes: Path, split):
    coco = _coco(scenes, split)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for annotation in coco["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    for image in coco["images"]:
        scene = _png(scenes, "images", split, image["file_name"])
        label = _png(scenes, "labels", split, image["file_name"])
        assert scene.shape == label.shape == (image["height"], image["width"])
        assert 128 <= image["width"] <= 160 and 128 <= image["height"] <= 160
        annotations = by_image.get(image["id"], [])
        assert len(annotations) <= 5
        union = np.zeros_like(label)
        for annotation in annotations:
            mask = mask_utils.decode(annotation["segmentation"]).astype(bool)
            assert mask.shape == label.shape
            assert annotation["area"] == mask.sum() >= MIN_VISIBLE_PIXELS
            assert annotation["iscrowd"] == 0
            rows, cols = np.nonzero(mask)
            x0, y0 = cols.min(), rows.min()
            box = [x0, y0, cols.max() - x0 + 1, rows.max() - y0 + 1]
            assert annotation["bbox"] == box
            np.testing.assert_array_equal(mask_utils.toBbox(annotation["segmentation"]), box)
            assert not union[mask].any(), "instance masks overlap"
            union[mask] = annotation["category_id"]
        np.testing.assert_array_equal(label, union)
        # No unannotated item pixels: outside the instances only faint borders (<= 25).
        assert scene[label == 0].max(initial=0) <= 25
        assert (scene[label > 0] > 25).all()


def test_pycocotools_loads_the_annotations(scenes: Path):
    for split, count in (("train", 20), ("val", 10)):
        coco = COCO(str(scenes / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == count
        assert coco.getCatIds() == list(range(1, 11))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(FASHION_MNIST_CLASSES)
        assert all(a["id"] > 0 for a in coco.loadAnns(coco.getAnnIds()))
        assert len(coco.getAnnIds()) >= 2 * count


def test_overlap_bound_respected(scenes: Path):
    pairs = 0
    for split in ("train", "val"):
        coco = _coco(scenes, split)
        by_image: dict[int, list[list[int]]] = {}
        for annotation in coco["annotations"]:
            by_image.setdefault(annotation["image_id"], []).append(
                annotation["source"]["item_bbox"]
            )
        for boxes in by_image.values():
            for a, b in combinations(boxes, 2):
                pairs += 1
                corners = [(x, y, x + w, y + h) for x, y, w, h in (a, b)]
                assert overlap_over_smaller(*corners) <= 0.15
    assert pairs > 0


def test_overlap_over_smaller():
    assert overlap_over_smaller((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert overlap_over_smaller((0, 0, 10, 10), (5, 0, 15, 10)) == 0.5
    assert overlap_over_smaller((0, 0, 10, 10), (2, 2, 4, 4)) == 1.0  # nested


def test_hidden_items_are_left_out_of_image_and_annotations():
    square = np.full((20, 20), 200, np.uint8)
    ring = square.copy()
    ring[5:15, 5:15] = 0  # a hole shows 100 px of the item below
    items = [
        PlacedItem(0, 1, 1.0, square // 2, square > 25, 10, 10),  # 400 px, 76 left visible
        PlacedItem(1, 2, 1.0, square, square > 25, 40, 10),  # 400 px, 100 left visible
        PlacedItem(2, 3, 1.0, square, square > 25, 8, 8),  # covers item 0
        PlacedItem(3, 4, 1.0, ring, ring > 25, 40, 10),  # covers item 1 but its hole
    ]
    scene = compose_visible(40, 70, items)
    assert [item.index for item in scene.items] == [2, 3]  # 100 / 400 < MIN_VISIBLE_FRACTION
    assert (scene.image[10:30, 40:60] == ring).all()  # item 1 is gone from the image too
    assert np.bincount(scene.owner[scene.owner >= 0]).tolist() == [400, 300]


def test_ensure_scenes_reuses_and_rebuilds(tmp_path: Path, fashion_mnist: Path):
    root = tmp_path / "fm"
    params = {"train_scenes": 4, "val_scenes": 2, "fashion_mnist_root": fashion_mnist}
    ensure_scenes(root, **params)
    marker = (root / PARAMS_FILE).stat().st_mtime_ns
    assert ensure_scenes(root, **params) == root.resolve()
    assert (root / PARAMS_FILE).stat().st_mtime_ns == marker  # reused, not rebuilt

    ensure_scenes(root, **{**params, "seed": 1})
    stored = json.loads((root / PARAMS_FILE).read_text())
    assert stored["params"] == {**SceneParams(train_scenes=4, val_scenes=2, seed=1).to_json()}

    (root / "labels" / "val" / "000002.png").unlink()  # incomplete -> rebuilt
    ensure_scenes(root, **{**params, "seed": 1})
    assert (root / "labels" / "val" / "000002.png").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folders left"


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path, fashion_mnist: Path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a Fashion-MNIST scenes folder"):
        build_scenes(tmp_path, train_scenes=1, val_scenes=1, fashion_mnist_root=fashion_mnist)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"min_size": 64}, "min_size"),
        ({"min_size": 150, "max_size": 140}, "min_size"),
        ({"items": (3, 2)}, "items"),
        ({"scales": (0.0, 1.0)}, "scales"),
        ({"max_overlap": 1.5}, "max_overlap"),
        ({"train_scenes": 0}, "train_scenes"),
    ],
)
def test_bad_parameters(params: dict[str, Any], message: str):
    with pytest.raises(ValueError, match=message):
        SceneParams(**params)


def test_cli_prints_counts(tmp_path: Path, fashion_mnist: Path, capsys):
    argv = ["scenes", "--out", str(tmp_path / "fm"), "--train-scenes", "3", "--val-scenes", "2"]
    assert main([*argv, "--fashion-mnist-root", str(fashion_mnist)]) == 0
    out = capsys.readouterr().out
    assert "scenes" in out and "Ankle boot" in out and "per scene" in out
    stats = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:4]}
    assert stats["scenes"] == ["3", "2"]
