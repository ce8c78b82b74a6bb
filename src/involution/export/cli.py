"""``involution export`` (ONNX, checked in onnxruntime) and ``involution show-kernels``.

Both take a model as a training run (``--run``: its weights, config and input size) or as a
timm model name with optional weights (``--model NAME [--weights FILE]``: an official mmcls
checkpoint, a converted one or our safetensors; the classifier size and input channels are read
off the weights).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

#: Errors caused by the user's input: one line on stderr, exit code 2.
USER_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, OSError, RuntimeError)


def _error(message: object) -> int:
    text = message.args[0] if isinstance(message, KeyError) and message.args else message
    print(f"involution: error: {text}", file=sys.stderr)
    return 2


@dataclass
class LoadedModel:
    """A model ready for export or inspection, with what its input looks like."""

    model: nn.Module
    name: str
    in_chans: int
    input_size: tuple[int, int]
    #: PIL image -> normalised (in_chans, H, W) tensor, as the model was trained / configured.
    transform: Callable[[Any], Tensor]


def _from_run(run: Path) -> LoadedModel:
    from involution.train import checkpoint as ckpt
    from involution.train.cli import load_trained_model
    from involution.datasets.classification import build_transform

    model, config, _, in_chans = load_trained_model(run / ckpt.WEIGHTS_NAME, None, [])
    if config["task"] != "classification":
        raise ValueError(
            f"{run} is a {config['task']} run; export and show-kernels take classifiers"
        )
    size = config["data"]["image_size"]
    return LoadedModel(
        model,
        config["model"]["name"],
        in_chans,
        (size, size),
        build_transform(config, train=False, channels=in_chans),
    )


def _from_name(name: str, weights: Path | None) -> LoadedModel:
    import timm

    import involution  # noqa: F401  (registers the RedNets with timm)
    from involution.models.convert import (
        check_state_dict,
        convert_official_state_dict,
        is_official_state_dict,
    )
    from involution.serialization import read_state_dict

    if not timm.is_model(name):
        raise ValueError(
            f"unknown model {name!r}; RedNets: {', '.join(timm.list_models('rednet*'))}"
        )
    kwargs: dict[str, Any] = {}
    state = None
    if weights is not None:
        state = read_state_dict(weights)
        if is_official_state_dict(state):
            state = convert_official_state_dict(state)
        classifier = timm.models.get_pretrained_cfg_value(name, "classifier") or "fc"
        first_conv = timm.models.get_pretrained_cfg_value(name, "first_conv")
        head = state.get(f"{classifier}.weight")
        kwargs["num_classes"] = 0 if head is None else head.shape[0]
        if first_conv and f"{first_conv}.weight" in state:
            kwargs["in_chans"] = state[f"{first_conv}.weight"].shape[1]
    model = timm.create_model(name, **kwargs)
    if state is not None:
        check_state_dict(state, model)
        model.load_state_dict(state)
    data_config = timm.data.resolve_data_config(model=model)
    in_chans, height, width = data_config["input_size"]
    return LoadedModel(
        model, name, in_chans, (height, width), timm.data.create_transform(**data_config)
    )


def load_model(args: argparse.Namespace) -> LoadedModel:
    """The model that ``--run`` or ``--model``/``--weights`` name, in eval mode."""
    if args.run is not None:
        if args.weights is not None:
            raise ValueError("--weights goes with --model; a run brings its own weights")
        loaded = _from_run(Path(args.run))
    else:
        loaded = _from_name(args.model, None if args.weights is None else Path(args.weights))
    loaded.model.eval()
    return loaded


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_DIR", help="a training run directory")
    source.add_argument("--model", metavar="NAME", help="a timm model name (rednet50, ...)")
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="weights for --model: official .pth, converted or our .safetensors",
    )


def _pixel(text: str) -> tuple[int, int]:
    try:
        y, x = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a pixel is Y,X (two ints), got {text!r}") from None
    return y, x


def add_commands(subparsers: Any) -> None:
    """Register ``export`` and ``show-kernels``."""
    export = subparsers.add_parser(
        "export",
        help="write an ONNX file (dynamic batch and size) and check it in onnxruntime",
        description=(
            "Export a model with torch.onnx.export(dynamo=True): involution lowers to standard "
            "ONNX operators, batch, height and width stay dynamic. Then run onnxruntime and "
            "PyTorch on random inputs at the exported size and at one other size and print "
            "the largest difference, relative to the output's scale. Needs the onnx extra."
        ),
    )
    _add_model_arguments(export)
    export.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    export.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="size to export at (default: the run's or the model's)",
    )
    export.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's, 18)")
    export.set_defaults(func=export_command)

    show = subparsers.add_parser(
        "show-kernels",
        help="draw the kernels involution layers generate on an image (as in the paper)",
        description=(
            "Run the model on IMAGE (preprocessed as for evaluation) and draw, per chosen "
            "layer and group, a heatmap over the image of each pixel's kernel sum, and the "
            "K x K kernels at a few pixels."
        ),
    )
    _add_model_arguments(show)
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
    show.set_defaults(func=show_kernels_command)


def other_size(height: int, width: int) -> tuple[int, int]:
    """A second, non-square, odd-ish size near (height, width) for the parity check."""
    return height + height // 4 + 1, width - width // 8 + 1


def export_command(args: argparse.Namespace) -> int:
    try:
        from involution.export.onnx import check_onnx, export_onnx
    except ImportError as err:
        return _error(f"{err}; install the onnx extra: pip install 'involution[onnx]'")
    try:
        loaded = load_model(args)
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
        return _error(f"{err}; install the onnx extra: pip install 'involution[onnx]'")
    except USER_ERRORS as err:
        return _error(err)
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


def show_kernels_command(args: argparse.Namespace) -> int:
    from PIL import Image

    from involution.export.kernels import capture_kernels, default_layers, plot_kernels

    try:
        loaded = load_model(args)
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
    except USER_ERRORS as err:
        return _error(err)
    print(
        f"wrote {args.out} ({drawn.width_px}x{drawn.height_px} px): layers "
        f"{', '.join(drawn.layers)}; pixels {', '.join(f'({y}, {x})' for y, x in drawn.pixels)}"
    )
    return 0
