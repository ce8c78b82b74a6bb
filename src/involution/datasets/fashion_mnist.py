"""Fashion-MNIST's IDX files: where they are, how to read them, the class names.

Pure numpy (torchvision is imported only to download the files when they are not installed),
so dataset generators can use it without the training stack.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX files.
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its stored dtype and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{data[2]:02x}")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    array = np.frombuffer(data, dtypes[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: holds {array.size} values, header says {shape}")
    return array.reshape(shape).astype(array.dtype.newbyteorder("="))


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(root: str | Path | None = None, download: bool = True) -> Path:
    """The folder holding Fashion-MNIST's four IDX files.

    Looks in ``root`` (if given), then in Debian's ``dataset-fashion-mnist`` location, then
    downloads with torchvision into ``~/.cache/involution`` (only when ``root`` is unset).
    """
    stems = [stem for pair in _FASHION_FILES.values() for stem in pair]
    candidates = [Path(root)] if root is not None else [SYSTEM_FASHION_MNIST]
    if root is not None:
        candidates.append(Path(root) / "FashionMNIST" / "raw")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "involution"
    candidates.append(cache / "FashionMNIST" / "raw")
    for folder in candidates:
        if all(_idx_file(folder, stem) for stem in stems):
            return folder
    if root is not None:
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files ({', '.join(s + '.gz' for s in stems)}) not found in {root}"
        )
    if download:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(cache), train=True, download=True)
            FashionMNIST(str(cache), train=False, download=True)
            return cache / "FashionMNIST" / "raw"
        except Exception as err:  # network errors come in many types
            reason = f"download failed ({type(err).__name__}: {err})"
    else:
        reason = "download disabled"
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {SYSTEM_FASHION_MNIST} and {reason}. Install it with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), go online so torchvision "
        "can download it, or set data.root to a folder holding the IDX files."
    )


def load_fashion_mnist(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of split ``"train"`` or ``"test"``."""
    if split not in _FASHION_FILES:
        raise ValueError(f"Fashion-MNIST has splits 'train' and 'test', got {split!r}")
    image_stem, label_stem = _FASHION_FILES[split]
    images = read_idx(_idx_file(folder, image_stem) or folder / image_stem)
    labels = read_idx(_idx_file(folder, label_stem) or folder / label_stem).astype(np.int64)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{folder}: Fashion-MNIST {split} images {images.shape} vs {labels.shape}")
    return images, labels
