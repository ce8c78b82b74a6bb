"""``involution bench detect``: RedNet-50-FPN detectors against torchvision's ResNet-50-FPN ones.

Every model comes from :data:`involution.models.detection.DETECTION_MODELS` with random
weights and 81 classes; a RedNet detector and its ResNet-50 baseline share the detector class,
heads, returned levels and frozen stages, so only the backbone body differs. The transform's
``min_size``/``max_size`` are set to the image's sides so every network sees exactly H x W
(padded to a multiple of 32).

Modes, one image per call, ``eval()`` and ``torch.inference_mode``:

- ``infer``: the whole torchvision detector: transform, backbone, neck, dense heads, anchors,
  RPN proposals and NMS, the box head on 1000 proposals, post-processing. The score threshold
  is 1, so no detection is kept: with random weights the number of boxes above the usual 0.05
  (and so the class-wise NMS and Mask R-CNN's mask head) would differ from model to model by
  chance;
- ``network``: what mmdet's ``forward_dummy`` (the official FLOP count) runs: backbone, neck,
  dense heads, the box head on 1000 RoIs and the mask head on 100
  (:class:`~involution.models.detection.complexity.DetectorComplexityView`).

Latency is the median (and minimum) wall-clock time of ``--repeats`` calls after ``--warmup``
calls; on CPU also the median CPU time of the process (all threads summed), which other jobs on
a shared machine inflate far less than the wall-clock time. The models of one (mode, size) are
timed round-robin, one call each per round, so a machine whose load drifts slows them alike.

``train`` (CUDA only): a full SGD step (forward with losses, backward, update) on a batch of
random images with three random boxes each (and masks for Mask R-CNN), one model at a time;
images per second from the median step time, and the CUDA allocator's peak over the steps.
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
from typing import Any

import torch
from torch import Tensor, nn

from involution.bench.op import environment_info, times_ms
from involution.bench.options import (
    add_device_option,
    add_threads_and_json_options,
    chosen_device,
)
from involution.cli_utils import csv_list, user_error

DETECTORS = ("retinanet", "fasterrcnn", "maskrcnn")
#: RedNet-50 variants benchmarked against each detector's ResNet-50 baseline.
VARIANTS = ("", "_inv_neck", "_inv_neck_head")
INFERENCE_MODES = ("infer", "network")
MODES = (*INFERENCE_MODES, "train")
NUM_CLASSES = 81
DEFAULT_SIZES = ((512, 512), (800, 1333))
#: The detectors' transform pads images to a multiple of this.
SIZE_DIVISIBLE = 32


@dataclass(frozen=True)
class DetectResult:
    """One measurement; times are NaN and ``error`` set when the run failed (e.g. OOM)."""

    model: str
    mode: str
    height: int
    width: int
    batch_size: int
    median_ms: float
    min_ms: float
    images_per_second: float
    peak_memory_mib: float | None
    cpu_ms: float | None = None
    error: str | None = None


def default_models(detectors: Sequence[str]) -> list[str]:
    """For each detector: the ResNet-50 baseline, then the RedNet-50 variants of the table."""
    from involution.models.detection import DETECTION_MODELS

    names = []
    for detector in detectors:
        names.append(f"{detector}_resnet50_fpn")
        names += [
            f"{detector}_rednet50_fpn{suffix}"
            for suffix in VARIANTS
            if f"{detector}_rednet50_fpn{suffix}" in DETECTION_MODELS
        ]
    return names


def baseline_of(name: str) -> str:
    """The ResNet-50 baseline of a registry name (``fasterrcnn_rednet50_fpn_inv_neck`` ->
    ``fasterrcnn_resnet50_fpn``)."""
    return name.split("_", 1)[0] + "_resnet50_fpn"


def build_detector(
    name: str, height: int, width: int, device: torch.device, **kwargs: Any
) -> nn.Module:
    """A random-weight detector (seed 0) whose transform keeps H x W images at their size and
    whose post-processing keeps no detection (score threshold 1), so that no model's latency
    depends on how many boxes its random weights happen to score high. ``kwargs`` go to the
    builder (e.g. ``backbone_kwargs``)."""
    from involution.models.loading import create_model

    torch.manual_seed(0)
    threshold = "score_thresh" if name.startswith("retinanet") else "box_score_thresh"
    model = create_model(
        name,
        num_classes=NUM_CLASSES,
        min_size=min(height, width),
        max_size=max(height, width),
        **{threshold: 1.0},
        **kwargs,
    )
    return model.to(device)


def random_targets(
    batch_size: int,
    height: int,
    width: int,
    masks: bool,
    device: torch.device,
    num_classes: int = NUM_CLASSES,
) -> list[dict[str, Tensor]]:
    """Three random boxes (at least 16 px a side) per image, labels 1..num_classes-1, and
    filled-box masks if ``masks``."""
    targets = []
    scale = torch.tensor([width - 16, height - 16])
    for _ in range(batch_size):
        corners = torch.rand(3, 2, 2) * scale
        boxes = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values + 16], dim=1)
        target = {"boxes": boxes, "labels": torch.randint(1, num_classes, (3,))}
        if masks:
            target["masks"] = torch.zeros(3, height, width, dtype=torch.uint8)
            for index, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                target["masks"][index, y0:y1, x0:x1] = 1
        targets.append({key: value.to(device) for key, value in target.items()})
    return targets


def inference_call(
    model: nn.Module, mode: str, height: int, width: int, device: torch.device
) -> Callable[[], None]:
    """One ``infer`` or ``network`` call of ``model`` on a random H x W image."""
    from involution.models.detection.complexity import DetectorComplexityView

    model.eval()
    if mode == "network":
        padded = [math.ceil(side / SIZE_DIVISIBLE) * SIZE_DIVISIBLE for side in (height, width)]
        network = DetectorComplexityView(model).eval()
        batch = torch.rand(1, 3, *padded, device=device)

        def run_network() -> None:
            with torch.inference_mode():
                network(batch)

        return run_network
    images = [torch.rand(3, height, width, device=device)]

    def infer() -> None:
        with torch.inference_mode():
            model(images)

    return infer


def training_step(
    model: nn.Module,
    height: int,
    width: int,
    batch_size: int,
    device: torch.device,
    num_classes: int = NUM_CLASSES,
) -> Callable[[], None]:
    """One SGD step of ``model`` (``num_classes`` with the background) on a random batch with
    random targets."""
    model.train()
    images = [torch.rand(3, height, width, device=device) for _ in range(batch_size)]
    masks = getattr(model, "roi_heads", None) is not None and model.roi_heads.has_mask()
    targets = random_targets(batch_size, height, width, masks, device, num_classes)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train() -> None:
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train


def _result(
    name: str,
    mode: str,
    size: tuple[int, int],
    batch: int,
    times: list[float],
    peak: float | None = None,
    cpu_times: list[float] | None = None,
) -> DetectResult:
    median = statistics.median(times)
    cpu = statistics.median(cpu_times) if cpu_times else None
    return DetectResult(
        name, mode, *size, batch, median, min(times), 1e3 * batch / median, peak, cpu
    )


def _failed(name: str, mode: str, size: tuple[int, int], batch: int, error: str) -> DetectResult:
    return DetectResult(name, mode, *size, batch, math.nan, math.nan, math.nan, None, None, error)


def wall_and_cpu_ms(call: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU milliseconds of one call (CUDA work synchronised)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1e3 * (time.perf_counter() - wall), 1e3 * (time.process_time() - cpu)


def bench_inference(
    names: Sequence[str],
    modes: Sequence[str],
    size: tuple[int, int],
    device: torch.device,
    warmup: int,
    repeats: int,
) -> list[DetectResult]:
    """Time ``names`` side by side (round-robin) in each of ``modes`` ("infer", "network"); each
    model is built once for all modes."""
    models = {name: build_detector(name, *size, device) for name in names}
    results = []
    for mode in modes:
        calls = {name: inference_call(model, mode, *size, device) for name, model in models.items()}
        for call in calls.values():
            for _ in range(warmup):
                call()
        wall: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(repeats):
            for name, call in calls.items():
                wall_ms, cpu_ms = wall_and_cpu_ms(call, device)
                wall[name].append(wall_ms)
                cpu[name].append(cpu_ms)
        on_cpu = device.type == "cpu"
        results += [
            _result(name, mode, size, 1, wall[name], cpu_times=cpu[name] if on_cpu else None)
            for name in names
        ]
        for r in results[-len(names) :]:
            print(f"{r.model} {mode} {size[0]}x{size[1]}: {r.median_ms:.1f} ms", file=sys.stderr)
    return results


def bench_training(
    name: str,
    size: tuple[int, int],
    batch_size: int,
    device: torch.device,
    warmup: int,
    repeats: int,
) -> DetectResult:
    """Time training steps of one model on CUDA; an out-of-memory run is recorded, not raised."""
    try:
        model = build_detector(name, *size, device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        times = times_ms(training_step(model, *size, batch_size, device), device, warmup, repeats)
    except torch.OutOfMemoryError:
        return _failed(name, "train", size, batch_size, "out of memory")
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    return _result(name, "train", size, batch_size, times, peak=peak)


def format_table(results: Sequence[DetectResult]) -> str:
    """Markdown tables: inference latency per mode, training speed and memory; each with the
    ratio to the model's ResNet-50 baseline in the same (mode, size)."""
    by_key = {(r.model, r.mode, r.height, r.width): r for r in results}
    lines = []
    for mode in MODES:
        rows = [r for r in results if r.mode == mode]
        if not rows:
            continue
        if mode == "train":
            lines += [
                "| model | H x W | batch | images/s | peak MiB | time, memory vs ResNet-50 |",
                "|---|---|---:|---:|---:|---:|",
            ]
        else:
            lines += [
                f"| model | H x W | {mode} median ms | min ms | CPU ms "
                "| vs ResNet-50 (wall, CPU) |",
                "|---|---|---:|---:|---:|---:|",
            ]
        for r in rows:
            size = f"{r.height} x {r.width}"
            if r.error:
                lines.append(f"| {r.model} | {size} | {r.error} |")
                continue
            base = by_key.get((baseline_of(r.model), mode, r.height, r.width))
            ratio = f"{r.median_ms / base.median_ms:.2f}x" if base and not base.error else "-"
            if mode != "train":
                cpu = "-" if r.cpu_ms is None else f"{r.cpu_ms:.0f}"
                if r.cpu_ms is not None and base and base.cpu_ms:
                    ratio += f", {r.cpu_ms / base.cpu_ms:.2f}x"
                lines.append(
                    f"| {r.model} | {size} | {r.median_ms:.0f} | {r.min_ms:.0f} | {cpu} | {ratio} |"
                )
                continue
            if base and base.peak_memory_mib and r.peak_memory_mib:
                ratio += f", {r.peak_memory_mib / base.peak_memory_mib:.2f}x"
            lines.append(
                f"| {r.model} | {size} | {r.batch_size} | {r.images_per_second:.2f} "
                f"| {r.peak_memory_mib:.0f} | {ratio} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected HxW, got {text!r}") from error
    if height < SIZE_DIVISIBLE or width < SIZE_DIVISIBLE:
        raise argparse.ArgumentTypeError(f"sides must be at least {SIZE_DIVISIBLE}, got {text!r}")
    return height, width


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """RedNet-50-FPN vs ResNet-50-FPN detectors: latency, training speed and memory"""
    add_device_option(parser)
    parser.add_argument(
        "--models",
        type=csv_list,
        help="comma-separated DETECTION_MODELS names (default: for each of --detectors, the "
        "ResNet-50 baseline and the RedNet-50 conv / involution-neck / neck+head variants)",
    )
    parser.add_argument(
        "--detectors", type=csv_list, default=list(DETECTORS), help="retinanet,fasterrcnn,maskrcnn"
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: [_size(item) for item in csv_list(text)],
        default=list(DEFAULT_SIZES),
        help="comma-separated HxW image sizes (default: 512x512,800x1333)",
    )
    parser.add_argument(
        "--modes",
        type=csv_list,
        help="infer, network, train (default: infer,network on CPU; all three on CUDA)",
    )
    parser.add_argument(
        "--train-batch-size", type=int, default=2, help="images per training step (2)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per model (1)")
    parser.add_argument("--repeats", type=int, help="timed calls (default: 3 CPU, 20 CUDA)")
    add_threads_and_json_options(parser)


