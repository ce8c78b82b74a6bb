"""``involution show-kernels``: the kernels an involution model generates on an image."""

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


def _pixel(text: str) -> tuple[int, int]:
    try:
        y, x = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a pixel is Y,X (two ints), got {text!r}") from None
    return y, x


def add_commands(subparsers: Any) -> None:
    """Register ``show-kernels``."""
    add_command(subparsers, "show-kernels", show_kernels_command, show_kernels_arguments)


def show_kernels_arguments(show: argparse.ArgumentParser) -> None:
    """draw the kernels involution layers generate on an image (as in the paper)

    Run the model on IMAGE (preprocessed as for evaluation) and draw, per chosen
    layer and group, a heatmap over the image of each pixel's kernel sum, and the
    K x K kernels at a few pixels.
    """
    add_model_arguments(show)
    show.add_argument("image", metavar="IMAGE", help="an image file")
    show.add_argument("--out", required=True, metavar="FILE", help="the PNG file to write")
    show.add_argument(
        "--layers",
        nargs="+",
        metavar="NAME",
        help="involution module names (default: the first of the stem and of each stage)",
    )
    show.add_argument(
        "--pixels",
        nargs="+",
        type=_pixel,
        metavar="Y,X",
        help="pixels of the model input whose kernels are drawn (default: centre and diagonal)",
    )
    show.add_argument("--max-groups", type=int, default=8, help="groups drawn per layer (8)")


def show_kernels_command(args: argparse.Namespace) -> int:
    from PIL import Image

    from involution.visualize.kernels import capture_kernels, default_layers, plot_kernels

    try:
        loaded = load_classifier_from_args(args)
        try:
            with Image.open(args.image) as picture:
                mode = "L" if loaded.in_chans == 1 else "RGB"
                image = loaded.transform(picture.convert(mode))
        except OSError as err:
            raise OSError(f"cannot read image {args.image}: {err}") from err
        layers = args.layers or default_layers(loaded.model)
        if not layers:
            raise ValueError(f"{loaded.name} has no involution layers")
        kernels = capture_kernels(loaded.model, image[None], layers)
        drawn = plot_kernels(
            image,
            {name: k[0] for name, k in kernels.items()},
            pixels=args.pixels,
            max_groups=args.max_groups,
            path=args.out,
        )
    except (*USER_ERRORS, RuntimeError) as err:
        return user_error(err)
    print(
        f"wrote {args.out} ({drawn.width_px}x{drawn.height_px} px): layers "
        f"{', '.join(drawn.layers)}; pixels {', '.join(f'({y}, {x})' for y, x in drawn.pixels)}"
    )
    return 0
