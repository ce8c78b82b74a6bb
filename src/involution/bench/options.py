"""Options that several ``involution bench`` commands share, and what they resolve to."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

__all__ = ["add_device_option", "add_threads_and_json_options", "chosen_device"]


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device cpu|cuda``, read by :func:`chosen_device`."""
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu"
    )


def add_threads_and_json_options(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` (CPU threads) and ``--json FILE`` (the results, also as JSON)."""
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")


def chosen_device(name: str | None) -> torch.device:
    """The ``--device`` given, else CUDA when available, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
