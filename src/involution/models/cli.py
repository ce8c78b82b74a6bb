"""``involution convert`` (official checkpoint -> safetensors) and ``involution profile``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from torch import nn

from involution.cli_utils import USER_ERRORS, add_command, user_error

if TYPE_CHECKING:
    from involution.models.profile import ModelProfile

#: Prefix that selects a torchvision model instead of a timm one, e.g. ``torchvision:resnet50``.
TORCHVISION_PREFIX = "torchvision:"


def task_models() -> dict[str, Callable[..., nn.Module]]:
    """Models that are not timm classifiers, by name: ``builder(num_classes=...) -> nn.Module``.

    Their profile has one row per top-level child (e.g. backbone, neck, decode_head). Detectors
    are profiled through what mmdet's FLOP count runs (backbone, neck, heads on 1000/100 RoIs).
    """
    from involution.models.detection import DETECTION_MODELS
    from involution.models.detection.complexity import complexity_view
    from involution.models.segmentation import SEGMENTATION_MODELS

    return {
        **SEGMENTATION_MODELS,
        **{name: partial(complexity_view, name) for name in DETECTION_MODELS},
    }


def add_commands(subparsers: Any) -> None:
    """Register ``convert`` and ``profile``."""
    add_command(subparsers, "convert", convert_command, convert_arguments)
    add_command(subparsers, "profile", profile_command, profile_arguments)


def convert_arguments(convert: argparse.ArgumentParser) -> None:
    """convert an official RedNet checkpoint (mmcls .pth) to a safetensors state dict

    Convert an official d-li14/involution RedNet checkpoint (classifier or det/seg
    backbone) to this library's key layout. Every key and shape is checked; load the
    result with timm.create_model('rednetNN', pretrained=True,
    pretrained_cfg_overlay=dict(file=DST)) or
    involution.models.convert.rednet_from_checkpoint(DST).
    """
    convert.add_argument("src", metavar="SRC", help="official checkpoint (.pth)")
    convert.add_argument("dst", metavar="DST", help="output file (.safetensors)")


def profile_arguments(profile: argparse.ArgumentParser) -> None:
    """parameters and multiply-adds per stage (involution counted correctly)"""
    profile.description = (
        "Count parameters and multiply-adds (MACs) per stage on fake tensors. MODEL is a "
        f"timm model name (rednet26, resnet50, ...), {TORCHVISION_PREFIX}NAME, or a "
        "segmentation or detection model (semantic_fpn_rednet50, upernet_rednet50, "
        "fasterrcnn_rednet50_fpn_inv_neck, ...; needs --num-classes, 81 for COCO "
        "detection)."
    )
    profile.add_argument("model", metavar="MODEL")
    profile.add_argument(
        "--input-size",
        type=int,
        nargs="+",
        default=[224],
        metavar=("H", "W"),
        help="input side, or height and width (224)",
    )
    profile.add_argument("--in-chans", type=int, help="input channels (default: the model's)")
    profile.add_argument("--num-classes", type=int, help="classifier outputs (model default)")
    profile.add_argument(
        "--json", action="store_true", help="print the counts as JSON instead of a table"
    )


def convert_command(args: argparse.Namespace) -> int:
    from involution.models.convert import convert_checkpoint

    try:
        kwargs = convert_checkpoint(args.src, args.dst)
    except USER_ERRORS as err:
        return user_error(err)
    print(f"wrote {args.dst}: RedNet({', '.join(f'{k}={v}' for k, v in kwargs.items())})")
    return 0


def model_builder(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    """A no-argument factory for model ``name`` (see
    :func:`involution.models.loading.create_model`); detectors as :func:`task_models` has
    them."""
    from involution.models.loading import create_model, is_known_model

    builders = task_models()
    if name in builders:
        return lambda: builders[name](**kwargs)
    if not is_known_model(name):
        raise ValueError(f"unknown model {name!r} (not a timm model; try e.g. rednet50, resnet50)")
    return lambda: create_model(name, **kwargs)


def profile_command(args: argparse.Namespace) -> int:
    from involution.models.detection.complexity import OFFICIAL_FIGURES
    from involution.models.profile import PAPER_GMACS, format_profile, profile_model
    from involution.models.segmentation import OFFICIAL_CITYSCAPES

    kwargs: dict[str, Any] = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if len(args.input_size) > 2:
        return user_error(f"--input-size takes H or H W, got {len(args.input_size)} values")
    input_size = args.input_size[0] if len(args.input_size) == 1 else tuple(args.input_size)
    task_model = args.model in task_models()
    if task_model and args.num_classes is None:
        return user_error(f"{args.model} needs --num-classes (e.g. 19 for Cityscapes, 81 for COCO)")
    try:
        if args.model.startswith(TORCHVISION_PREFIX) or task_model:
            in_chans = 3 if args.in_chans is None else args.in_chans
        else:
            if args.in_chans is not None:
                kwargs["in_chans"] = args.in_chans
            in_chans = kwargs.get("in_chans") or _default_in_chans(args.model)
        result = profile_model(
            model_builder(args.model, **kwargs),
            input_size=input_size,
            in_chans=in_chans,
            stage_of=(lambda child: child) if task_model else None,
        )
    except (ValueError, TypeError, RuntimeError) as err:
        return user_error(err)
    if args.json:
        rows = [*result.stages, result.total]
        print(json.dumps({"input_shape": result.input_shape, "rows": [vars(r) for r in rows]}))
        return 0
    print(format_profile(result, args.model))
    official = OFFICIAL_CITYSCAPES.get(args.model)
    if official is not None and input_size == (1024, 2048) and args.num_classes == 19:
        print(_cityscapes_comparison(result, official))
    coco_size = sorted(args.input_size) == [800, 1280]
    if args.model in OFFICIAL_FIGURES and coco_size and args.num_classes == 81:
        print(_coco_comparison(args.model, result))
    paper = PAPER_GMACS.get(args.model)
    if paper is not None and input_size == 224 and "num_classes" not in kwargs:
        print(
            f"\npaper: {paper:.2f} GMACs; ours {result.total.macs_elementwise / 1e9:.3f} "
            f"({100 * (result.total.macs_elementwise / 1e9 / paper - 1):+.1f}%) with "
            "element-wise ops counted as mmcv does"
        )
    return 0


def _cityscapes_comparison(result: ModelProfile, official: dict[str, float]) -> str:
    """Ours vs the official table; its FLOPs leave out the auxiliary head (mmseg's
    ``forward_dummy``), its parameter count includes it."""
    aux = sum(row.macs_elementwise for row in result.stages if row.name == "aux_head")
    gmacs = (result.total.macs_elementwise - aux) / 1e9
    return (
        f"\nofficial (1024x2048, 19 classes): {official['params_m']}M parameters, "
        f"{official['gflops']} GFLOPs (MACs); ours {result.total.params / 1e6:.2f}M, "
        f"{gmacs:.1f} GMACs with element-wise ops counted as mmcv does"
        f"{' and without the aux head' if aux else ''} "
        f"({100 * (gmacs / official['gflops'] - 1):+.1f}%)"
    )


def _coco_comparison(name: str, result: ModelProfile) -> str:
    """Ours vs the official COCO table, whose parameters are mmcv's count: trainable only (the
    frozen stem and layer1 left out)."""
    import torch

    from involution.models.detection import DETECTION_MODELS
    from involution.models.detection.complexity import OFFICIAL_FIGURES

    official = OFFICIAL_FIGURES[name]
    with torch.device("meta"):
        model = DETECTION_MODELS[name](num_classes=81)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    gmacs = result.total.macs_elementwise / 1e9
    return (
        f"\nofficial (1280x800, 80 classes): {official.params_m}M parameters (trainable), "
        f"{official.gflops} GFLOPs (MACs); ours {trainable:.2f}M trainable "
        f"({100 * (trainable / official.params_m - 1):+.1f}%) of {result.total.params / 1e6:.2f}M, "
        f"{gmacs:.1f} GMACs with element-wise ops counted as mmcv does "
        f"({100 * (gmacs / official.gflops - 1):+.1f}%)"
    )


def _default_in_chans(name: str) -> int:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.input_size[0] if cfg is not None else 3