def detect_command(args: argparse.Namespace) -> int:
    """Run ``involution bench detect``; prints the tables to stdout, progress to stderr."""
    from involution.models.detection import DETECTION_MODELS

    device = chosen_device(args.device)
    cuda = device.type == "cuda"
    models = args.models or default_models(args.detectors)
    modes = args.modes or (list(MODES) if cuda else list(INFERENCE_MODES))
    repeats = args.repeats or (20 if cuda else 3)
    problems = [f"unknown model {name!r}" for name in models if name not in DETECTION_MODELS]
    problems += [f"unknown mode {mode!r}" for mode in modes if mode not in MODES]
    problems += [f"unknown detector {d!r}" for d in args.detectors if d not in DETECTORS]
    if cuda and not torch.cuda.is_available():
        problems.append("--device cuda requested but CUDA is not available")
    if "train" in modes and not cuda:
        problems.append("training is benchmarked on CUDA only")
    if repeats < 1 or args.warmup < 0 or args.train_batch_size < 1:
        problems.append("--repeats and --train-batch-size must be positive, --warmup >= 0")
    if problems:
        return user_error("; ".join(problems))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = cuda

    inference_modes = [mode for mode in INFERENCE_MODES if mode in modes]
    results: list[DetectResult] = []
    for size in args.sizes:
        if inference_modes:
            results += bench_inference(models, inference_modes, size, device, args.warmup, repeats)
        if "train" in modes:
            for name in models:
                result = bench_training(
                    name, size, args.train_batch_size, device, args.warmup, repeats
                )
                results.append(result)
                outcome = result.error or f"{result.images_per_second:.2f} images/s"
                print(f"{name} train {size[0]}x{size[1]}: {outcome}", file=sys.stderr)
    environment = environment_info(device, torch.float32)
    print(f"# {json.dumps(environment)}, warm-up {args.warmup}, {repeats} timed calls")
    print(format_table(results))
    if args.json is not None:
        records = [
            {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(r).items()}
            for r in results
        ]
        payload = {"environment": environment, "results": records}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if all(r.error is None for r in results) else 1
