"""``involution bench memory``: what a training step keeps for backward, RedNet against ResNet.

For each model, training mode, random inputs, one SGD step at a time:

- ``saved MiB``: the bytes autograd keeps for backward during one training forward, measured
  with ``torch.autograd.graph.saved_tensors_hooks``, each storage counted once, the model's
  parameters and buffers left out (they do not grow with the batch);
- ``peak RSS MiB``: the process's resident memory at its highest during a step (sampled every
  millisecond), less before it;
- ``CUDA peak MiB``: ``torch.cuda.max_memory_allocated`` over a step, less before it;
- ``step ms``: the median wall-clock time of ``--steps`` full steps (forward, loss, backward,
  update) after one untimed step, and ``CPU ms`` the process's CPU time per step (all threads:
  other jobs on a shared machine inflate it far less than the wall-clock time). The models of
  one setting (a baseline and its RedNets, built side by side) take their timed steps in turn,
  round after round (in an order shuffled each round), so that a machine whose speed drifts
  during the run (a shared host) slows them alike; ``time ratio`` is a row's median step time
  over its baseline's.

Each RedNet runs as its ``--regenerate`` variants (:data:`VARIANTS`): its Involution2d layers
regenerating the kernels in backward with the following BatchNorm + ReLU in the same op
(``regen``, the default), regenerating them with the BatchNorm and ReLU as modules
(``unfused``, ``fuse_norm_act = False``), and keeping the kernels (``kept``,
``regenerate_kernels = False``). ``ratio`` is a row's saved bytes over its ResNet baseline's
(rednet26 -> resnet26, rednetN -> torchvision.resnetN; a RedNet detector -> the detector's
ResNet-50-FPN). Classifiers run at every ``--batch-sizes`` x ``--dtypes`` (float32, or
bfloat16 autocast) x ``--layouts``; detectors (``--detectors``, the RedNet-50-FPN with the
involution neck against torchvision's ResNet-50-FPN) at ``--det-size`` with ``--det-batch``
images, float32 NCHW, once per ``--det-norms``: the ``norm`` column says which BatchNorms the
backbone bodies have (``frozen``: torchvision's FrozenBatchNorm2d, the baseline's, like for
like; ``norm_eval``: the official RedNet setting, eval-mode BatchNorms whose affine weights
learn, against the same FrozenBatchNorm2d baseline). Classifiers' BatchNorms use the batch's
statistics (``batch``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from involution.bench.detect import build_detector, random_targets
from involution.bench.model import DTYPES, create_model
from involution.bench.op import environment_info
from involution.bench.options import (
    add_device_option,
    add_threads_and_json_options,
    chosen_device,
)
from involution.cli_utils import csv_list, user_error

CLASSIFIERS = ("rednet26", "rednet50", "rednet101")
DETECTORS = ("retinanet", "fasterrcnn")
LAYOUTS = ("nchw", "channels_last")
#: RedNet variant -> (``regenerate_kernels``, ``fuse_norm_act``) of its Involution2d layers.
VARIANTS: dict[str, tuple[bool, bool]] = {
    "regen": (True, True),
    "unfused": (True, False),
    "kept": (False, False),
}
#: ``--regenerate`` -> the RedNet variants run.
REGENERATE_CHOICES: dict[str, tuple[str, ...]] = {
    "both": ("regen", "kept"),
    "all": ("regen", "unfused", "kept"),
    "on": ("regen",),
    "off": ("kept",),
}
#: The detectors' backbone norms (see the module docstring); the ResNet baseline's is frozen.
DET_NORMS = ("frozen", "norm_eval")


def baseline_of(name: str) -> str:
    """The ResNet a RedNet (classifier or detector registry name) is compared with."""
    if "_" in name:  # a detector: fasterrcnn_rednet50_fpn_inv_neck -> fasterrcnn_resnet50_fpn
        return name.split("_", 1)[0] + "_resnet50_fpn"
    depth = name.removeprefix("rednet")
    return "resnet26" if depth == "26" else f"torchvision.resnet{depth}"


@dataclass(frozen=True)
class Case:
    """One measured configuration; ``variant`` (a key of :data:`VARIANTS`) is ``None`` for a
    ResNet; ``norm`` is ``"batch"`` for a classifier, one of :data:`DET_NORMS` for a detector.
    """

    model: str
    batch_size: int
    dtype: str
    layout: str
    variant: str | None
    norm: str = "batch"


@dataclass(frozen=True)
class MemoryResult:
    """One configuration's figures (MiB and milliseconds); ``ratio`` is the saved bytes and
    ``time_ratio`` the median step time over the baseline's in the same setting (``None`` for a
    baseline or where it was not run); ``norm`` as :class:`Case`'s."""

    model: str
    variant: str
    batch_size: int
    dtype: str
    layout: str
    saved_mib: float
    peak_rss_mib: float | None
    cuda_peak_mib: float | None
    step_ms: float
    step_cpu_ms: float
    ratio: float | None = None
    norm: str = "batch"
    time_ratio: float | None = None


