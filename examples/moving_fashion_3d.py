"""Involution3d against its Conv3d twin on Moving Fashion-MNIST clips, on CPU, offline.

    python examples/moving_fashion_3d.py [--train 3000] [--epochs 3] [--threads 2]

Clips of 8 frames of 32x32 in which a real Fashion-MNIST item moves left, right, up or down
(:mod:`involution.datasets.clips`), 40 classes (item x direction). Two networks
(:func:`involution.models.twins_nd.twin_net`) that differ only in the spatio-temporal mixer of
their two RedNet-style bottlenecks: ``Involution3d(C, (3, 5, 5), group_channels=8)`` or
``Conv3d(C, C, (3, 5, 5))``. Prints parameters, multiply-adds per clip, test accuracy and
training time of each.
"""

from __future__ import annotations

import torch

from involution.datasets.clips import CLIP_CLASSES, make_clips
from involution.datasets.fashion_mnist import find_fashion_mnist, load_fashion_mnist
from involution.models.twins_nd import mixer, twin_net
from involution.train.compare import Data, compare, example_parser, markdown_table

KERNEL = (3, 5, 5)


def clips(split: str, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` clips (N, 1, 8, 32, 32) of ``split``'s items and their labels (N,)."""
    folder = find_fashion_mnist(download=False)
    frames, labels = make_clips(*load_fashion_mnist(folder, split), count, seed=seed)
    return torch.from_numpy(frames), torch.from_numpy(labels)


def build(kind: str) -> torch.nn.Module:
    """8x32x32 -> 8x16x16 (stem, 32 channels) -> 8x8x8 (64), 40 classes.

    The stem spans 3 frames: an involution's kernels are generated from each voxel's own
    features, which must carry motion for the kernels to depend on the direction (with a
    per-frame stem the involution network told items apart but not directions).
    """
    stem = ((3, 3, 3), (1, 2, 2))
    return twin_net(
        3,
        1,
        (32, 64),
        stem,
        lambda c: mixer(kind, 3, c, KERNEL, group_channels=8),
        len(CLIP_CLASSES),
    )


def main() -> None:
    args = example_parser(__doc__, train=3000, test=2000, epochs=3, batch=32).parse_args()
    torch.set_num_threads(args.threads)
    data = Data(*clips("train", args.train, seed=0), *clips("test", args.test, seed=1))
    print(f"{args.train} training / {args.test} test clips {tuple(data.train_x.shape[1:])}, ")
    print(f"{len(CLIP_CLASSES)} classes; {args.epochs} epochs, batch {args.batch}, ")
    print(f"{args.threads} threads\n")
    builders = {
        f"{name} (3, 5, 5)": lambda kind=kind: build(kind)
        for name, kind in (("Involution3d", "involution"), ("Conv3d", "conv"))
    }
    print(markdown_table(compare(builders, data, args), "clip"))


if __name__ == "__main__":
    main()
