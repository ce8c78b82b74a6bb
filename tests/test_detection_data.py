"""COCO-format detection data and COCO evaluation: parsing, masks, filter rules, bad data,
grouped batches, and COCOeval results with known answers."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.transforms import v2

from involution.datasets.coco import (
    CocoDetection,
    collate_detection,
    detection_transform,
    load_coco,
)
from involution.metrics.coco import coco_evaluate, format_coco_table, to_coco_results
from involution.train.data import EpochBatchSampler


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, zeros first."""
    flat = mask.flatten(order="F").astype(np.int64)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def _compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _box_mask(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _tiny_coco() -> dict[str, Any]:
    """Three images (landscape, portrait, square-empty), categories 7 'dog' and 3 'cat'
    (listed out of order), every segmentation kind, one crowd region, one degenerate box and
    one box reaching out of its image."""
    return {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 60, "height": 40},
            {"id": 4, "file_name": "sub/b.png", "width": 30, "height": 50},
            {"id": 12, "file_name": "c.png", "width": 50, "height": 50},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {  # polygon
                "id": 1,
                "image_id": 10,
                "category_id": 7,
                "bbox": [10, 5, 20, 10],
                "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]],
            },
            {  # compressed RLE, box out of the image on the right and bottom
                "id": 2,
                "image_id": 10,
                "category_id": 3,
                "bbox": [50, 30, 20, 20],
                "segmentation": _compressed_rle(_box_mask(40, 60, 50, 30, 60, 40)),
            },
            {  # degenerate: half a pixel wide
                "id": 3,
                "image_id": 10,
                "category_id": 3,
                "bbox": [0, 0, 0.5, 10],
                "segmentation": [[0, 0, 0.5, 0, 0.5, 10, 0, 10]],
            },
            {  # crowd region, uncompressed RLE
                "id": 4,
                "image_id": 10,
                "category_id": 7,
                "iscrowd": 1,
                "bbox": [0, 20, 10, 10],
                "segmentation": _uncompressed_rle(_box_mask(40, 60, 0, 20, 10, 30)),
            },
            {  # uncompressed RLE, not a crowd
                "id": 5,
                "image_id": 4,
                "category_id": 3,
                "bbox": [2, 3, 10, 20],
                "segmentation": _uncompressed_rle(_box_mask(50, 30, 2, 3, 12, 23)),
            },
        ],
    }


def _write(root: Path, dataset: dict[str, Any]) -> Path:
    """Write the images of ``dataset`` (random pixels) and its JSON under ``root``."""
    rng = np.random.default_rng(0)
    for image in dataset["images"]:
        path = root / "images" / image["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (image["height"], image["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    path = root / "instances.json"
    path.write_text(json.dumps(dataset))
    return path


def _dataset(root: Path, dataset: dict[str, Any] | None = None, **kwargs: Any) -> CocoDetection:
    annotations = _write(root, dataset or _tiny_coco())
    kwargs.setdefault("transform", v2.Identity())
    return CocoDetection(root / "images", annotations, **kwargs)


def test_parsing_boxes_labels_masks_and_filter_rules(tmp_path: Path) -> None:
    with pytest.warns(UserWarning) as caught:
        data = _dataset(tmp_path, masks=True)
    message = str(caught[0].message)
    assert "instances.json: of 5 annotations" in message
    assert "1 boxes clipped" in message and "1 degenerate" in message and "1 crowd" in message
    assert data.categories.ids == (3, 7) and data.categories.names == ("cat", "dog")
    assert data.image_ids == [4, 10, 12]

    image, target = data[(0, 1)]  # image id 10
    assert isinstance(image, tv_tensors.Image) and image.shape == (3, 40, 60)
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert target["boxes"].canvas_size == (40, 60)
    # xywh -> xyxy, the second box clipped to the 60x40 image; degenerate and crowd left out.
    assert target["boxes"].tolist() == [[10, 5, 30, 15], [50, 30, 60, 40]]
    assert target["labels"].tolist() == [2, 1]  # dog = category 7 -> 2, cat = 3 -> 1
    assert (target["image_id"], target["orig_size"]) == (10, (40, 60))
    masks = target["masks"]
    assert isinstance(masks, tv_tensors.Mask) and masks.shape == (2, 40, 60)
    np.testing.assert_array_equal(masks[1].numpy(), _box_mask(40, 60, 50, 30, 60, 40))
    # The polygon's rasterisation covers its 20x10 rectangle (pycocotools includes the edge).
    assert masks[0, 6:15, 11:30].all() and masks[0].sum() == pytest.approx(200, abs=40)
    assert masks[0, :4].sum() == 0 and masks[0, :, 32:].sum() == 0

    _, target = data[(0, 0)]  # uncompressed RLE
    np.testing.assert_array_equal(target["masks"][0].numpy(), _box_mask(50, 30, 2, 3, 12, 23))
    _, target = data[(0, 2)]  # no annotations: empty, well-shaped targets
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 50, 50)
    # The ground truth for evaluation keeps everything, with iscrowd and area filled in.
    assert len(data.coco.anns) == 5 and data.coco.anns[4]["iscrowd"] == 1
    assert data.coco.anns[5]["area"] == 200 and data.coco.anns[1]["iscrowd"] == 0