def saved_storages(
    run: Callable[[], Any], exclude: Sequence[Tensor] = ()
) -> tuple[dict[int, int], Any]:
    """({data pointer: bytes} of every storage autograd keeps while ``run()`` runs, each once,
    ``exclude``'s storages left out; what ``run`` returned)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded and tensor.device.type != "meta":
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return storages, result


def saved_bytes(run: Callable[[], Any], exclude: Sequence[Tensor] = ()) -> tuple[int, Any]:
    """(bytes autograd keeps while ``run()`` runs, each storage once, ``exclude``'s storages
    left out; what ``run`` returned)."""
    storages, result = saved_storages(run, exclude)
    return sum(storages.values()), result


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def peak_rss_delta(run: Callable[[], None]) -> float | None:
    """The process's peak resident memory during ``run()`` less before it, in MiB, sampled by a
    thread every millisecond; ``None`` without ``/proc`` (not Linux)."""
    try:
        before = _rss_bytes()
    except OSError:
        return None
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return (max(peak[0], _rss_bytes()) - before) / 2**20


def _build(case: Case, device: torch.device, det_size: tuple[int, int]) -> nn.Module:
    # Imported here: the command line imports this module for its --help, and the ops are slow
    # to import.
    from involution.ops.modules import set_kernel_regeneration

    torch.manual_seed(0)
    if "_" in case.model:
        rednet = case.variant is not None
        kwargs = (
            {"backbone_kwargs": {"frozen_bn": True}} if rednet and case.norm == "frozen" else {}
        )
        model = build_detector(case.model, *det_size, device, **kwargs)
    else:
        model = create_model(case.model, None).to(device)
    if case.variant is not None:
        set_kernel_regeneration(model, *VARIANTS[case.variant])
    if case.layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def _forward_loss(
    model: nn.Module, case: Case, device: torch.device, det_size: tuple[int, int]
) -> Callable[[], Tensor]:
    """The training forward of ``case`` on a fixed random batch, returning the loss."""
    dtype = DTYPES[case.dtype]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if "_" in case.model:
        images = [torch.rand(3, *det_size, device=device) for _ in range(case.batch_size)]
        targets = random_targets(case.batch_size, *det_size, False, device)

        def detector_loss() -> Tensor:
            with autocast:
                return sum(model(images, targets).values())

        return detector_loss
    memory_format = torch.channels_last if case.layout == "channels_last" else None
    images = torch.randn(case.batch_size, 3, 224, 224, device=device)
    if memory_format is not None:
        images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (case.batch_size,), device=device)

    def classifier_loss() -> Tensor:
        with autocast:
            return F.cross_entropy(model(images), labels)

    return classifier_loss


@dataclass
class Prepared:
    """A case's model built and its memory measured: its result without the times yet, and
    ``step`` (one full training step) for the timed rounds."""

    result: MemoryResult
    step: Callable[[], None]


def prepare(case: Case, device: torch.device, det_size: tuple[int, int]) -> Prepared:
    """Build ``case``'s model, take its untimed step and measure its memory (see the module
    docstring)."""
    model = _build(case, device, det_size)
    forward = _forward_loss(model, case, device, det_size)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward().backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up: allocations, lazy initialisation, gradients created
    weights = [*model.parameters(), *model.buffers()]
    saved, loss = saved_bytes(forward, weights)
    loss.backward()
    del loss
    optimizer.zero_grad(set_to_none=True)
    cuda_peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        cuda_peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    rss = peak_rss_delta(step) if device.type == "cpu" else None
    result = MemoryResult(
        model=case.model,
        variant=case.variant or "-",
        batch_size=case.batch_size,
        dtype=case.dtype,
        layout=case.layout,
        saved_mib=saved / 2**20,
        peak_rss_mib=rss,
        cuda_peak_mib=cuda_peak,
        step_ms=0.0,
        step_cpu_ms=0.0,
        norm=case.norm,
    )
    return Prepared(result, step)


def timed_in_turn(prepared: Sequence[Prepared], steps: int) -> list[MemoryResult]:
    """The results of ``prepared`` with their step times: ``steps`` rounds, each model taking
    one step per round, in an order shuffled each round (seeded): a step can run slower or
    faster after another model's than after its own (the allocator's and caches' state), and
    a fixed order would give each model the same predecessor every round. Each model's median
    wall-clock and CPU time."""
    times: list[list[float]] = [[] for _ in prepared]
    cpu_times: list[list[float]] = [[] for _ in prepared]
    order = list(range(len(prepared)))
    shuffler = random.Random(0)
    for _ in range(steps):
        shuffler.shuffle(order)
        for k in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            prepared[k].step()
            times[k].append((time.perf_counter() - start) * 1e3)
            cpu_times[k].append((time.process_time() - start_cpu) * 1e3)
    return [
        replace(
            item.result,
            step_ms=statistics.median(wall),
            step_cpu_ms=statistics.median(cpu),
        )
        for item, wall, cpu in zip(prepared, times, cpu_times, strict=True)
    ]


def cases(args: argparse.Namespace) -> list[Case]:
    """Every configuration the arguments ask for, each RedNet's baseline first."""
    variants = REGENERATE_CHOICES[args.regenerate]
    result = []
    for batch in args.batch_sizes:
        for dtype in args.dtypes:
            for layout in args.layouts:
                for name in args.models:
                    result.append(Case(baseline_of(name), batch, dtype, layout, None))
                    result += [Case(name, batch, dtype, layout, v) for v in variants]
    for detector in args.detectors:
        name = f"{detector}_rednet50_fpn_inv_neck"
        setting = (args.det_batch, "float32", "nchw")
        result.append(Case(baseline_of(name), *setting, None, "frozen"))
        result += [Case(name, *setting, v, norm) for norm in args.det_norms for v in variants]
    return result


