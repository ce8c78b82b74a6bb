"""Train small networks side by side on in-memory tensors and report what each one costs.

The loop of the offline examples (``examples/sequential_fashion_1d.py``,
``examples/moving_fashion_3d.py``): each network gets the same data, seed, optimiser (AdamW,
one-cycle schedule), batch size and number of epochs; :func:`compare` returns one row per
network (parameters, multiply-adds per sample, test accuracy, training seconds) and
:func:`markdown_table` prints them. Not the training engine (:mod:`involution.train.engine`):
no run directory, checkpoints or configs, just the fewest lines that make the comparison fair.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["Data", "Result", "compare", "example_parser", "macs_per_sample", "markdown_table"]


@dataclass(frozen=True)
class Data:
    """Training and test samples (N, ...) and integer labels (N,)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


@dataclass(frozen=True)
class Result:
    """One network's row: its name, size, cost and score."""

    name: str
    params: int
    macs: int
    accuracy: float
    seconds: float


def example_parser(
    doc: str, train: int, test: int, epochs: int, batch: int
) -> argparse.ArgumentParser:
    """The examples' shared options (``--train``, ``--test``, ``--epochs``, ``--batch``,
    ``--lr``, ``--threads``) with these defaults; the description is ``doc``'s first paragraph."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=train, help="training samples")
    parser.add_argument("--test", type=int, default=test, help="test samples")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def macs_per_sample(model: nn.Module, sample: Tensor) -> int:
    """Multiply-adds of one forward pass on ``sample`` (1, ...) (``FlopCounterMode`` / 2)."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(sample)
    return counter.get_total_flops() // 2


def train_and_test(
    model: nn.Module, data: Data, epochs: int, batch: int, lr: float
) -> tuple[float, float]:
    """AdamW with a one-cycle schedule, the same sample order for every model; returns (test
    accuracy, training seconds)."""
    steps = epochs * (len(data.train_x) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.train_x), generator=generator)
        for first in range(0, len(order) - batch + 1, batch):
            index = order[first : first + batch]
            loss = nn.functional.cross_entropy(model(data.train_x[index]), data.train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(x).argmax(1) for x in data.test_x.split(256)])
    return (predictions == data.test_y).float().mean().item(), seconds


def compare(
    builders: dict[str, Callable[[], nn.Module]], data: Data, args: argparse.Namespace
) -> list[Result]:
    """Builds (seed 0), measures and trains each network of ``builders`` (name -> builder) with
    ``args.epochs``, ``args.batch`` and ``args.lr`` (:func:`example_parser`)."""
    results = []
    for name, build in builders.items():
        torch.manual_seed(0)
        model = build()
        params = sum(p.numel() for p in model.parameters())
        macs = macs_per_sample(model, data.train_x[:1])
        accuracy, seconds = train_and_test(model, data, args.epochs, args.batch, args.lr)
        results.append(Result(name, params, macs, accuracy, seconds))
    return results


def markdown_table(results: list[Result], unit: str) -> str:
    """The rows as a Markdown table; ``unit`` names a sample (e.g. ``"clip"``)."""
    lines = [
        f"| model | params | MACs/{unit} | test accuracy | training time |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.params:,} | {r.macs / 1e6:.1f} M | {100 * r.accuracy:.1f}% | "
            f"{r.seconds:.0f} s |"
        )
    return "\n".join(lines)