def test_transform_resizes_flips_and_is_seeded_per_key(tmp_path: Path) -> None:
    transform = detection_transform(train=True, min_size=80, max_size=200, hflip=0.5)
    with pytest.warns(UserWarning):
        data = _dataset(tmp_path, masks=True, transform=transform, seed=3)
    flips = set()
    for epoch in range(8):
        image, target = data[(epoch, 1)]
        assert image.dtype == torch.float32 and image.shape == (3, 80, 120)
        assert image.min() >= 0 and image.max() <= 1
        again_image, again_target = data[(epoch, 1)]
        assert torch.equal(image, again_image)
        assert torch.equal(target["boxes"], again_target["boxes"])
        boxes = target["boxes"].tolist()
        flipped = boxes[0] == [60, 10, 100, 30]
        assert flipped or boxes[0] == [20, 10, 60, 30]  # the 2x resize, maybe mirrored
        assert target["masks"].shape == (2, 80, 120)
        assert target["masks"][0, 20, 40 if not flipped else 80] == 1
        flips.add(flipped)
    assert flips == {True, False}
    # The longer side stays within max_size: 60x40 -> 150x100 (not 180x120).
    small = detection_transform(train=False, min_size=120, max_size=150, hflip=0.5)
    with pytest.warns(UserWarning):
        image, target = _dataset(tmp_path, transform=small)[(0, 1)]
    assert image.shape == (3, 100, 150)
    assert target["boxes"].tolist()[0] == [25, 12.5, 75, 37.5]


def test_boxes_that_vanish_when_resized_are_sanitised(tmp_path: Path) -> None:
    dataset = _tiny_coco()
    dataset["annotations"][0]["bbox"] = [10, 5, 1.5, 10]  # 1.5 px wide: 0.75 px at half size
    shrink = detection_transform(train=False, min_size=20, max_size=1000, hflip=0.0)
    with pytest.warns(UserWarning):
        _, target = _dataset(tmp_path, dataset, transform=shrink, masks=True)[(0, 1)]
    assert target["labels"].tolist() == [1] and target["masks"].shape == (1, 20, 30)


def _bad(dataset: dict[str, Any], where: str, key: str, value: Any) -> dict[str, Any]:
    dataset = copy.deepcopy(dataset)
    section, position = where.split("#")
    dataset[section][int(position)][key] = value
    return dataset


@pytest.mark.parametrize(
    ("where", "key", "value", "error", "match"),
    [
        ("images#1", "file_name", "missing.png", FileNotFoundError, r"missing\.png \(image #1"),
        ("annotations#2", "category_id", 99, ValueError, r"annotation #2 \(id 3.*category_id 99"),
        ("annotations#1", "image_id", 5, ValueError, r"annotation #1 \(id 2.*unknown image_id 5"),
        ("annotations#0", "bbox", [1, 2, 3], ValueError, r"annotation #0 \(id 1.*4 finite"),
        ("annotations#0", "bbox", [1, 2, "3", 4], ValueError, r"annotation #0 .*4 finite"),
        ("annotations#0", "bbox", [1, 2, float("nan"), 4], ValueError, "4 finite"),
        ("annotations#4", "bbox", [1, 2, -3, 4], ValueError, r"annotation #4 .*negative width"),
        ("annotations#0", "segmentation", [[1, 2, 3, 4, 5]], ValueError, "polygon of 5 numbers"),
        ("annotations#0", "segmentation", {"size": [40, 60]}, ValueError, "RLE counts"),
        (
            "annotations#4",
            "segmentation",
            {"size": [40, 60], "counts": [0, 2400]},
            ValueError,
            r"annotation #4 \(id 5.*RLE size \[40, 60\]",
        ),
        ("annotations#3", "iscrowd", 2, ValueError, "iscrowd must be 0 or 1"),
        ("images#2", "width", "50", ValueError, r"image #2 \(id 12.*'width' must be int"),
    ],
)
def test_bad_data_errors_name_the_file_and_entry(
    tmp_path: Path, where: str, key: str, value: Any, error: type, match: str
) -> None:
    good = _tiny_coco()
    annotations = _write(tmp_path, good)
    annotations.write_text(json.dumps(_bad(good, where, key, value)))
    with pytest.raises(error, match=match) as caught:
        load_coco(annotations, tmp_path / "images")
    assert "instances.json" in str(caught.value)


