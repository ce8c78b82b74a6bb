"""Classification datasets: Fashion-MNIST, any ImageFolder tree, synthetic images.

Random augmentation is a pure function of ``(seed, epoch, sample index)``: samplers yield
``(epoch, index)`` keys and datasets seed each sample's augmentation from them. A run therefore
sees the same augmented images whatever the number of workers, ranks or resumptions.

Builders read a training config (:mod:`involution.train.config`, a nested dict): its ``data``
section and ``train.seed``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from involution.datasets.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    find_fashion_mnist,
    load_fashion_mnist,
)
from involution.datasets.sampling import (
    IMAGE_EXTENSIONS,
    SampleKey,
    read_image,
    sample_seeds,
    seeded_transform,
    subset_indices,
)

#: A training config (``involution.train.config.Config``): only read here.
Config = Mapping[str, Any]

_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5,), (0.5,)),
}

# ----------------------------------------------------------------------------- transforms


def normalization(config: Config, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (lists of length ``channels``)."""
    data = config["data"]
    mean, std = _STATS[data["dataset"]]
    mean = data["mean"] or mean
    std = data["std"] or std
    mean = list(mean) * channels if len(mean) == 1 else list(mean)
    std = list(std) * channels if len(std) == 1 else list(std)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"data.mean/std need 1 or {channels} values, got {mean} and {std}")
    return mean, std


def build_transform(config: Config, train: bool, channels: int) -> Callable[[Any], Tensor]:
    """Per-sample transform: a PIL image or uint8 (C, H, W) tensor -> float (C, S, S)."""
    data = config["data"]
    size = data["image_size"]
    mean, std = normalization(config, channels)
    steps: list[Callable[[Any], Any]] = [v2.ToImage()]
    if train and data["augment"] == "random_resized_crop":
        steps += [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    elif train and data["augment"] == "crop_flip":
        steps += [
            v2.Resize(size, antialias=True),
            v2.CenterCrop(size),
            v2.RandomCrop(size, padding=data["crop_padding"]),
            v2.RandomHorizontalFlip(),
        ]
    else:
        steps += [v2.Resize(data["eval_resize"] or size, antialias=True), v2.CenterCrop(size)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


# ----------------------------------------------------------------------------- datasets


class ArrayDataset(Dataset):
    """Images held in memory as uint8 (N, H, W) or (N, H, W, C), fetched a batch at a time.

    ``crop_flip`` augmentation (pad, random crop, horizontal flip) and plain normalisation are
    done on the whole batch; other transforms go through torchvision sample by sample.
    Indexed by :data:`SampleKey` ``(epoch, index)``.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, config: Config, train: bool, seed: int
    ) -> None:
        if images.ndim == 3:
            images = images[..., None]
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.channels = self.images.shape[1]
        self.seed = seed
        self.train = train
        data = config["data"]
        self.padding = data["crop_padding"] if train and data["augment"] == "crop_flip" else 0
        self.batched = data["augment"] != "random_resized_crop" or not train
        self.batched = self.batched and self.images.shape[-1] == data["image_size"]
        mean, std = normalization(config, self.channels)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.transform = build_transform(config, train, self.channels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: SampleKey) -> tuple[Tensor, Tensor]:
        images, labels = self.__getitems__([key])
        return images[0], labels[0]

    def __getitems__(self, keys: Sequence[SampleKey]) -> tuple[Tensor, Tensor]:
        """A batch: images float (B, C, S, S), labels int64 (B,)."""
        epochs = np.array([k[0] for k in keys])
        indices = np.array([k[1] for k in keys])
        seeds = sample_seeds(self.seed, epochs, indices)
        labels = self.labels[indices]
        if not self.batched:
            images = [
                seeded_transform(self.transform, int(s), self.images[i])
                for s, i in zip(seeds, indices, strict=True)
            ]
            return torch.stack(images), labels
        images = self.images[indices].float().div_(255)
        if self.train and self.padding:
            images = self._crop_flip(images, seeds)
        return (images - self.mean) / self.std, labels

    def _crop_flip(self, images: Tensor, seeds: np.ndarray) -> Tensor:
        """Zero-pad by ``padding``, crop back at a per-sample offset, flip half of the samples."""
        p = self.padding
        span = np.uint64(2 * p + 1)
        dy = (seeds % span).astype(np.int64)
        dx = ((seeds >> np.uint64(16)) % span).astype(np.int64)
        flip = ((seeds >> np.uint64(32)) & np.uint64(1)).astype(bool)
        padded = torch.nn.functional.pad(images, (p, p, p, p))
        h, w = images.shape[-2:]
        out = torch.stack(
            [
                padded[b, :, y : y + h, x : x + w]
                for b, (y, x) in enumerate(zip(dy, dx, strict=True))
            ]
        )
        out[torch.from_numpy(flip)] = out[torch.from_numpy(flip)].flip(-1)
        return out


class ImageFileDataset(Dataset):
    """Images on disk, ``samples`` = [(path, class index)], indexed by ``(epoch, index)``."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        config: Config,
        train: bool,
        seed: int,
    ) -> None:
        self.samples = list(samples)
        self.seed = seed
        self.transform = build_transform(config, train, channels=3)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: SampleKey) -> tuple[Tensor, int]:
        epoch, index = key
        path, label = self.samples[index]
        seed = int(sample_seeds(self.seed, epoch, [index])[0])
        return seeded_transform(self.transform, seed, read_image(path)), label


