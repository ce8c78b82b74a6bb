"""Training configuration: a nested dict of known keys, YAML files and dotted overrides.

A config file may name a parent with ``base: other.yaml`` (a path relative to the file, or the
name of a shipped config); its keys are merged over the parent's. Every key must exist in
:data:`DEFAULTS` except below ``model.kwargs``, which is passed verbatim to
``timm.create_model``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

Config = dict[str, Any]

#: Every configurable key with its default. ``None`` means "unset" (any type accepted).
DEFAULTS: Config = {
    # classification | detection | segmentation (see involution.train.tasks)
    "task": "classification",
    "model": {
        "name": "rednet_compact",
        "kwargs": {},
    },
    "data": {
        # fashion_mnist | imagefolder | synthetic (random images, for benchmarks and tests)
        "dataset": "fashion_mnist",
        "root": None,
        "train_split": "train",
        "val_split": "val",
        "image_size": 28,
        # Eval: resize the short side to this, then center-crop image_size (None: no resize).
        "eval_resize": None,
        # none | crop_flip (pad + random crop + flip) | random_resized_crop (+ flip)
        "augment": "crop_flip",
        "crop_padding": 2,
        "mean": None,
        "std": None,
        # Use a fixed random subset of this many training / evaluation images.
        "train_subset": None,
        "val_subset": None,
        "workers": 0,
        "synthetic_train_size": 64,
        "synthetic_val_size": 32,
        "synthetic_classes": 10,
        "synthetic_channels": 3,
        # data.dataset=fashion_mnist_scenes: generation parameters (involution.datasets.scenes;
        # built into data.root, default ~/.cache/involution/fashion_mnist_scenes).
        "scenes": {
            "train_scenes": 4000,
            "val_scenes": 500,
            "min_size": 128,
            "max_size": 160,
            "items": [2, 5],
            "scales": [1.0, 2.5],
            "max_overlap": 0.15,
            "seed": 0,
        },
    },
    "train": {
        "epochs": 3,
        # Per process; the global batch is batch_size * world_size * accumulation_steps.
        "batch_size": 128,
        "accumulation_steps": 1,
        "optimizer": "sgd",
        "lr": 0.1,
        # When set, the lr is scaled linearly: lr * global_batch / lr_base_batch.
        "lr_base_batch": None,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-5,
        # Train for this many optimizer steps instead of `epochs` (the last epoch is cut short).
        "iterations": None,
        "warmup_epochs": 0.0,
        # Warm-up length in optimizer steps; overrides warmup_epochs when set.
        "warmup_steps": None,
        # Warm-up starts at this fraction of the lr (None: at 1/warmup_steps) and rises linearly.
        "warmup_factor": None,
        # cosine (to min_lr_ratio) | step (x gamma at each of milestones, in epochs) |
        # poly ((1 - t/T)^poly_power, floored at min_lr_ratio)
        "schedule": "cosine",
        "milestones": [],
        "gamma": 0.1,
        "poly_power": 0.9,
        "min_lr_ratio": 0.0,
        "label_smoothing": 0.0,
        "grad_clip": None,
        "ema_decay": None,
        # none | bf16 | fp16 (fp16 only on CUDA)
        "amp": "none",
        "channels_last": False,
        # Under DDP, synchronise BatchNorm statistics across processes (segmentation's SyncBN).
        "sync_bn": False,
        "compile": False,
        "seed": 0,
        "deterministic": False,
        # Stop (and checkpoint) after this many optimizer steps in total.
        "max_steps": None,
        "checkpoint_every_steps": None,
        # Evaluate after every n-th epoch (and always after the last): long iteration budgets
        # (Cityscapes' 80k steps are ~216 epochs of 2975 images) evaluate every ~8k steps.
        "eval_every_epochs": 1,
        "device": "auto",
        # CPU threads per process (None: torch's default, one per core).
        "threads": None,
        "progress": True,
    },
    "detection": {
        # data.dataset=coco: image folders and instances JSONs, relative to data.root.
        "train_images": "train2017",
        "train_annotations": "annotations/instances_train2017.json",
        "val_images": "val2017",
        "val_annotations": "annotations/instances_val2017.json",
        # Resize the shorter image side to min_size, the longer one to at most max_size
        # (the official 1333x800); the detector's own resize is set to the same sizes.
        "min_size": 800,
        "max_size": 1333,
        # Probability of a horizontal flip of a training image.
        "hflip": 0.5,
        # `involution predict`: draw the detections scoring at least this.
        "score_threshold": 0.5,
    },
    # task: segmentation (see involution.train.tasks.segmentation)
    "segmentation": {
        # data.dataset=folder: class names, label value i = classes[i] (other datasets know theirs).
        "classes": None,
        # data.dataset=folder: label 0 -> ignore (255), k -> k - 1 (always on for ade20k).
        "reduce_zero_label": False,
        # Training crops [h, w]; smaller images are padded (labels with the ignore index 255).
        "crop_size": [512, 1024],
        # Random rescale before cropping: fit scale * r, r uniform in ratio_range (null: none).
        "scale": None,
        "ratio_range": [0.5, 2.0],
        # Redraw a crop (up to 10 times) while one class covers this fraction of it (1: never).
        "cat_max_ratio": 1.0,
        "flip": True,
        "color_jitter": False,
        # Evaluation and prediction: keep-ratio resize to fit [h, w] (null: as is); scores are
        # computed at the labels' own size.
        "eval_scale": None,
        # whole (one forward per image) | slide (slide_crop windows every slide_stride, averaged)
        "inference": "whole",
        "slide_crop": None,
        "slide_stride": None,
        # Weight of the auxiliary head's loss (UPerNet's FCN head on C4).
        "aux_weight": 0.4,
    },
    "output": {
        "dir": "runs",
        "name": None,
    },
}

#: Keys whose value is a free-form mapping (not checked against DEFAULTS).
FREE_FORM_KEYS: frozenset[str] = frozenset({"model.kwargs"})

DEFAULT_CONFIG_NAME = "fashion_mnist.yaml"


def shipped_configs() -> list[str]:
    """File names of the configs shipped in ``involution/configs``."""
    folder = resources.files("involution") / "configs"
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".yaml"))


def _resolve_config_path(name: str | Path, relative_to: Path | None = None) -> Path:
    """A config file path from a path (absolute, relative to ``relative_to`` or the cwd) or a
    shipped config name (with or without ``.yaml``)."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shipped = str(name) if str(name).endswith(".yaml") else f"{name}.yaml"
    packaged = Path(str(resources.files("involution") / "configs" / shipped))
    if packaged.is_file():
        return packaged
    raise FileNotFoundError(
        f"config {str(name)!r} not found (neither a file nor a shipped config; shipped: "
        f"{', '.join(shipped_configs())})"
    )