def test_bad_files_and_pixels(tmp_path: Path) -> None:
    annotations = _write(tmp_path, _tiny_coco())
    with pytest.raises(FileNotFoundError, match=r"nothing\.json"):
        load_coco(tmp_path / "nothing.json", tmp_path / "images")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
        load_coco(tmp_path / "broken.json", tmp_path / "images")
    # A file whose pixel size differs from its entry, and one that is not an image.
    Image.new("RGB", (31, 50)).save(tmp_path / "images" / "sub" / "b.png")
    (tmp_path / "images" / "c.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning):
        data = CocoDetection(tmp_path / "images", annotations, transform=v2.Identity())
    with pytest.raises(ValueError, match=r"image id 4: .*b\.png is 31x50 pixels.* says 30x50"):
        data[(0, 0)]
    with pytest.raises(
        OSError, match=r"cannot read image .*c\.png.*\(image id 12 of .*instances\.json\)"
    ):
        data[(0, 2)]
    # Mask R-CNN targets need a segmentation for every kept annotation.
    dataset = _tiny_coco()
    del dataset["annotations"][4]["segmentation"]
    with pytest.raises(ValueError, match=r"annotation id 5 \(image_id 4\) has no segmentation"):
        _dataset(tmp_path / "nosegm", dataset, masks=True)


def test_aspect_ratio_groups_make_single_group_batches(tmp_path: Path) -> None:
    dataset = {"images": [], "categories": [{"id": 1, "name": "x"}], "annotations": []}
    sizes = [(40, 30), (30, 40), (30, 30), (20, 50), (50, 20), (25, 60), (64, 64), (10, 11)]
    for i, (w, h) in enumerate(sizes):
        dataset["images"].append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
    data = _dataset(tmp_path, dataset)
    assert data.group_ids == [0, 1, 0, 1, 0, 1, 0, 1]
    sampler = EpochBatchSampler(data, batch_size=2, seed=0, group_ids=data.group_ids)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for batch in batches for _, i in batch) == list(range(8))
        for batch in batches:
            assert len({data.group_ids[i] for _, i in batch}) == 1
            images, targets = collate_detection([data[key] for key in batch])
            assert len(images) == len(targets) == 2
            assert len({(img.shape[-1] >= img.shape[-2]) for img in images}) == 1


# ----------------------------------------------------------------------------- COCO evaluation


def _eval_coco(root: Path, boxes: list[list[float]]) -> CocoDetection:
    """One 100x100 object (category 5) per 200x200 image, at ``boxes`` (xywh)."""
    dataset = {"images": [], "categories": [{"id": 5, "name": "thing"}], "annotations": []}
    for i, box in enumerate(boxes):
        dataset["images"].append(
            {"id": i + 1, "file_name": f"{i}.png", "width": 200, "height": 200}
        )
        x, y, w, h = box
        polygon = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        dataset["annotations"].append(
            {"id": i + 1, "image_id": i + 1, "category_id": 5, "bbox": box, "segmentation": polygon}
        )
    return _dataset(root, dataset)


def _prediction(boxes_xyxy: list[list[float]], scores: list[float]) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.ones(len(boxes_xyxy), dtype=torch.int64),
        "scores": torch.tensor(scores, dtype=torch.float32),
    }


