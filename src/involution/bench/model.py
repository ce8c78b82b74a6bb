"""``involution bench model``: RedNet against ResNet, training and inference latency and memory.

Each model runs on random images and labels: inference is a forward pass under
``torch.inference_mode``, training a full SGD step (forward, cross-entropy, backward, update).
Every configuration (model, variant, compiled or not, mode) is built and warmed up first (the
warm-up also compiles and runs the Triton autotuner), then all are timed side by side: each of
the ``--repeats`` rounds times ``--iters`` steps of every configuration in turn, so that a
slow-down of a shared machine hits them alike. Reported: the median time per step over the
rounds with its range, images per second at the median and, with ``--baseline``, each
configuration's time over the baseline's (same mode and compilation) in the same round, median
and range. The process's CPU time per step is reported too (median, and its ratio to the
baseline's): with one thread it measures a step's cost even on a busy machine. Peak memory is
the CUDA allocator's peak over a configuration's warm-up, less what was allocated before it was
built (not available on CPU). On CUDA the default is bf16 autocast and channels_last, and every
RedNet is run twice, with its Involution2d layers fused (kernel generation inside the Triton
aggregation) and unfused.

Models are timm names (``rednet50``, ``resnet26``) or ``torchvision.NAME``
(``torchvision.resnet50``). ``--fold-bn`` prepares every inference model the same way: RedNets
with :func:`involution.models.fold_batchnorm`, torchvision's and timm's bottleneck ResNets with
the same treatment (each BatchNorm folded into its conv, the ReLUs and the residual add run as
oneDNN post-ops of the convs, :class:`~involution.models.fold.ConvAct`), other models with
``torch.fx``'s conv-BN fusion.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from involution.bench.op import backend_names
from involution.bench.options import add_device_option
from involution.cli_utils import LazyChoices, csv_list, user_error

REDNETS = ("rednet26", "rednet50", "rednet101")
RESNETS = ("resnet26", "resnet50", "resnet101")
MODES = ("train", "infer")
FUSED_CHOICES = ("both", "on", "off", "auto")
COMPILE_CHOICES = ("off", "on", "both")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BenchSettings:
    """How every model is run.

    ``dtype`` is the autocast dtype (float32: no autocast); ``fused`` selects the Involution2d
    variants: ``"both"`` (fused and unfused), ``"on"``, ``"off"`` or ``"auto"`` (the module's
    default, unfused); ``backend`` is every Involution2d's aggregation backend and
    ``fuse_inference`` its ``fuse_inference`` switch (the fused CPU inference layer).
    ``compile`` runs each model eagerly (``"off"``), through ``torch.compile`` (``"on"``) or
    both; ``fold_bn`` folds the inference models' BatchNorms; ``baseline`` names the model the
    ratios are taken against; ``keep_kernels`` trains every Involution2d keeping its kernels
    for backward instead of regenerating them (:func:`~involution.ops.modules.
    set_kernel_regeneration`).
    """

    device: torch.device
    batch_size: int
    image_size: int
    warmup: int
    iters: int
    dtype: torch.dtype
    channels_last: bool
    fused: str = "auto"
    backend: str = "auto"
    num_classes: int = 1000
    repeats: int = 1
    compile: str = "off"
    fold_bn: bool = False
    fuse_inference: bool = True
    baseline: str | None = None
    profile: bool = False
    keep_kernels: bool = False


@dataclass(frozen=True)
class BenchResult:
    """One configuration's measurement; ``images_per_second`` is NaN and ``error`` set when the
    run failed. Times are milliseconds per step: the median over the rounds and its range;
    ``ratio*`` are the per-round ratios to the baseline (``None`` without one)."""

    model: str
    variant: str
    mode: str
    batch_size: int
    image_size: int
    images_per_second: float
    peak_memory_mib: float | None
    error: str | None = None
    compiled: bool = False
    ms_median: float | None = None
    ms_min: float | None = None
    ms_max: float | None = None
    ratio_median: float | None = None
    ratio_min: float | None = None
    ratio_max: float | None = None
    cpu_ms_median: float | None = None
    cpu_ratio_median: float | None = None
    profile_ms: dict[str, float] | None = None


@dataclass(frozen=True)
class Config:
    """One benchmarked configuration: a model, its Involution2d variant, compiled or not, mode."""

    model: str
    variant: str
    fused: bool | None
    compiled: bool
    mode: str


def variants(model_name: str, fused: str) -> list[tuple[str, bool | None]]:
    """(label, Involution2d.fused value) pairs to run for ``model_name``."""
    if fused not in FUSED_CHOICES:
        raise ValueError(f"fused must be one of {FUSED_CHOICES}, got {fused!r}")
    if not model_name.startswith("rednet"):
        return [("-", None)]
    return {
        "both": [("fused", True), ("unfused", False)],
        "on": [("fused", True)],
        "off": [("unfused", False)],
        "auto": [("auto", None)],
    }[fused]


def is_known_model(model_name: str) -> bool:
    """A timm model name or ``torchvision.NAME`` of a torchvision classification model."""
    from involution.models.loading import is_known_model as is_registered
    from involution.models.loading import task_models

    return is_registered(model_name) and model_name not in task_models()


def create_model(
    model_name: str,
    fused: bool | None,
    backend: str = "auto",
    num_classes: int = 1000,
    fuse_inference: bool = True,
) -> nn.Module:
    """A randomly initialised model (timm, or ``torchvision.NAME``; built by
    :func:`involution.models.loading.create_model`) with every Involution2d's ``fused``,
    ``backend`` and ``fuse_inference`` set."""
    from involution.models.loading import create_model as build
    from involution.ops import Involution2d

    if not is_known_model(model_name):
        raise ValueError(f"unknown model {model_name!r} (not a timm or torchvision model)")
    model = build(model_name, num_classes=num_classes)
    for module in model.modules():
        if isinstance(module, Involution2d):
            if fused is not None:  # None: the module's default
                module.fused = fused
            module.backend = backend
            module.fuse_inference = fuse_inference
    return model


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_iteration(
    step: Callable[[], None], iters: int, device: torch.device
) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds per step. CPU time only counts while this process runs:
    with one thread it is the step's cost whatever else the machine is doing."""
    _synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        step()
    _synchronize(device)
    return (time.perf_counter() - start) / iters, (time.process_time() - start_cpu) / iters


