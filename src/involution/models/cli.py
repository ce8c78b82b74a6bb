"""``involution convert`` (official checkpoint -> safetensors) and ``involution profile``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import timm
import torchvision
from torch import nn

from involution.models.convert import convert_checkpoint
from involution.models.profile import PAPER_GMACS, format_profile, profile_model

#: Prefix that selects a torchvision model instead of a timm one, e.g. ``torchvision:resnet50``.
TORCHVISION_PREFIX = "torchvision:"


def _error(message: object) -> int:
    print(f"involution: error: {message}", file=sys.stderr)
    return 2


def add_commands(subparsers: Any) -> None:
    """Register ``convert`` and ``profile``."""
    convert = subparsers.add_parser(
        "convert",
        help="convert an official RedNet checkpoint (mmcls .pth) to a safetensors state dict",
        description=(
            "Convert an official d-li14/involution RedNet checkpoint (classifier or det/seg "
            "backbone) to this library's key layout. Every key and shape is checked; load the "
            "result with timm.create_model('rednetNN', pretrained=True, "
            "pretrained_cfg_overlay=dict(file=DST)) or "
            "involution.models.convert.rednet_from_checkpoint(DST)."
        ),
    )
    convert.add_argument("src", metavar="SRC", help="official checkpoint (.pth)")
    convert.add_argument("dst", metavar="DST", help="output file (.safetensors)")
    convert.set_defaults(func=convert_command)

    profile = subparsers.add_parser(
        "profile",
        help="parameters and multiply-adds per stage (involution counted correctly)",
        description=(
            "Count parameters and multiply-adds (MACs) per stage on fake tensors. MODEL is a "
            f"timm model name (rednet26, resnet50, ...) or {TORCHVISION_PREFIX}NAME."
        ),
    )
    profile.add_argument("model", metavar="MODEL")
    profile.add_argument("--input-size", type=int, default=224, help="square input side (224)")
    profile.add_argument("--in-chans", type=int, help="input channels (default: the model's)")
    profile.add_argument("--num-classes", type=int, help="classifier outputs (model default)")
    profile.add_argument(
        "--json", action="store_true", help="print the counts as JSON instead of a table"
    )
    profile.set_defaults(func=profile_command)


def convert_command(args: argparse.Namespace) -> int:
    try:
        kwargs = convert_checkpoint(args.src, args.dst)
    except (ValueError, FileNotFoundError, OSError) as err:
        return _error(err)
    print(f"wrote {args.dst}: RedNet({', '.join(f'{k}={v}' for k, v in kwargs.items())})")
    return 0


def model_builder(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    """A no-argument factory for timm model ``name`` or ``torchvision:name``."""
    if name.startswith(TORCHVISION_PREFIX):
        tv_name = name[len(TORCHVISION_PREFIX) :]
        return lambda: torchvision.models.get_model(tv_name, **kwargs)
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r} (not a timm model; try e.g. rednet50, resnet50)")
    return lambda: timm.create_model(name, **kwargs)


def profile_command(args: argparse.Namespace) -> int:
    kwargs: dict[str, Any] = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    try:
        if args.model.startswith(TORCHVISION_PREFIX):
            in_chans = 3 if args.in_chans is None else args.in_chans
        else:
            if args.in_chans is not None:
                kwargs["in_chans"] = args.in_chans
            in_chans = kwargs.get("in_chans") or _default_in_chans(args.model)
        result = profile_model(
            model_builder(args.model, **kwargs), input_size=args.input_size, in_chans=in_chans
        )
    except (ValueError, TypeError, RuntimeError) as err:
        return _error(err)
    if args.json:
        rows = [*result.stages, result.total]
        print(json.dumps({"input_shape": result.input_shape, "rows": [vars(r) for r in rows]}))
        return 0
    print(format_profile(result, args.model))
    paper = PAPER_GMACS.get(args.model)
    if paper is not None and args.input_size == 224 and "num_classes" not in kwargs:
        print(
            f"\npaper: {paper:.2f} GMACs; ours {result.total.macs_elementwise / 1e9:.3f} "
            f"({100 * (result.total.macs_elementwise / 1e9 / paper - 1):+.1f}%) with "
            "element-wise ops counted as mmcv does"
        )
    return 0


def _default_in_chans(name: str) -> int:
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.input_size[0] if cfg is not None else 3