def _evaluate(data: CocoDetection, predictions: list[dict], iou_types=("bbox",)) -> dict:
    results: dict[str, list] = {t: [] for t in iou_types}
    for image_id, prediction in zip(data.image_ids, predictions, strict=True):
        for iou_type, found in to_coco_results(
            prediction, image_id, (200, 200), (200, 200), data.categories.ids
        ).items():
            results[iou_type] += found
    return coco_evaluate(data.coco, results, data.image_ids, iou_types)


def test_coco_eval_known_answers(tmp_path: Path) -> None:
    data = _eval_coco(tmp_path, [[20, 30, 100, 100], [50, 50, 100, 100]])
    perfect = [_prediction([[20, 30, 120, 130]], [0.9]), _prediction([[50, 50, 150, 150]], [0.8])]
    metrics = _evaluate(data, perfect)
    assert metrics["bbox_AP"] == metrics["bbox_AP50"] == metrics["bbox_AP75"] == 1.0
    assert metrics["bbox_APl"] == 1.0 and metrics["bbox_APs"] == metrics["bbox_APm"] == -1
    assert metrics["bbox_AR100"] == 1.0

    # Shifting a 100x100 box by 23 px gives IoU 77*100 / (2*100*100 - 77*100) = 77/123 = 0.626:
    # a match at IoU thresholds 0.50, 0.55 and 0.60 but not at 0.65 ... 0.95, so 3 of the 10
    # thresholds see AP 1 and 7 see AP 0.
    shifted = [_prediction([[43, 30, 143, 130]], [0.9]), _prediction([[73, 50, 173, 150]], [0.8])]
    metrics = _evaluate(data, shifted)
    assert metrics["bbox_AP50"] == 1.0 and metrics["bbox_AP75"] == 0.0
    assert metrics["bbox_AP"] == pytest.approx(0.3)

    # One perfect (score 0.9) and one shifted (0.8) box: from IoU 0.65 on, the ranked list is
    # one hit then one miss, so precision is 1 up to recall 0.5 and nothing is found beyond:
    # 51 of COCO's 101 recall points (0, 0.01, ..., 0.5) have precision 1.
    mixed = [perfect[0], shifted[1]]
    metrics = _evaluate(data, mixed)
    assert metrics["bbox_AP50"] == 1.0
    assert metrics["bbox_AP75"] == pytest.approx(51 / 101)
    assert metrics["bbox_AP"] == pytest.approx((3 * 1 + 7 * 51 / 101) / 10)

    empty = [_prediction([], []), _prediction([], [])]
    assert _evaluate(data, empty)["bbox_AP"] == 0.0
    assert "bbox" in format_coco_table(metrics) and "0.653" in format_coco_table(metrics)


def test_coco_eval_masks_and_mapping_back(tmp_path: Path) -> None:
    data = _eval_coco(tmp_path, [[20, 30, 100, 100]])
    # The detector saw the image at half size (100x100): boxes and masks come back doubled.
    mask = torch.zeros(1, 1, 100, 100)
    mask[0, 0, 15:65, 10:60] = 0.9
    prediction = {**_prediction([[10, 15, 60, 65]], [0.7]), "masks": mask}
    results = to_coco_results(prediction, 1, (100, 100), (200, 200), data.categories.ids)
    assert results["bbox"] == [
        {"image_id": 1, "category_id": 5, "bbox": [20, 30, 100, 100], "score": pytest.approx(0.7)}
    ]
    decoded = mask_utils.decode(results["segm"][0]["segmentation"])
    np.testing.assert_array_equal(decoded, _box_mask(200, 200, 20, 30, 120, 130))
    metrics = coco_evaluate(data.coco, results, [1], ("bbox", "segm"))
    assert metrics["bbox_AP"] == metrics["segm_AP"] == pytest.approx(1.0)
    table = format_coco_table(metrics).splitlines()
    assert table[1].startswith("bbox") and table[2].startswith("segm")
    # A mask covering the top 60 % of the object: mask IoU 0.6 -> AP50 1, AP75 0.
    mask[0, 0, 45:65] = 0
    results = to_coco_results(
        {**prediction, "masks": mask}, 1, (100, 100), (200, 200), data.categories.ids
    )
    metrics = coco_evaluate(data.coco, results, [1], ("segm",))
    assert metrics["segm_AP50"] == pytest.approx(1.0) and metrics["segm_AP75"] == 0.0
