"""``involution export``: an ONNX file of a model, checked in onnxruntime.

The model is a training run (``--run``: its weights, config and input size) or a timm model
name with optional weights (``--model NAME [--weights FILE]``: an official mmcls checkpoint, a
converted one or our safetensors; the classifier size and input channels are read off the
weights), loaded by :func:`involution.train.loading.load_model`.
"""

from __future__ import annotations

import argparse
from typing import Any

from involution.cli_utils import (
    USER_ERRORS,
    add_command,
    add_model_arguments,
    load_classifier_from_args,
    user_error,
)

#: The exporter reports what it cannot translate as a RuntimeError: the user's model, in one line.
EXPORT_ERRORS = (*USER_ERRORS, RuntimeError)
ONNX_EXTRA = "install the onnx extra: pip install 'involution[onnx]'"


def add_commands(subparsers: Any) -> None:
    """Register ``export``."""
    add_command(subparsers, "export", export_command, export_arguments)


def export_arguments(export: argparse.ArgumentParser) -> None:
    """write an ONNX file (dynamic batch and size) and check it in onnxruntime

    Export a model with torch.onnx.export(dynamo=True): involution lowers to standard
    ONNX operators, batch, height and width stay dynamic. Then run onnxruntime and
    PyTorch on random inputs at the exported size and at one other size and print
    the largest difference, relative to the output's scale. Needs the onnx extra.
    """
    add_model_arguments(export)
    export.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    export.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="size to export at (default: the run's or the model's)",
    )
    export.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's, 18)")


def other_size(height: int, width: int) -> tuple[int, int]:
    """A second, non-square, odd-ish size near (height, width) for the parity check."""
    return height + height // 4 + 1, width - width // 8 + 1


def export_command(args: argparse.Namespace) -> int:
    try:
        from involution.export.onnx import check_onnx, export_onnx
    except ImportError as err:
        return user_error(f"{err}; {ONNX_EXTRA}")
    try:
        loaded = load_classifier_from_args(args)
        height, width = args.input_size or loaded.input_size
        path = export_onnx(
            loaded.model,
            args.out,
            (height, width),
            loaded.in_chans,
            opset=args.opset,
        )
        shapes = [
            (1, loaded.in_chans, height, width),
            (2, loaded.in_chans, *other_size(height, width)),
        ]
        parities = check_onnx(path, loaded.model, shapes)
    except ImportError as err:
        return user_error(f"{err}; {ONNX_EXTRA}")
    except EXPORT_ERRORS as err:
        return user_error(err)
    size_mb = path.stat().st_size / 2**20
    print(
        f"wrote {path} ({size_mb:.1f} MiB): {loaded.name}, input (batch, {loaded.in_chans}, "
        f"height, width), exported at 1x{loaded.in_chans}x{height}x{width}"
    )
    print("onnxruntime vs PyTorch, max |difference| / max |PyTorch output|:")
    for parity in parities:
        shape = "x".join(str(d) for d in parity.shape)
        print(f"  {shape}: {parity.max_relative_diff:.1e}")
    print(f"max relative difference: {max(p.max_relative_diff for p in parities):.1e}")
    return 0
