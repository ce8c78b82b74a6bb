"""Segmentation data: the generic, Cityscapes and ADE20K layouts, bad data, joint augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from involution.datasets.segmentation import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    IGNORE_INDEX,
    AugmentSettings,
    RandomCategoryCrop,
    SegmentationDataset,
    ade20k_layout,
    cityscapes_layout,
    collate_segmentation,
    eval_transform,
    generic_layout,
    read_label,
    scan_pairs,
    train_transform,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _write_pair(
    image: Path, label: Path | None, labels: np.ndarray, image_size: tuple[int, int] | None = None
) -> None:
    """An image whose red channel is 10 * label (so tests can check alignment) and its label."""
    height, width = image_size or labels.shape
    pixels = np.zeros((height, width, 3), np.uint8)
    if image_size is None:
        pixels[..., 0] = 10 * (labels % 25)
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(image)
    if label is not None:
        label.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels.astype(np.uint8), mode="L").save(label)


def _stripes(height: int, width: int, classes: int) -> np.ndarray:
    """Vertical stripes of classes 0..classes-1."""
    return np.tile((np.arange(width) * classes // width)[None], (height, 1)).astype(np.uint8)


def test_generic_layout_pairs_by_stem_and_reads_samples(tmp_path: Path) -> None:
    _write_pair(tmp_path / "images/train/b.jpg", tmp_path / "labels/train/b.png", _stripes(6, 8, 3))
    _write_pair(tmp_path / "images/train/a.png", tmp_path / "labels/train/a.png", _stripes(5, 7, 3))
    (tmp_path / "labels/train/notes.txt").write_text("not a label")
    pairs = scan_pairs(generic_layout(tmp_path, "train"))
    assert [(i.name, m.name) for i, m in pairs] == [("a.png", "a.png"), ("b.jpg", "b.png")]

    dataset = SegmentationDataset(pairs, ["x", "y", "z"], eval_transform(MEAN, STD), False, 0)
    image, mask = dataset[(0, 0)]
    assert image.shape == (3, 5, 7) and image.dtype == torch.float32
    assert mask.shape == (5, 7) and mask.dtype == torch.int64
    torch.testing.assert_close(mask, torch.from_numpy(_stripes(5, 7, 3)).long())
    # Normalised red channel = (10 * label / 255 - 0.5) / 0.25.
    torch.testing.assert_close(image[0], (10 * mask / 255 - 0.5) / 0.25)


def test_cityscapes_layout_uses_train_id_labels_only(tmp_path: Path) -> None:
    for city, frame in (("aachen", "000000_000019"), ("bochum", "000000_000313")):
        stem = f"{city}_{frame}"
        gt = tmp_path / "gtFine/val" / city
        _write_pair(
            tmp_path / "leftImg8bit/val" / city / f"{stem}_leftImg8bit.png",
            gt / f"{stem}_gtFine_labelTrainIds.png",
            np.full((4, 8), 18, np.uint8),
        )
        # The other gtFine files (raw ids 0..33, colours) must not be taken for labels.
        Image.fromarray(np.full((4, 8), 33, np.uint8)).save(gt / f"{stem}_gtFine_labelIds.png")
        Image.new("RGB", (8, 4)).save(gt / f"{stem}_gtFine_color.png")
    pairs = scan_pairs(cityscapes_layout(tmp_path, "val"))
    assert [m.name for _, m in pairs] == [
        "aachen_000000_000019_gtFine_labelTrainIds.png",
        "bochum_000000_000313_gtFine_labelTrainIds.png",
    ]
    dataset = SegmentationDataset(pairs, CITYSCAPES_CLASSES, eval_transform(MEAN, STD), False, 0)
    assert len(CITYSCAPES_CLASSES) == 19 and CITYSCAPES_CLASSES[18] == "bicycle"
    assert dataset[(0, 1)][1].unique().tolist() == [18]


def test_ade20k_layout_reduces_the_zero_label(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 2], [150, 255, 0]], np.uint8)
    base = tmp_path / "ADEChallengeData2016"
    _write_pair(
        base / "images/validation/ADE_val_00000001.jpg",
        base / "annotations/validation/ADE_val_00000001.png",
        labels,
    )
    pairs = scan_pairs(ade20k_layout(tmp_path, "validation"))  # the folder above works too
    assert pairs == scan_pairs(ade20k_layout(base, "validation"))
    dataset = SegmentationDataset(
        pairs, ADE20K_CLASSES, eval_transform(MEAN, STD), False, 0, reduce_zero_label=True
    )
    _, mask = dataset[(0, 0)]
    assert mask.tolist() == [[255, 0, 1], [149, 255, 255]]
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150


def test_unpaired_files_are_named(tmp_path: Path) -> None:
    labels = _stripes(4, 4, 2)
    _write_pair(tmp_path / "images/train/a.png", tmp_path / "labels/train/a.png", labels)
    _write_pair(tmp_path / "images/train/lonely.png", None, labels)
    with pytest.raises(FileNotFoundError, match=r"image .*lonely\.png has no label .*lonely\.png"):
        scan_pairs(generic_layout(tmp_path, "train"))
    (tmp_path / "images/train/lonely.png").unlink()
    Image.fromarray(labels).save(tmp_path / "labels/train/orphan.png")
    with pytest.raises(FileNotFoundError, match=r"label .*orphan\.png has no image"):
        scan_pairs(generic_layout(tmp_path, "train"))
    with pytest.raises(FileNotFoundError, match=r"image folder .*images.val does not exist"):
        scan_pairs(generic_layout(tmp_path, "val"))
    (tmp_path / "images/empty").mkdir()
    (tmp_path / "labels/empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        scan_pairs(generic_layout(tmp_path, "empty"))


def test_ambiguous_image_names_are_an_error(tmp_path: Path) -> None:
    labels = _stripes(4, 4, 2)
    _write_pair(tmp_path / "images/train/a.png", tmp_path / "labels/train/a.png", labels)
    _write_pair(tmp_path / "images/train/a.jpg", None, labels)
    with pytest.raises(ValueError, match=r"two image files for 'a'"):
        scan_pairs(generic_layout(tmp_path, "train"))


@pytest.mark.parametrize(
    ("labels", "image_size", "error", "match"),
    [
        (np.full((4, 6), 1), (4, 5), ValueError, r"image .*a\.png is 5x4 but its label .*is 6x4"),
        (np.array([[0, 1], [3, 255]]), None, ValueError, r"label .*a\.png holds value\(s\) \[3\]"),
    ],
    ids=["size mismatch", "value outside the classes"],
)
def test_bad_pairs_name_the_file(tmp_path: Path, labels, image_size, error, match) -> None:
    _write_pair(tmp_path / "i/a.png", tmp_path / "l/a.png", labels, image_size)
    pairs = [(tmp_path / "i/a.png", tmp_path / "l/a.png")]
    dataset = SegmentationDataset(pairs, ["x", "y", "z"], eval_transform(MEAN, STD), False, 0)
    with pytest.raises(error, match=match):
        dataset[(0, 0)]


def test_bad_label_files(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"label .*rgb\.png has mode 'RGB'"):
        read_label(tmp_path / "rgb.png", 3)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match=r"cannot read label .*broken\.png"):
        read_label(tmp_path / "broken.png", 3)
    # 255 is the ignore index, never an out-of-range class.
    Image.fromarray(np.array([[0, 255]], np.uint8)).save(tmp_path / "ok.png")
    assert read_label(tmp_path / "ok.png", 1).tolist() == [[0, 255]]


def test_training_augmentation_is_joint_seeded_and_nearest(tmp_path: Path) -> None:
    labels = _stripes(24, 32, 5)
    labels[:3] = IGNORE_INDEX
    _write_pair(tmp_path / "i/a.png", tmp_path / "l/a.png", labels)
    settings = AugmentSettings(crop_size=(20, 20), scale=(24, 32), ratio_range=(0.5, 2.0))
    dataset = SegmentationDataset(
        [(tmp_path / "i/a.png", tmp_path / "l/a.png")] * 2,
        [str(k) for k in range(5)],
        train_transform(settings, MEAN, STD),
        True,
        seed=0,
    )
    samples = [dataset[(epoch, 0)] for epoch in range(6)]
    for image, mask in samples:
        assert image.shape == (3, 20, 20) and mask.shape == (20, 20)
        # Nearest resizing: no label value is invented by interpolation.
        assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 4, IGNORE_INDEX}
        # The image moved with the mask: where the mask has class k (away from the stripe
        # borders, blurred by bilinear resizing) the red channel shows 10 * k.
        red = (image[0] * 0.25 + 0.5) * 255
        inner = (mask != IGNORE_INDEX) & (mask == mask.roll(1, 1)) & (mask == mask.roll(-1, 1))
        inner[:, [0, -1]] = False
        torch.testing.assert_close(red[inner], 10.0 * mask[inner], atol=3.0, rtol=0)
    # Deterministic per (epoch, index); different across epochs and indices.
    again = dataset[(3, 0)]
    assert torch.equal(again[0], samples[3][0]) and torch.equal(again[1], samples[3][1])
    assert not torch.equal(samples[0][1], samples[1][1])
    assert not torch.equal(dataset[(0, 1)][1], samples[0][1])
    # A crop larger than the (halved) image: padded bottom/right, ignore in the mask and 0
    # (the mean colour) in the normalised image.
    dataset.transform = train_transform(
        AugmentSettings(crop_size=(20, 20), scale=(24, 32), ratio_range=(0.5, 0.5)), MEAN, STD
    )
    image, mask = dataset[(0, 0)]
    assert image.shape == (3, 20, 20) and (mask[12:] == IGNORE_INDEX).all()
    assert (mask[:, 16:] == IGNORE_INDEX).all() and (mask[3:12, :16] != IGNORE_INDEX).all()
    assert image[:, 12:].eq(0).all() and image[:, :, 16:].eq(0).all()


def test_category_crop_avoids_single_class_crops() -> None:
    # Two halves: of the five 4x4 crop positions, the two at the ends hold one class only.
    mask = torch.zeros(4, 8, dtype=torch.uint8)
    mask[:, 4:] = 1
    image = torch.zeros(3, 4, 8, dtype=torch.uint8)

    def crops(cat_max_ratio: float) -> list[torch.Tensor]:
        torch.manual_seed(0)
        crop = RandomCategoryCrop((4, 4), cat_max_ratio)
        return [crop(tv_tensors.Image(image), tv_tensors.Mask(mask))[1] for _ in range(20)]

    def balanced(m: torch.Tensor) -> bool:
        return bool(torch.bincount(m.flatten().long()).max() < 0.8 * m.numel())

    assert all(balanced(m) for m in crops(0.8))
    assert not all(balanced(m) for m in crops(1.0))


def test_collate_pads_images_with_zero_and_masks_with_ignore() -> None:
    samples = [
        (torch.ones(3, 4, 5), torch.zeros(4, 5, dtype=torch.int64)),
        (torch.ones(3, 6, 3), torch.ones(6, 3, dtype=torch.int64)),
    ]
    batch = collate_segmentation(samples)
    assert batch.images.shape == (2, 3, 6, 5) and batch.masks.shape == (2, 6, 5)
    assert batch.image_sizes.tolist() == [[4, 5], [6, 3]] == batch.mask_sizes.tolist()
    assert batch.images[0, :, 4:].abs().sum() == 0 and batch.images[1, :, :, 3:].abs().sum() == 0
    assert (batch.masks[0, 4:] == IGNORE_INDEX).all() and (batch.masks[1, :, 3:] == 255).all()
    assert batch.masks[0, :4].eq(0).all() and batch.masks[1, :, :3].eq(1).all()


def test_eval_rescale_keeps_the_label_size(tmp_path: Path) -> None:
    _write_pair(tmp_path / "i/a.png", tmp_path / "l/a.png", _stripes(10, 20, 2))
    dataset = SegmentationDataset(
        [(tmp_path / "i/a.png", tmp_path / "l/a.png")],
        ["x", "y"],
        eval_transform(MEAN, STD, scale=(5, 40)),  # short side fits 5 -> factor 0.5
        False,
        0,
    )
    image, mask = dataset[(0, 0)]
    assert image.shape == (3, 5, 10) and mask.shape == (10, 20)
