"""``involution bench model``: RedNet against ResNet, training and inference throughput and memory.

Each model runs on random images and labels: inference is a forward pass under
``torch.inference_mode``, training a full SGD step (forward, cross-entropy, backward, update).
Throughput is images per second over the timed iterations after a warm-up (which also runs the
Triton autotuner); peak memory is the CUDA allocator's peak over warm-up and timing (not
available on CPU). On CUDA the default is bf16 autocast and channels_last, and every RedNet is
run twice, with its Involution2d layers fused (kernel generation inside the Triton aggregation)
and unfused.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import involution.models  # noqa: F401  (registers the RedNets with timm)
from involution.ops import BACKENDS, Involution2d

REDNETS = ("rednet26", "rednet50", "rednet101")
RESNETS = ("resnet26", "resnet50", "resnet101")
MODES = ("train", "infer")
FUSED_CHOICES = ("both", "on", "off", "auto")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BenchSettings:
    """How every model is run.

    ``dtype`` is the autocast dtype (float32: no autocast); ``fused`` selects the Involution2d
    variants: ``"both"`` (fused and unfused), ``"on"``, ``"off"`` or ``"auto"`` (the module's
    default, unfused); ``backend`` is every Involution2d's
    aggregation backend.
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


@dataclass(frozen=True)
class BenchResult:
    """One measurement; ``images_per_second`` is NaN and ``error`` set when the run failed."""

    model: str
    variant: str
    mode: str
    batch_size: int
    image_size: int
    images_per_second: float
    peak_memory_mib: float | None
    error: str | None = None


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


def create_model(
    model_name: str, fused: bool | None, backend: str = "auto", num_classes: int = 1000
) -> nn.Module:
    """A randomly initialised timm model with every Involution2d's ``fused`` and ``backend`` set."""
    if not timm.is_model(model_name):
        raise ValueError(f"unknown model {model_name!r} (not registered with timm)")
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    for module in model.modules():
        if isinstance(module, Involution2d):
            if fused is not None:  # None: the module's default
                module.fused = fused
            module.backend = backend
    return model


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_iteration(
    step: Callable[[], None], warmup: int, iters: int, device: torch.device
) -> float:
    for _ in range(warmup):
        step()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _synchronize(device)
    return (time.perf_counter() - start) / iters


def _make_step(model: nn.Module, mode: str, settings: BenchSettings) -> Callable[[], None]:
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
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast():
                model(images)

        return infer

    model.train()
    labels = torch.randint(0, settings.num_classes, (settings.batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train() -> None:
        with autocast():
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train


def benchmark_model(
    model_name: str, fused: bool | None, mode: str, settings: BenchSettings
) -> tuple[float, float | None]:
    """(images per second, peak CUDA memory in MiB or ``None`` on CPU) of one configuration."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = settings.device
    model = create_model(model_name, fused, settings.backend, settings.num_classes)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = _make_step(model, mode, settings)
    seconds = _seconds_per_iteration(step, settings.warmup, settings.iters, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return settings.batch_size / seconds, peak


def run_benchmarks(
    model_names: Sequence[str], modes: Sequence[str], settings: BenchSettings
) -> list[BenchResult]:
    """Every (model, variant, mode); an out-of-memory run is recorded, not raised."""
    results = []
    for name in model_names:
        for label, fused in variants(name, settings.fused):
            for mode in modes:
                throughput, peak, error = math.nan, None, None
                try:
                    throughput, peak = benchmark_model(name, fused, mode, settings)
                except torch.OutOfMemoryError:
                    error = "out of memory"
                results.append(
                    BenchResult(
                        name,
                        label,
                        mode,
                        settings.batch_size,
                        settings.image_size,
                        throughput,
                        peak,
                        error,
                    )
                )
                print(format_result(results[-1]), file=sys.stderr, flush=True)
    return results


def format_result(result: BenchResult) -> str:
    """One table row: model, variant, mode, images/s, peak MiB."""
    speed = result.error or f"{result.images_per_second:10.1f}"
    memory = "-" if result.peak_memory_mib is None else f"{result.peak_memory_mib:10.0f}"
    return f"{result.model:<10} {result.variant:<8} {result.mode:<6} {speed:>14} {memory:>10}"


def format_table(results: Sequence[BenchResult], settings: BenchSettings) -> str:
    dtype = str(settings.dtype).removeprefix("torch.")
    layout = "channels_last" if settings.channels_last else "NCHW"
    header = (
        f"# {settings.device}, batch {settings.batch_size}, {settings.image_size} px, "
        f"autocast {dtype}, {layout}, {settings.iters} timed iterations\n"
        f"{'model':<10} {'variant':<8} {'mode':<6} {'images/s':>14} {'peak MiB':>10}"
    )
    return "\n".join([header, *(format_result(r) for r in results)])


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_model_parser(bench_subparsers: Any) -> argparse.ArgumentParser:
    """Register ``model`` under the ``involution bench`` sub-parsers."""
    parser = bench_subparsers.add_parser(
        "model",
        help="RedNet vs ResNet training/inference throughput and peak memory",
        description=__doc__.split("\n\n", 1)[1],
    )
    add_arguments(parser)
    parser.set_defaults(func=model_command)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``involution bench model``."""
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu"
    )
    parser.add_argument(
        "--models",
        type=_csv,
        default=[*REDNETS, *RESNETS],
        help="comma-separated timm names (default: rednet26,50,101 and resnet26,50,101)",
    )
    parser.add_argument(
        "--modes", type=_csv, default=list(MODES), help="comma-separated (default: train,infer)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="images per step (default: 128 on CUDA, 8 on CPU)"
    )
    parser.add_argument(
        "--image-size", type=int, help="square input side (default: 224 on CUDA, 64 on CPU)"
    )
    parser.add_argument("--warmup", type=int, help="untimed steps (default: 10 CUDA, 1 CPU)")
    parser.add_argument("--iters", type=int, help="timed steps (default: 30 CUDA, 3 CPU)")
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
        "--backend", choices=BACKENDS, default="auto", help="RedNet involution backend (auto)"
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
    )
    for name in ("batch_size", "image_size", "iters"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if settings.warmup < 0:
        raise ValueError("--warmup must be non-negative")
    unknown = [mode for mode in args.modes if mode not in MODES]
    if unknown or not args.modes:
        raise ValueError(f"--modes must be a comma-separated subset of {MODES}, got {args.modes}")
    return settings


def model_command(args: argparse.Namespace) -> int:
    """Run ``involution bench model``; prints the table to stdout, progress to stderr."""
    try:
        settings = settings_from_args(args)
        unknown = [name for name in args.models if not timm.is_model(name)]
        if unknown or not args.models:
            raise ValueError(f"--models: unknown or missing timm model names {unknown}")
    except ValueError as error:
        print(f"involution: error: {error}", file=sys.stderr)
        return 2
    # Let cuDNN pick its fastest convolution algorithms, as any training script would.
    torch.backends.cudnn.benchmark = settings.device.type == "cuda"
    try:
        results = run_benchmarks(args.models, args.modes, settings)
    except ValueError as error:  # e.g. a batch of 1 reaching a 1x1 BatchNorm in training
        print(f"involution: error: {error}", file=sys.stderr)
        return 2
    print(format_table(results, settings))
    if args.json is not None:
        # NaN (a failed run) is not valid JSON: write null.
        records = [
            {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(r).items()}
            for r in results
        ]
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    return 0 if all(result.error is None for result in results) else 1
