"""Involution1d against its Conv1d twins on Fashion-MNIST read as pixel sequences, on CPU, offline.

    python examples/sequential_fashion_1d.py [--train 10000] [--epochs 3] [--threads 2]

Each 28x28 image is one sequence of 784 pixels (row after row, 1 channel), so neighbours in a
column are 28 steps apart. Three networks (:func:`involution.models.twins_nd.twin_net`) that
differ only in the spatial mixer of their three bottlenecks: an ``Involution1d``, a dense
``Conv1d`` or a depthwise ``Conv1d``, all of kernel 9. Prints parameters, multiply-adds per
sequence, test accuracy and training time of each.
"""

from __future__ import annotations

import torch

from involution.datasets.fashion_mnist import find_fashion_mnist, load_fashion_mnist
from involution.models.twins_nd import MIXERS, mixer, twin_net
from involution.train.compare import Data, compare, example_parser, markdown_table

KERNEL = 9
NAMES = {"involution": "Involution1d", "conv": "Conv1d", "depthwise": "depthwise Conv1d"}


def sequences(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images of ``split`` as (N, 1, 784) sequences in [0, 1], labels (N,)."""
    images, labels = load_fashion_mnist(find_fashion_mnist(download=False), split)
    pixels = torch.from_numpy(images[:count]).float().div_(255).flatten(1).unsqueeze(1)
    return pixels, torch.from_numpy(labels[:count])


def build(kind: str) -> torch.nn.Module:
    """784 -> 196 (stem, 32 channels) -> 98 (64) -> 49 (128) positions, 10 classes."""
    return twin_net(1, 1, (32, 64, 128), (9, 4), lambda c: mixer(kind, 1, c, KERNEL), 10)


def main() -> None:
    args = example_parser(__doc__, train=10000, test=10000, epochs=3, batch=64).parse_args()
    torch.set_num_threads(args.threads)
    data = Data(*sequences("train", args.train), *sequences("test", args.test))
    print(f"{len(data.train_x)} training / {len(data.test_x)} test sequences of 784 pixels; ")
    print(f"{args.epochs} epochs, batch {args.batch}, {args.threads} threads\n")
    builders = {f"{NAMES[kind]} ({KERNEL})": lambda kind=kind: build(kind) for kind in MIXERS}
    print(markdown_table(compare(builders, data, args), "sequence"))


if __name__ == "__main__":
    main()
