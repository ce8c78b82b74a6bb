"""``involution scenes``: build the Fashion-MNIST scenes dataset and print its statistics."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from involution.cli_utils import USER_ERRORS, user_error
from involution.datasets.scenes import SceneParams, build_scenes, ensure_scenes, scene_statistics


def add_commands(subparsers: Any) -> None:
    """Register ``scenes``."""
    defaults = SceneParams()
    parser = subparsers.add_parser(
        "scenes",
        help="build the COCO-format Fashion-MNIST scenes dataset (detection/segmentation demos)",
        description=(
            "Build canvases holding several real Fashion-MNIST items (train scenes from its "
            "train split, val scenes from its test split) with COCO boxes, RLE instance masks "
            "and semantic label maps. Deterministic in --seed. An existing folder built with the "
            "same parameters is reused unless --force."
        ),
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--train-scenes", type=int, default=defaults.train_scenes)
    parser.add_argument("--val-scenes", type=int, default=defaults.val_scenes)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--min-size", type=int, default=defaults.min_size, help="canvas side")
    parser.add_argument("--max-size", type=int, default=defaults.max_size, help="canvas side")
    parser.add_argument(
        "--fashion-mnist-root", type=Path, help="folder of the Fashion-MNIST IDX files"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.set_defaults(func=scenes_command)


def format_statistics(stats: dict[str, dict[str, Any]]) -> str:
    """A table of instances per class and split, with scene counts and means."""
    splits = list(stats)
    classes = list(next(iter(stats.values()))["per_class"])
    width = max(len(name) for name in classes)
    lines = [f"{'':<{width}}" + "".join(f"{split:>10}" for split in splits)]
    for row, key in (("scenes", "scenes"), ("instances", "instances")):
        lines.append(f"{row:<{width}}" + "".join(f"{stats[s][key]:>10}" for s in splits))
    lines.append(
        f"{'per scene':<{width}}" + "".join(f"{stats[s]['mean_instances']:>10.2f}" for s in splits)
    )
    lines += [
        f"{name:<{width}}" + "".join(f"{stats[s]['per_class'][name]:>10}" for s in splits)
        for name in classes
    ]
    return "\n".join(lines)


def scenes_command(args: argparse.Namespace) -> int:
    params = {
        "train_scenes": args.train_scenes,
        "val_scenes": args.val_scenes,
        "seed": args.seed,
        "min_size": args.min_size,
        "max_size": args.max_size,
    }
    build = build_scenes if args.force else ensure_scenes
    start = time.perf_counter()
    try:
        root = build(args.out, fashion_mnist_root=args.fashion_mnist_root, **params)
        statistics = scene_statistics(root)
    except USER_ERRORS as err:
        return user_error(err)
    print(f"{root} ready in {time.perf_counter() - start:.1f} s")
    print(format_statistics(statistics))
    return 0