def scan_image_folder(folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """List ``folder/<class>/**/<image>`` as [(path, class index)] and the sorted class names."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise ValueError(
            f"image folder {folder} has no class sub-folders (expected {folder}/<class>/<image>)"
        )
    samples = []
    empty = []
    for label, name in enumerate(classes):
        found = sorted(
            str(Path(dirpath) / file)
            for dirpath, _, files in os.walk(folder / name, followlinks=True)
            for file in files
            if file.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not found:
            empty.append(name)
        samples += [(path, label) for path in found]
    if empty:
        raise ValueError(
            f"image folder {folder}: class folder(s) {', '.join(empty)} hold no images with "
            f"extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    return samples, classes


# ----------------------------------------------------------------------------- splits


class ClassificationSplits(NamedTuple):
    """The training and evaluation sets of a classification config and what a model needs to
    know about them."""

    train: Dataset | list
    val: Dataset
    classes: list[str]
    in_chans: int


def build_datasets(config: Config, train: bool = True) -> ClassificationSplits:
    """Build the datasets named by ``config["data"]``; with ``train=False`` only ``val`` is real
    (``train`` is then the empty list)."""
    data = config["data"]
    seed = config["train"]["seed"]
    kind = data["dataset"]
    if kind == "fashion_mnist":
        folder = find_fashion_mnist(data["root"])
        split_names = {"train": "train", "val": "test", "test": "test"}
        splits = {}
        for role in ("train", "val"):
            name = data[f"{role}_split"]
            if name not in split_names:
                raise ValueError(f"data.{role}_split for Fashion-MNIST: train|test, got {name!r}")
            if role == "train" and not train:
                continue
            images, labels = load_fashion_mnist(folder, split_names[name])
            keep = subset_indices(data[f"{role}_subset"], len(labels), seed)
            splits[role] = ArrayDataset(images[keep], labels[keep], config, role == "train", seed)
        return ClassificationSplits(
            splits.get("train", []), splits["val"], list(FASHION_MNIST_CLASSES), 1
        )
    if kind == "synthetic":
        generator = torch.Generator().manual_seed(seed)
        size, classes, chans = (
            data["image_size"],
            data["synthetic_classes"],
            data["synthetic_channels"],
        )
        parts = {}
        for role in ("train", "val"):
            n = data[f"synthetic_{role}_size"]
            images = torch.randint(0, 256, (n, size, size, chans), generator=generator)
            labels = torch.randint(0, classes, (n,), generator=generator)
            parts[role] = ArrayDataset(
                images.to(torch.uint8).numpy(), labels.numpy(), config, role == "train", seed
            )
        return ClassificationSplits(
            parts["train"], parts["val"], [str(i) for i in range(classes)], chans
        )
    # imagefolder
    if data["root"] is None:
        raise ValueError("data.root must be set for data.dataset=imagefolder")
    root = Path(data["root"]).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    roles = ("train", "val") if train else ("val",)
    scanned = {}
    for role in roles:
        folder = root / data[f"{role}_split"]
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} does not exist: an ImageFolder root needs {data[f'{role}_split']}/ "
                f"(set data.{role}_split to the right sub-folder name)"
            )
        scanned[role] = scan_image_folder(folder)
    if train and scanned["train"][1] != scanned["val"][1]:
        raise ValueError(
            f"train and val class folders differ under {root}: "
            f"{sorted(set(scanned['train'][1]) ^ set(scanned['val'][1]))}"
        )
    datasets: dict[str, Dataset] = {}
    for role, (samples, _) in scanned.items():
        keep = subset_indices(data[f"{role}_subset"], len(samples), seed)
        datasets[role] = ImageFileDataset([samples[i] for i in keep], config, role == "train", seed)
    return ClassificationSplits(datasets.get("train", []), datasets["val"], scanned["val"][1], 3)