def settings(all_cases: Sequence[Case]) -> list[list[Case]]:
    """``all_cases`` (as :func:`cases` orders them) split into settings: each baseline with the
    RedNet cases after it, timed in turn."""
    groups: list[list[Case]] = []
    for case in all_cases:
        if case.variant is None or not groups:
            groups.append([])
        groups[-1].append(case)
    return groups


def with_ratios(results: Sequence[MemoryResult]) -> list[MemoryResult]:
    """Each RedNet's saved bytes and step time over its baseline's in the same setting."""
    baselines = {(r.model, r.batch_size, r.dtype, r.layout): r for r in results if r.variant == "-"}
    out = []
    for r in results:
        base = baselines.get((baseline_of(r.model), r.batch_size, r.dtype, r.layout))
        if r.variant == "-" or base is None:
            out.append(replace(r, ratio=None, time_ratio=None))
            continue
        ratio = r.saved_mib / base.saved_mib if base.saved_mib else None
        time_ratio = r.step_ms / base.step_ms if base.step_ms else None
        out.append(replace(r, ratio=ratio, time_ratio=time_ratio))
    return out


def format_table(results: Sequence[MemoryResult]) -> str:
    """A markdown table of the results."""

    def number(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "| model | variant | norm | batch | dtype | layout | saved MiB | ratio | peak RSS MiB "
        "| CUDA peak MiB | step ms | CPU ms | time ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.model} | {r.variant} | {r.norm} | {r.batch_size} | {r.dtype} | {r.layout} "
            f"| {r.saved_mib:.0f} | {number(r.ratio, 3)} | {number(r.peak_rss_mib)} "
            f"| {number(r.cuda_peak_mib)} | {r.step_ms:.0f} | {r.step_cpu_ms:.0f} "
            f"| {number(r.time_ratio, 3)} |"
        )
    return "\n".join(lines)