def _merge(base: Config, update: Mapping[str, Any], prefix: str = "") -> Config:
    """Recursively merge ``update`` into a copy of ``base``, checking keys against DEFAULTS."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if dotted in FREE_FORM_KEYS:
            if not isinstance(value, Mapping):
                raise TypeError(f"config key {dotted!r} must be a mapping, got {value!r}")
            merged[key] = {**merged.get(key, {}), **copy.deepcopy(dict(value))}
            continue
        default = _lookup(DEFAULTS, dotted)
        if isinstance(default, dict):
            if not isinstance(value, Mapping):
                raise TypeError(f"config key {dotted!r} must be a mapping, got {value!r}")
            merged[key] = _merge(merged[key], value, prefix=f"{dotted}.")
        else:
            merged[key] = _check_type(dotted, default, value)
    return merged


def _lookup(config: Config, dotted: str) -> Any:
    node: Any = config
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            section = ".".join(parts[:depth])
            known = sorted(node) if isinstance(node, dict) else []
            where = f" in section {section!r}" if section else ""
            raise KeyError(f"unknown config key {dotted!r}{where}; known keys: {', '.join(known)}")
        node = node[part]
    return node


def _check_type(dotted: str, default: Any, value: Any) -> Any:
    """Accept ``value`` if it has the default's type (ints for floats, anything for None)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        value = _as_number(value)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise TypeError(
            f"config key {dotted!r} expects {type(default).__name__}, got {value!r} "
            f"({type(value).__name__})"
        )
    return value


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> Config:
    """The mapping in YAML file ``path`` merged over its ``base`` chain (raw, unvalidated)."""
    path = path.resolve()
    if path in seen:
        raise ValueError(f"config inheritance cycle: {' -> '.join(map(str, (*seen, path)))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must hold a mapping at top level, got {type(data)}")
    base_name = data.pop("base", None)
    if base_name is None:
        return data
    parent = _read_yaml(_resolve_config_path(base_name, path.parent), (*seen, path))
    return _deep_update(parent, data)


