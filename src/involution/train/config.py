"""Training configuration: a typed schema (OmegaConf structured configs), YAML files and dotted
overrides.

:class:`ConfigSchema` and its sections hold every configurable key with its type and default;
``model.kwargs`` is a free-form mapping passed verbatim to ``timm.create_model``. A config file
may name a parent with ``base: other.yaml`` (a path relative to the file, or the name of a
shipped config); its keys are merged over the parent's. :func:`load_config` returns the result
as plain nested dicts (:data:`Config`), which is what the rest of the package indexes.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from functools import reduce
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from omegaconf import DictConfig

Config = dict[str, Any]

DEFAULT_CONFIG_NAME = "fashion_mnist.yaml"

# OmegaConf takes 40+ ms to import: it is imported where configs are built, not with the module,
# so that ``involution --help`` stays fast.


@dataclass
class ModelConfig:
    name: str = "rednet_compact"
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Free-form: passed verbatim to ``timm.create_model``."""


@dataclass
class ScenesConfig:
    """data.dataset=fashion_mnist_scenes: generation parameters (involution.datasets.scenes;
    built into data.root, default ~/.cache/involution/fashion_mnist_scenes)."""

    train_scenes: int = 4000
    val_scenes: int = 500
    min_size: int = 128
    max_size: int = 160
    items: list[int] = field(default_factory=lambda: [2, 5])
    scales: list[float] = field(default_factory=lambda: [1.0, 2.5])
    max_overlap: float = 0.15
    seed: int = 0


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"
    """fashion_mnist | imagefolder | synthetic (random images, for benchmarks and tests)"""
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 28
    eval_resize: int | None = None
    """Eval: resize the short side to this, then center-crop image_size (None: no resize)."""
    augment: str = "crop_flip"
    """none | crop_flip (pad + random crop + flip) | random_resized_crop (+ flip)"""
    crop_padding: int = 2
    mean: list[float] | None = None
    std: list[float] | None = None
    train_subset: int | None = None
    """Use a fixed random subset of this many training images."""
    val_subset: int | None = None
    """Use a fixed random subset of this many evaluation images."""
    workers: int = 0
    synthetic_train_size: int = 64
    synthetic_val_size: int = 32
    synthetic_classes: int = 10
    synthetic_channels: int = 3
    scenes: ScenesConfig = field(default_factory=ScenesConfig)


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 128
    """Per process; the global batch is batch_size * world_size * accumulation_steps."""
    accumulation_steps: int = 1
    optimizer: str = "sgd"
    lr: float = 0.1
    lr_base_batch: int | None = None
    """When set, the lr is scaled linearly: lr * global_batch / lr_base_batch."""
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-5
    iterations: int | None = None
    """Train for this many optimizer steps instead of `epochs` (the last epoch is cut short)."""
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None
    """Warm-up length in optimizer steps; overrides warmup_epochs when set."""
    warmup_factor: float | None = None
    """Warm-up starts at this fraction of the lr (None: at 1/warmup_steps) and rises linearly."""
    schedule: str = "cosine"
    """cosine (to min_lr_ratio) | step (x gamma at each of milestones, in epochs) |
    poly ((1 - t/T)^poly_power, floored at min_lr_ratio)"""
    milestones: list[int | float] = field(default_factory=list)
    gamma: float = 0.1
    poly_power: float = 0.9
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    ema_decay: float | None = None
    amp: str = "none"
    """none | bf16 | fp16 (fp16 only on CUDA)"""
    channels_last: bool = False
    sync_bn: bool = False
    """Under DDP, synchronise BatchNorm statistics across processes (segmentation's SyncBN)."""
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    max_steps: int | None = None
    """Stop (and checkpoint) after this many optimizer steps in total."""
    checkpoint_every_steps: int | None = None
    eval_every_epochs: int = 1
    """Evaluate after every n-th epoch (and always after the last): long iteration budgets
    (Cityscapes' 80k steps are ~216 epochs of 2975 images) evaluate every ~8k steps."""
    device: str = "auto"
    threads: int | None = None
    """CPU threads per process (None: torch's default, one per core)."""
    progress: bool = True


@dataclass
class DetectionConfig:
    """task: detection. data.dataset=coco: image folders and instances JSONs are relative to
    data.root."""

    train_images: str = "train2017"
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"
    min_size: int = 800
    """Resize the shorter image side to min_size, the longer one to at most max_size
    (the official 1333x800); the detector's own resize is set to the same sizes."""
    max_size: int = 1333
    """The longer image side's bound (see min_size)."""
    hflip: float = 0.5
    """Probability of a horizontal flip of a training image."""
    score_threshold: float = 0.5
    """`involution predict`: draw the detections scoring at least this."""


@dataclass
class SegmentationConfig:
    """task: segmentation (see involution.train.tasks.segmentation)."""

    classes: list[str] | None = None
    """data.dataset=folder: class names, label value i = classes[i] (other datasets know theirs)."""
    reduce_zero_label: bool = False
    """data.dataset=folder: label 0 -> ignore (255), k -> k - 1 (always on for ade20k)."""
    crop_size: list[int] = field(default_factory=lambda: [512, 1024])
    """Training crops [h, w]; smaller images are padded (labels with the ignore index 255)."""
    scale: list[int] | None = None
    """Random rescale before cropping: fit scale * r, r uniform in ratio_range (null: none)."""
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 1.0
    """Redraw a crop (up to 10 times) while one class covers this fraction of it (1: never)."""
    flip: bool = True
    color_jitter: bool = False
    eval_scale: list[int] | None = None
    """Evaluation and prediction: keep-ratio resize to fit [h, w] (null: as is); scores are
    computed at the labels' own size."""
    inference: str = "whole"
    """whole (one forward per image) | slide (slide_crop windows every slide_stride, averaged)"""
    slide_crop: list[int] | None = None
    slide_stride: list[int] | None = None
    aux_weight: float = 0.4
    """Weight of the auxiliary head's loss (UPerNet's FCN head on C4)."""


