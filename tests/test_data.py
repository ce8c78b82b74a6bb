"""Datasets and samplers: IDX reading, Fashion-MNIST, ImageFolder checks, seeded augmentation."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from involution.datasets.classification import ArrayDataset, build_datasets
from involution.datasets.fashion_mnist import SYSTEM_FASHION_MNIST, find_fashion_mnist, read_idx
from involution.train.config import load_config
from involution.train.data import EpochBatchSampler, ShardSampler


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(folder: Path, n_train: int = 12, n_test: int = 6) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_read_idx_roundtrip_plain_and_gzip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(np.uint8)
    for name in ("a.idx", "a.idx.gz"):
        _write_idx(tmp_path / name, array)
        np.testing.assert_array_equal(read_idx(tmp_path / name), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    truncated = tmp_path / "short.idx"
    _write_idx(truncated, array)
    truncated.write_bytes(truncated.read_bytes()[:-5])
    with pytest.raises(ValueError, match="header says"):
        read_idx(truncated)


def test_fashion_mnist_from_a_folder(tmp_path: Path) -> None:
    _fake_fashion_mnist(tmp_path)
    config = load_config(None, [f"data.root={tmp_path}", "data.val_split=test"])
    bundle = build_datasets(config)
    assert (len(bundle.train), len(bundle.val), bundle.in_chans) == (12, 6, 1)
    assert bundle.classes[0] == "T-shirt/top" and len(bundle.classes) == 10
    images, labels = bundle.val.__getitems__([(0, 0), (0, 5)])
    assert images.shape == (2, 1, 28, 28) and images.dtype == torch.float32
    assert labels.tolist() == [0, 5]
    with pytest.raises(FileNotFoundError, match="IDX files"):
        find_fashion_mnist(tmp_path / "empty")


@pytest.mark.skipif(not SYSTEM_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_is_read_correctly() -> None:
    bundle = build_datasets(load_config("fashion_mnist", ["data.augment=none"]))
    assert (len(bundle.train), len(bundle.val)) == (60000, 10000)
    labels = bundle.train.labels
    # Fashion-MNIST is balanced: 6000 training images per class.
    assert torch.bincount(labels).tolist() == [6000] * 10
    raw = bundle.train.images
    assert raw.dtype == torch.uint8 and raw.shape == (60000, 1, 28, 28)
    assert 70 < raw.float().mean() < 75  # mean intensity 0.286 * 255


def _array_dataset(train: bool, augment: str = "crop_flip") -> ArrayDataset:
    config = load_config(None, [f"data.augment={augment}", "data.image_size=8"])
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8)).astype(np.uint8)
    return ArrayDataset(images, np.arange(10), config, train=train, seed=3)


def test_augmentation_is_a_function_of_seed_epoch_and_index() -> None:
    data = _array_dataset(train=True)
    a, _ = data.__getitems__([(0, 1), (0, 2), (1, 1)])
    b, _ = data.__getitems__([(1, 1), (0, 2), (0, 1)])
    torch.testing.assert_close(a, b.flip(0), rtol=0, atol=0)
    # Across 10 samples and 2 epochs, the random crop/flip changes something.
    keys0 = [(0, i) for i in range(10)]
    keys1 = [(1, i) for i in range(10)]
    assert not torch.equal(data.__getitems__(keys0)[0], data.__getitems__(keys1)[0])
    # Evaluation data is never augmented.
    evaluation = _array_dataset(train=False)
    torch.testing.assert_close(
        evaluation.__getitems__(keys0)[0], evaluation.__getitems__(keys1)[0], rtol=0, atol=0
    )
    # Per-sample torchvision transforms are seeded the same way.
    rrc = _array_dataset(train=True, augment="random_resized_crop")
    torch.testing.assert_close(rrc[(2, 4)][0], rrc[(2, 4)][0], rtol=0, atol=0)
    assert rrc[(2, 4)][0].shape == (1, 8, 8)


def test_epoch_batches_are_disjoint_shards_and_skippable() -> None:
    dataset = list(range(11))
    shards = []
    for rank in range(2):
        sampler = EpochBatchSampler(dataset, batch_size=2, seed=1, rank=rank, world_size=2)
        sampler.set_epoch(3)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 3  # 11 samples padded to 12: 6 per rank
        assert all(epoch == 3 for batch in batches for epoch, _ in batch)
        shards.append({index for batch in batches for _, index in batch})
        sampler.set_epoch(3, skip=2)
        assert list(sampler) == batches[2:]
        sampler.set_epoch(4)
        assert list(sampler) != batches
    assert len(shards[0] & shards[1]) <= 1  # DistributedSampler pads 11 to 12 with one repeat
    assert shards[0] | shards[1] == set(range(11))
    evaluation = [[i for _, i in ShardSampler(7, rank, 2)] for rank in range(2)]
    assert sorted(evaluation[0] + evaluation[1]) == list(range(7))


def test_grouped_batches_hold_one_group_until_the_leftovers() -> None:
    groups = [0, 1] * 10 + [1] * 3  # 10 of group 0, 13 of group 1
    sampler = EpochBatchSampler(range(len(groups)), batch_size=4, seed=0, group_ids=groups)
    batches = [[index for _, index in batch] for batch in sampler]
    assert len(batches) == len(sampler) == len(groups) // 4
    pure = [b for b in batches if len({groups[i] for i in b}) == 1]
    assert len(pure) == 2 + 3  # floor(10 / 4) + floor(13 / 4) single-group batches first
    assert batches[: len(pure)] == pure
    assert len({i for b in batches for i in b}) == sum(len(b) for b in batches)  # no repeats
    with pytest.raises(ValueError, match="group_ids has 3 entries"):
        EpochBatchSampler(range(5), 2, 0, group_ids=[0, 1, 0])


def _image_folder(root: Path, classes: dict[str, int], split: str = "train") -> None:
    for name, count in classes.items():
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (10, 12), (i * 40, 0, 255)).save(folder / f"{i}.png")


def _folder_config(root: Path, *extra: str) -> dict:
    return load_config(
        None, ["data.dataset=imagefolder", f"data.root={root}", "data.image_size=8", *extra]
    )


def test_image_folder_loads_train_and_val(tmp_path: Path) -> None:
    _image_folder(tmp_path, {"cat": 2, "dog": 3}, "train")
    _image_folder(tmp_path, {"cat": 1, "dog": 1}, "val")
    bundle = build_datasets(_folder_config(tmp_path, "data.eval_resize=10"))
    assert bundle.classes == ["cat", "dog"] and bundle.in_chans == 3
    assert (len(bundle.train), len(bundle.val)) == (5, 2)
    image, label = bundle.train[(0, 4)]
    assert image.shape == (3, 8, 8) and label == 1


@pytest.mark.parametrize(
    ("layout", "error", "match"),
    [
        ({}, FileNotFoundError, "dataset root .* does not exist"),
        ({"train": {"a": 1}}, FileNotFoundError, "val.* does not exist"),
        ({"train": {"a": 1}, "val": {}}, ValueError, "no class sub-folders"),
        ({"train": {"a": 1, "b": 0}, "val": {"a": 1}}, ValueError, "b hold no images"),
        ({"train": {"a": 1}, "val": {"b": 1}}, ValueError, "class folders differ"),
    ],
)
def test_malformed_image_folders_fail_clearly(
    tmp_path: Path, layout: dict, error: type, match: str
) -> None:
    root = tmp_path / "data"
    for split, classes in layout.items():
        (root / split).mkdir(parents=True)
        for name, count in classes.items():
            (root / split / name).mkdir()
            for i in range(count):
                Image.new("RGB", (4, 4)).save(root / split / name / f"{i}.jpg")
    with pytest.raises(error, match=match):
        build_datasets(_folder_config(root))


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    _image_folder(tmp_path, {"a": 1}, "train")
    _image_folder(tmp_path, {"a": 1}, "val")
    (tmp_path / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    bundle = build_datasets(_folder_config(tmp_path))
    broken = [i for i, (p, _) in enumerate(bundle.train.samples) if p.endswith("broken.jpg")]
    with pytest.raises(OSError, match=r"cannot read image .*broken\.jpg"):
        bundle.train[(0, broken[0])]


def test_subsets_are_fixed_random_choices(tmp_path: Path) -> None:
    _fake_fashion_mnist(tmp_path, n_train=40)
    config = load_config(None, [f"data.root={tmp_path}", "data.train_subset=10"])
    first = build_datasets(config).train.labels
    again = build_datasets(config).train.labels
    assert len(first) == 10 and torch.equal(first, again)
    with pytest.raises(ValueError, match="subset size must be positive"):
        build_datasets(load_config(None, [f"data.root={tmp_path}", "data.train_subset=0"]))