def _deep_update(base: Config, update: Mapping[str, Any]) -> Config:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_update(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``"train.lr=0.1"`` into ``("train.lr", 0.1)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ValueError(f"override {text!r}: value is not valid YAML: {err}") from None
    return key.strip(), _as_number(value)


def _as_number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: turn such strings into floats."""
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf") else value
        except ValueError:
            return value
    return value


def _nest(dotted: str, value: Any) -> Config:
    nested: Any = value
    for part in reversed(dotted.split(".")):
        nested = {part: nested}
    return nested


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    base: Config | None = None,
) -> Config:
    """Resolve a full config: DEFAULTS <- ``base`` <- file ``path`` <- dotted ``overrides``.

    Raises ``KeyError`` for unknown keys, ``TypeError`` for values of the wrong type,
    ``FileNotFoundError`` for a missing file and ``ValueError`` for malformed input.
    """
    config = _merge(DEFAULTS, base or {})
    if path is not None:
        config = _merge(config, _read_yaml(_resolve_config_path(path)))
    for text in overrides:
        key, value = parse_override(text)
        config = _merge(config, _nest(key, value))
    validate(config)
    return config


#: The tasks of :mod:`involution.train.tasks` and the datasets each can read.
TASK_DATASETS: dict[str, tuple[str, ...]] = {
    "classification": ("fashion_mnist", "imagefolder", "synthetic"),
    "detection": ("coco", "fashion_mnist_scenes"),
    "segmentation": ("folder", "cityscapes", "ade20k", "fashion_mnist_scenes"),
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "task": tuple(TASK_DATASETS),
    "train.schedule": ("cosine", "step", "poly"),
    "data.augment": ("none", "crop_flip", "random_resized_crop"),
    "train.optimizer": ("sgd", "adamw"),
    "train.amp": ("none", "bf16", "fp16"),
}

_POSITIVE: tuple[str, ...] = (
    "data.image_size",
    "train.epochs",
    "train.batch_size",
    "train.accumulation_steps",
    "train.lr",
    "train.eval_every_epochs",
)


def validate(config: Config) -> None:
    """Check values beyond their types (choices, positivity); raise ``ValueError``."""
    for dotted, choices in _CHOICES.items():
        value = _lookup(config, dotted)
        if value not in choices:
            raise ValueError(f"config key {dotted!r} must be one of {choices}, got {value!r}")
    for dotted in _POSITIVE:
        value = _lookup(config, dotted)
        if value <= 0:
            raise ValueError(f"config key {dotted!r} must be positive, got {value!r}")
    datasets = TASK_DATASETS[config["task"]]
    if config["data"]["dataset"] not in datasets:
        raise ValueError(
            f"data.dataset={config['data']['dataset']!r} is not a {config['task']} dataset; "
            f"choose one of {datasets}"
        )
    if any(not isinstance(m, int | float) or m < 0 for m in config["train"]["milestones"]):
        raise ValueError(
            f"train.milestones must be epochs >= 0, got {config['train']['milestones']}"
        )
    ema = config["train"]["ema_decay"]
    if ema is not None and not 0.0 < ema < 1.0:
        raise ValueError(f"train.ema_decay must be in (0, 1), got {ema!r}")
    for dotted in ("data.mean", "data.std"):
        value = _lookup(config, dotted)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(v, int | float) for v in value)
        ):
            raise ValueError(f"config key {dotted!r} must be a list of numbers, got {value!r}")


def dump_config(config: Config) -> str:
    """The config as YAML text (stable key order)."""
    return yaml.safe_dump(config, sort_keys=False)