def _size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    return int(height), int(width)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """RedNet vs ResNet training memory: saved activations, peak memory, step time"""
    add_device_option(parser)
    parser.add_argument(
        "--models", type=csv_list, default=list(CLASSIFIERS), help="RedNets (rednet26,...)"
    )
    parser.add_argument(
        "--batch-sizes",
        type=lambda t: [int(b) for b in csv_list(t)],
        default=[8, 32],
        help="classifier batch sizes (8,32)",
    )
    parser.add_argument(
        "--dtypes", type=csv_list, default=["float32", "bfloat16"], help="float32,bfloat16"
    )
    parser.add_argument(
        "--layouts", type=csv_list, default=list(LAYOUTS), help="nchw,channels_last"
    )
    parser.add_argument(
        "--regenerate",
        choices=tuple(REGENERATE_CHOICES),
        default="both",
        help="RedNet variants: both (regen, kept), all (regen, unfused, kept), on, off",
    )
    parser.add_argument("--detectors", type=csv_list, default=list(DETECTORS), help="'' for none")
    parser.add_argument(
        "--det-norms", type=csv_list, default=list(DET_NORMS), help="frozen,norm_eval"
    )
    parser.add_argument("--det-size", type=_size, default=(800, 1333), help="HxW (800x1333)")
    parser.add_argument("--det-batch", type=int, default=2, help="detector images per step (2)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model (2)")
    add_threads_and_json_options(parser)


def memory_command(args: argparse.Namespace) -> int:
    """Run ``involution bench memory``: the table to stdout, progress to stderr."""
    device = chosen_device(args.device)
    args.detectors = [d for d in args.detectors if d]
    problems = [f"unknown model {m!r}" for m in args.models if m not in CLASSIFIERS]
    problems += [f"unknown detector {d!r}" for d in args.detectors if d not in DETECTORS]
    problems += [f"unknown dtype {d!r}" for d in args.dtypes if d not in ("float32", "bfloat16")]
    problems += [f"unknown layout {layout!r}" for layout in args.layouts if layout not in LAYOUTS]
    problems += [f"unknown detector norm {n!r}" for n in args.det_norms if n not in DET_NORMS]
    if device.type == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda requested but CUDA is not available")
    if args.steps < 1 or args.det_batch < 1 or min(args.batch_sizes, default=1) < 1:
        problems.append("--steps, --det-batch and --batch-sizes must be positive")
    if problems:
        return user_error("; ".join(problems))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = []
    for group in settings(cases(args)):
        prepared = []
        for case in group:
            prepared.append(prepare(case, device, args.det_size))
            print(
                f"{case.model} {case.variant or '-'} {case.norm} b{case.batch_size} {case.dtype} "
                f"{case.layout}: {prepared[-1].result.saved_mib:.0f} MiB saved",
                file=sys.stderr,
            )
        results += timed_in_turn(prepared, args.steps)
        del prepared  # the setting's models, before the next setting builds its own
    results = with_ratios(results)
    environment = environment_info(device, torch.float32)
    print(f"# {json.dumps(environment)}, {args.steps} timed steps")
    print(format_table(results))
    if args.json is not None:
        payload = {"environment": environment, "results": [asdict(r) for r in results]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0