@dataclass
class OutputConfig:
    dir: str = "runs"
    name: str | None = None


@dataclass
class ConfigSchema:
    """Every configurable key, its type and its default."""

    task: str = "classification"
    """classification | detection | segmentation (see involution.train.tasks)"""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


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


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[Config]:
    """The mappings of YAML file ``path`` and of its ``base`` chain, the farthest parent first
    (raw: checked when merged)."""
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
        return [data]
    return [*_read_yaml(_resolve_config_path(base_name, path.parent), (*seen, path)), data]


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


def _merge(node: DictConfig, update: Mapping[str, Any], prefix: str = "") -> None:
    """Merge ``update`` into ``node`` in place, one key at a time so that an error names its
    dotted key in one line: ``KeyError`` for an unknown key, ``TypeError`` for a bad value."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    for key, value in update.items():
        dotted = f"{prefix}{key}"
        current = node.get(key)
        if isinstance(value, Mapping) and isinstance(current, DictConfig):
            _merge(current, value, f"{dotted}.")
            continue
        try:
            node.merge_with({key: value})
        except (ConfigKeyError, ConfigAttributeError):
            section = f" in section {prefix[:-1]!r}" if prefix else ""
            raise KeyError(
                f"unknown config key {dotted!r}{section}; known keys: {', '.join(sorted(node))}"
            ) from None
        except OmegaConfBaseException as err:
            if isinstance(current, DictConfig):
                raise TypeError(f"config key {dotted!r} must be a mapping, got {value!r}") from None
            raise TypeError(_type_message(node, key, dotted, value, err)) from None
        if not OmegaConf.is_interpolation(node, key) and _converted(value, node[key]):
            raise TypeError(_type_message(node, key, dotted, value))


def _type_message(
    node: DictConfig, key: str, dotted: str, value: Any, err: Exception | None = None
) -> str:
    """One line naming the dotted key, the schema's type and the offending value."""
    from omegaconf import OmegaConf

    schema = OmegaConf.get_type(node)
    declared = {f.name: f.type for f in fields(schema)} if is_dataclass(schema) else {}
    if key in declared:
        expected = f"expects {declared[key]}"
    else:  # below a free-form mapping: what OmegaConf refused
        expected = f"is invalid ({str(err).splitlines()[0]})" if err else "is invalid"
    return f"config key {dotted!r} {expected}, got {value!r} ({type(value).__name__})"


def _converted(given: Any, stored: Any) -> bool:
    """Whether OmegaConf changed ``given``'s kind on storing it. It reads 1 and "yes" as True and
    5 as "5"; only the YAML promotions to float (ints, and strings such as ``1e-4``) are kept."""
    if isinstance(given, Mapping):  # a new key of a free-form mapping: stored as given
        return False
    if isinstance(given, list):
        return (
            not isinstance(stored, Sequence)
            or len(stored) != len(given)
            or any(map(_converted, given, stored))
        )
    if isinstance(stored, float) and isinstance(given, int | str) and not isinstance(given, bool):
        return False
    return type(given) is not type(stored)


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    base: Config | None = None,
) -> Config:
    """Resolve a full config: the schema's defaults <- ``base`` <- file ``path`` (after its
    ``base`` chain) <- dotted ``overrides``, as plain nested dicts.

    ``base`` may be a complete config dump, such as a run's ``config.yaml``: keys added to the
    schema since it was written take their defaults. Raises ``KeyError`` for unknown keys,
    ``TypeError`` for values of the wrong type, ``FileNotFoundError`` for a missing file and
    ``ValueError`` for malformed input.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    config = OmegaConf.structured(ConfigSchema)
    layers = [base or {}]
    if path is not None:
        layers += _read_yaml(_resolve_config_path(path))
    for text in overrides:
        key, value = parse_override(text)
        layers.append(reduce(lambda nested, part: {part: nested}, reversed(key.split(".")), value))
    for layer in layers:
        _merge(config, layer)
    try:
        resolved = OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as err:  # a ${...} interpolation that does not resolve
        raise ValueError(f"config: {str(err).splitlines()[0]}") from None
    validate(resolved)
    return resolved


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
    """Check values beyond their types (choices, ranges); raise ``ValueError``."""

    def lookup(dotted: str) -> Any:
        return reduce(operator.getitem, dotted.split("."), config)

    for dotted, choices in _CHOICES.items():
        value = lookup(dotted)
        if value not in choices:
            raise ValueError(f"config key {dotted!r} must be one of {choices}, got {value!r}")
    for dotted in _POSITIVE:
        value = lookup(dotted)
        if value <= 0:
            raise ValueError(f"config key {dotted!r} must be positive, got {value!r}")
    datasets = TASK_DATASETS[config["task"]]
    if config["data"]["dataset"] not in datasets:
        raise ValueError(
            f"data.dataset={config['data']['dataset']!r} is not a {config['task']} dataset; "
            f"choose one of {datasets}"
        )
    if any(m < 0 for m in config["train"]["milestones"]):
        raise ValueError(
            f"train.milestones must be epochs >= 0, got {config['train']['milestones']}"
        )
    ema = config["train"]["ema_decay"]
    if ema is not None and not 0.0 < ema < 1.0:
        raise ValueError(f"train.ema_decay must be in (0, 1), got {ema!r}")


def dump_config(config: Config) -> str:
    """The config as YAML text (stable key order)."""
    return yaml.safe_dump(config, sort_keys=False)
