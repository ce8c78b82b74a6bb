"""Involution3d against its Conv3d twin on Moving Fashion-MNIST clips, on CPU, offline.

    python examples/moving_fashion_3d.py [--train 3000] [--epochs 3] [--threads 2]

Clips of 8 frames of 32x32 in which a real Fashion-MNIST item moves left, right, up or down
(:mod:`involution.datasets.clips`), 40 classes (item x direction). Two networks that differ only
in their two spatio-temporal layers: ``Involution3d(C, (3, 5, 5))`` or ``Conv3d(C, C, (3, 5,
5))``. Prints parameters, multiply-adds per clip, test accuracy and training time of each.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from involution import Involution3d
from involution.datasets.clips import CLIP_CLASSES, make_clips
from involution.datasets.fashion_mnist import find_fashion_mnist, load_fashion_mnist

KERNEL = (3, 5, 5)


class Residual(nn.Module):
    """``relu(x + norm(layer(x)))``."""

    def __init__(self, layer: nn.Module, channels: int) -> None:
        super().__init__()
        self.layer, self.norm = layer, nn.BatchNorm3d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.norm(self.layer(x)))


def clip_net(layer: Callable[[int], nn.Module], classes: int = len(CLIP_CLASSES)) -> nn.Module:
    """(B, 1, 8, 32, 32) clips -> (B, classes) logits; ``layer(C)`` is the spatio-temporal
    layer of each stage (16 channels at 16x16, 32 at 8x8)."""

    def conv_bn(cin: int, cout: int, kernel: tuple[int, ...], stride: tuple[int, ...]) -> list:
        padding = [k // 2 for k in kernel]
        conv = nn.Conv3d(cin, cout, kernel, stride, padding, bias=False)
        return [conv, nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *conv_bn(1, 16, (1, 3, 3), (1, 2, 2)),
        Residual(layer(16), 16),
        *conv_bn(16, 32, (1, 1, 1), (1, 2, 2)),
        Residual(layer(32), 32),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(32, classes),
    )


def involution_layer(channels: int) -> nn.Module:
    return Involution3d(channels, KERNEL)


def conv_layer(channels: int) -> nn.Module:
    return nn.Conv3d(channels, channels, KERNEL, padding=[k // 2 for k in KERNEL], bias=False)


def macs_per_clip(model: nn.Module, clip: Tensor) -> int:
    """Multiply-adds of one forward pass on one clip (FlopCounterMode / 2)."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(clip[:1])
    return counter.get_total_flops() // 2


def train_and_test(
    model: nn.Module, data: tuple[Tensor, Tensor, Tensor, Tensor], epochs: int, batch: int
) -> tuple[float, float]:
    """Adam with a one-cycle schedule; returns (test accuracy, training seconds)."""
    train_x, train_y, test_x, test_y = data
    steps = epochs * (len(train_x) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for first in range(0, len(order) - batch + 1, batch):
            index = order[first : first + batch]
            loss = nn.functional.cross_entropy(model(train_x[index]), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(x).argmax(1) for x in test_x.split(256)])
    return (predictions == test_y).float().mean().item(), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=3000, help="training clips")
    parser.add_argument("--test", type=int, default=2000, help="test clips")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = find_fashion_mnist(download=False)
    splits = []
    for split, count, seed in (("train", args.train, 0), ("test", args.test, 1)):
        clips, labels = make_clips(*load_fashion_mnist(folder, split), count, seed=seed)
        splits += [torch.from_numpy(clips), torch.from_numpy(labels)]
    print(f"{args.train} training / {args.test} test clips {tuple(splits[0].shape[1:])}, ")
    print(f"{len(CLIP_CLASSES)} classes; {args.epochs} epochs, batch {args.batch}, ")
    print(f"{args.threads} threads\n")
    print("| model | params | MACs/clip | test accuracy | training time |")
    print("|---|---:|---:|---:|---:|")
    for name, layer in (
        ("Involution3d (3, 5, 5)", involution_layer),
        ("Conv3d (3, 5, 5)", conv_layer),
    ):
        torch.manual_seed(0)
        model = clip_net(layer)
        params = sum(p.numel() for p in model.parameters())
        macs = macs_per_clip(model, splits[0])
        accuracy, seconds = train_and_test(model, tuple(splits), args.epochs, args.batch)
        row = (
            name,
            f"{params:,}",
            f"{macs / 1e6:.1f} M",
            f"{100 * accuracy:.1f}%",
            f"{seconds:.0f} s",
        )
        print(f"| {' | '.join(row)} |")


if __name__ == "__main__":
    main()