def _make_step(
    model: nn.Module, mode: str, settings: BenchSettings, compiled: bool = False
) -> Callable[[], None]:
    device = settings.device
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    size = settings.image_size
    images = torch.randn(settings.batch_size, 3, size, size, device=device)
    images = images.contiguous(memory_format=memory_format)

    def autocast() -> torch.autocast:
        return torch.autocast(
            device.type, dtype=settings.dtype, enabled=settings.dtype != torch.float32
        )

    if mode == "infer":
        from involution.models.fold_resnet import fold_model

        model = fold_model(model) if settings.fold_bn else model.eval()
        forward = torch.compile(model) if compiled else model

        def infer() -> None:
            with torch.inference_mode(), autocast():
                forward(images)

        return infer

    model.train()
    forward = torch.compile(model) if compiled else model
    labels = torch.randint(0, settings.num_classes, (settings.batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train() -> None:
        with autocast():
            loss = F.cross_entropy(forward(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train


def configurations(model_names: Sequence[str], modes: Sequence[str], settings: BenchSettings):
    """Every (model, variant, compiled, mode), model-major."""
    compiled = {"off": [False], "on": [True], "both": [False, True]}[settings.compile]
    return [
        Config(name, label, fused, flag, mode)
        for name in model_names
        for label, fused in variants(name, settings.fused)
        for flag in compiled
        for mode in modes
    ]


def _prepare(config: Config, settings: BenchSettings) -> tuple[Callable[[], None], float | None]:
    """The configuration's step, warmed up, and its peak CUDA memory in MiB (``None`` on CPU)."""
    if config.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {config.mode!r}")
    device = settings.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    model = create_model(
        config.model, config.fused, settings.backend, settings.num_classes, settings.fuse_inference
    )
    if settings.keep_kernels:
        from involution.ops.modules import set_kernel_regeneration

        set_kernel_regeneration(model, False)
    step = _make_step(model, config.mode, settings, config.compiled)
    for _ in range(settings.warmup):
        step()
    _synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if cuda else None
    return step, peak


#: Profile categories: (name, predicate on a profiler event's name), first match wins.
PROFILE_CATEGORIES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("convolution", lambda name: "conv" in name and "involution" not in name),
    ("involution layer (fused)", lambda name: name == "involution::layer_inference"),
    ("involution op", lambda name: "Involution2d" in name or name.startswith("involution::")),
    ("BatchNorm", lambda name: "batch_norm" in name),
    ("ReLU", lambda name: "relu" in name or "clamp_min" in name),
    ("add", lambda name: name in ("aten::add", "aten::add_")),
    ("max-pool", lambda name: "max_pool" in name),
    ("avg-pool", lambda name: "avg_pool" in name),
    ("copy", lambda name: name in ("aten::copy_", "aten::clone", "aten::contiguous")),
    ("linear", lambda name: name in ("aten::addmm", "aten::mm", "aten::linear")),
)


def profile_step(step: Callable[[], None], iters: int) -> dict[str, float]:
    """Self CPU milliseconds per step of each :data:`PROFILE_CATEGORIES` entry (and ``other``,
    ``total``) over ``iters`` steps under ``torch.profiler`` (CPU activity, shapes recorded)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for _ in range(iters):
            step()
    breakdown = dict.fromkeys([name for name, _ in PROFILE_CATEGORIES] + ["other"], 0.0)
    total = 0.0
    for event in prof.key_averages():
        self_ms = event.self_cpu_time_total / 1e3 / iters
        total += self_ms
        category = next((name for name, match in PROFILE_CATEGORIES if match(event.key)), "other")
        breakdown[category] += self_ms
    breakdown["total"] = total
    return breakdown


def format_profiles(results: Sequence[BenchResult]) -> str:
    """Per configuration with a profile: self CPU ms per step and share of each category."""
    rows = []
    for result in results:
        if not result.profile_ms:
            continue
        total = result.profile_ms["total"]
        parts = ", ".join(
            f"{name} {ms:.1f} ({100 * ms / total:.0f}%)"
            for name, ms in result.profile_ms.items()
            if name != "total" and ms >= 0.005 * total
        )
        compiled = ", compiled" if result.compiled else ""
        rows.append(
            f"{result.model} ({result.variant}{compiled}, {result.mode}): {total:.1f} ms; {parts}"
        )
    return "\n".join(["# profile: self CPU ms per step (share)", *rows]) if rows else ""


def _spread(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def run_benchmarks(
    model_names: Sequence[str], modes: Sequence[str], settings: BenchSettings
) -> list[BenchResult]:
    """Every configuration, timed side by side; an out-of-memory run is recorded, not raised."""
    configs = configurations(model_names, modes, settings)
    steps: dict[Config, Callable[[], None]] = {}
    peaks: dict[Config, float | None] = {}
    errors: dict[Config, str] = {}
    for config in configs:
        try:
            steps[config], peaks[config] = _prepare(config, settings)
        except torch.OutOfMemoryError:
            errors[config] = "out of memory"
        print(f"warmed up {config}", file=sys.stderr, flush=True)
    seconds: dict[Config, list[float]] = {config: [] for config in steps}
    cpu_seconds: dict[Config, list[float]] = {config: [] for config in steps}
    for _ in range(settings.repeats):
        for config, step in steps.items():
            wall, cpu = _seconds_per_iteration(step, settings.iters, settings.device)
            seconds[config].append(wall)
            cpu_seconds[config].append(cpu)
    profiles = (
        {config: profile_step(step, settings.iters) for config, step in steps.items()}
        if settings.profile
        else {}
    )
    baselines = {
        (c.mode, c.compiled): c for c in steps if settings.baseline and c.model == settings.baseline
    }
    results = []
    for config in configs:
        timing: dict[str, Any] = {}
        throughput = math.nan
        if config in steps:
            times = [t * 1e3 for t in seconds[config]]
            timing.update(zip(("ms_median", "ms_min", "ms_max"), _spread(times), strict=True))
            throughput = settings.batch_size * 1e3 / timing["ms_median"]
            timing["cpu_ms_median"] = statistics.median(cpu_seconds[config]) * 1e3
            baseline = baselines.get((config.mode, config.compiled))
            if baseline is not None:
                ratios = [a / b for a, b in zip(seconds[config], seconds[baseline], strict=True)]
                keys = ("ratio_median", "ratio_min", "ratio_max")
                timing.update(zip(keys, _spread(ratios), strict=True))
                timing["cpu_ratio_median"] = timing["cpu_ms_median"] / (
                    statistics.median(cpu_seconds[baseline]) * 1e3
                )
        results.append(
            BenchResult(
                config.model,
                config.variant,
                config.mode,
                settings.batch_size,
                settings.image_size,
                throughput,
                peaks.get(config),
                errors.get(config),
                compiled=config.compiled,
                profile_ms=profiles.get(config),
                **timing,
            )
        )
        print(format_result(results[-1]), file=sys.stderr, flush=True)
    return results


def format_result(result: BenchResult) -> str:
    """One table row: model, variant, compiled, mode, ms/step (range), images/s, ratio, MiB."""
    compiled = "yes" if result.compiled else "no"
    row = f"{result.model:<22} {result.variant:<8} {compiled:<8} {result.mode:<6}"
    if result.error is not None:
        return f"{row} {result.error:>24}"
    latency = f"{result.ms_median:.1f} ({result.ms_min:.1f}-{result.ms_max:.1f})"
    ratio = "-"
    if result.ratio_median is not None:
        ratio = f"{result.ratio_median:.3f} ({result.ratio_min:.3f}-{result.ratio_max:.3f})"
    memory = "-" if result.peak_memory_mib is None else f"{result.peak_memory_mib:.0f}"
    cpu_ratio = "-" if result.cpu_ratio_median is None else f"{result.cpu_ratio_median:.3f}"
    return (
        f"{row} {latency:>24} {result.images_per_second:10.1f} {ratio:>22} "
        f"{result.cpu_ms_median:10.1f} {cpu_ratio:>9} {memory:>10}"
    )


def format_table(results: Sequence[BenchResult], settings: BenchSettings) -> str:
    dtype = str(settings.dtype).removeprefix("torch.")
    layout = "channels_last" if settings.channels_last else "NCHW"
    folded = ", BatchNorm folded for inference" if settings.fold_bn else ""
    header = (
        f"# {settings.device}, {torch.get_num_threads()} threads, batch {settings.batch_size}, "
        f"{settings.image_size} px, autocast {dtype}, {layout}{folded}; medians (ranges) of "
        f"{settings.repeats} rounds of {settings.iters} steps; ratio to "
        f"{settings.baseline or '-'}\n"
        f"{'model':<22} {'variant':<8} {'compiled':<8} {'mode':<6} {'ms/step':>24} "
        f"{'images/s':>10} {'ratio':>22} {'CPU ms':>10} {'CPU ratio':>9} {'peak MiB':>10}"
    )
    return "\n".join([header, *(format_result(r) for r in results)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """RedNet vs ResNet training/inference throughput and peak memory"""
    add_device_option(parser)
    parser.add_argument(
        "--models",
        type=csv_list,
        default=[*REDNETS, *RESNETS],
        help="comma-separated timm names or torchvision.NAME (default: rednet26,50,101 and "
        "timm's resnet26,50,101)",
    )
    parser.add_argument(
        "--modes", type=csv_list, default=list(MODES), help="comma-separated (default: train,infer)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="images per step (default: 128 on CUDA, 8 on CPU)"
    )
    parser.add_argument(
        "--image-size", type=int, help="square input side (default: 224 on CUDA, 64 on CPU)"
    )
    parser.add_argument("--warmup", type=int, help="untimed steps (default: 10 CUDA, 1 CPU)")
    parser.add_argument("--iters", type=int, help="timed steps per round (default: 30 CUDA, 3 CPU)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds over all configurations (default 1)"
    )
    parser.add_argument("--threads", type=int, help="intra-op CPU threads (default: torch's)")
    parser.add_argument(
        "--compile",
        choices=COMPILE_CHOICES,
        default="off",
        help="torch.compile (inductor) every model: off, on or both (default off)",
    )
    parser.add_argument(
        "--fold-bn",
        action="store_true",
        help="fold every conv -> BatchNorm pair of the inference models (all of them)",
    )
    parser.add_argument(
        "--fuse-inference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="RedNet's fused CPU inference layer (Involution2d.fuse_inference; default on)",
    )
    parser.add_argument("--baseline", help="model the latency ratios are taken against")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile each configuration (torch.profiler) and print the self CPU "
        "time per step by category (convolution, involution, BatchNorm, ReLU, ...)",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        help="autocast dtype; float32 disables autocast (default: bfloat16 CUDA, float32 CPU)",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="channels_last inputs and weights (default: on for CUDA, off for CPU)",
    )
    parser.add_argument(
        "--fused",
        choices=FUSED_CHOICES,
        help="RedNet Involution2d variants (default: both on CUDA, auto on CPU)",
    )
    parser.add_argument(
        "--backend",
        choices=LazyChoices(backend_names),
        metavar="NAME",
        default="auto",
        help="RedNet involution backend: %(choices)s (auto)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Fill the device-dependent defaults and check the values."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")

    def pick(value: Any, on_cuda: Any, on_cpu: Any) -> Any:
        return value if value is not None else (on_cuda if cuda else on_cpu)

    settings = BenchSettings(
        device=torch.device(device),
        batch_size=pick(args.batch_size, 128, 8),
        image_size=pick(args.image_size, 224, 64),
        warmup=pick(args.warmup, 10, 1),
        iters=pick(args.iters, 30, 3),
        dtype=DTYPES[pick(args.dtype, "bfloat16", "float32")],
        channels_last=pick(args.channels_last, True, False),
        fused=pick(args.fused, "both", "auto"),
        backend=args.backend,
        repeats=args.repeats,
        compile=args.compile,
        fold_bn=args.fold_bn,
        fuse_inference=args.fuse_inference,
        baseline=args.baseline,
        profile=args.profile,
    )
    for name in ("batch_size", "image_size", "iters", "repeats"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if settings.warmup < 0:
        raise ValueError("--warmup must be non-negative")
    unknown = [mode for mode in args.modes if mode not in MODES]
    if unknown or not args.modes:
        raise ValueError(f"--modes must be a comma-separated subset of {MODES}, got {args.modes}")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be positive")
    if settings.baseline is not None and settings.baseline not in args.models:
        raise ValueError(f"--baseline {settings.baseline} is not one of --models {args.models}")
    return settings


def model_command(args: argparse.Namespace) -> int:
    """Run ``involution bench model``; prints the table to stdout, progress to stderr."""
    try:
        settings = settings_from_args(args)
        unknown = [name for name in args.models if not is_known_model(name)]
        if unknown or not args.models:
            raise ValueError(f"--models: unknown or missing timm/torchvision models {unknown}")
    except ValueError as error:
        return user_error(error)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Let cuDNN pick its fastest convolution algorithms, as any training script would.
    torch.backends.cudnn.benchmark = settings.device.type == "cuda"
    try:
        results = run_benchmarks(args.models, args.modes, settings)
    except ValueError as error:  # e.g. a batch of 1 reaching a 1x1 BatchNorm in training
        return user_error(error)
    print(format_table(results, settings))
    if settings.profile:
        print(format_profiles(results))
    if args.json is not None:
        # NaN (a failed run) is not valid JSON: write null.
        records = [
            {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(r).items()}
            for r in results
        ]
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    return 0 if all(result.error is None for result in results) else 1
