"""The ``involution`` command line: one sub-command per task, each defined beside its code.

Each ``cli.py`` imports its heavy dependencies (timm, torchvision's detection models,
matplotlib, onnx, the training engine) inside its command functions, so that building the
parser, and ``involution --help``, costs little more than importing torch. Their shared
helpers (one-line errors, model arguments) are in :mod:`involution.cli_utils`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

#: Modules that define sub-commands through ``add_commands(subparsers)``.
COMMAND_MODULES: tuple[str, ...] = (
    "involution.train.cli",
    "involution.models.cli",
    "involution.bench.cli",
    "involution.datasets.cli",
    "involution.export.cli",
    "involution.visualize.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="involution", description="Involution operator and RedNet models."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
