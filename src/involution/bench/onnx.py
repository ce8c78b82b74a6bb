"""``involution bench onnx`` and ``onnx-lowering``: exported models in onnxruntime on CPU.

``onnx``: RedNet-50 and torchvision's ResNet-50 (random weights, eval mode), each exported with
:func:`involution.export.onnx.export_onnx` (dynamic batch and size) and run by one onnxruntime
CPU session per model with ``--threads`` intra-op threads, side by side in one process.

``onnx-lowering``: the involution op alone (input and kernels as graph inputs, RedNet-50's layer
shapes: G = C/16, K = 7, stride 1) in ONNX, with dynamic batch and size, once per formulation of
:mod:`involution.ops.lowering` traced by the exporter in ATen operators, and once as
``torch.onnx.export`` writes the op itself (``"translation"``:
:mod:`involution.ops.onnx_translation`), to choose the formulation (the op in PyTorch:
``involution bench op``).

Timing: ``--warmup`` untimed runs, then ``--repeats`` rounds in which every candidate runs once
(interleaved, so that a machine shared with other processes slows all of them alike); the table
gives the median and the minimum per candidate. The sessions' idle threads sleep instead of
spinning (onnxruntime's ``session.intra_op.allow_spinning=0``), so that one session's pool
does not steal the cores of the next candidate. Export time is the wall time of
``torch.onnx.export``; parity is ``max |onnxruntime - PyTorch| / max |PyTorch|``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from involution.bench.model import create_model
from involution.bench.op import GROUP_CHANNELS, KERNEL_SIZE, SHAPE_SETS
from involution.cli_utils import LazyChoices, add_documented_parser, user_error

__all__ = ["add_commands", "time_interleaved"]


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def time_interleaved(
    runs: dict[str, Callable[[], Any]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of each runner: ``warmup`` untimed calls each, then ``repeats`` rounds
    in which each runs once, in order."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(threads: int) -> dict[str, Any]:
    import onnxruntime

    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "onnxruntime_threads": threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = os.getloadavg()[0]
    return info


@dataclass
class Timing:
    """Milliseconds per call of one candidate on one input."""

    median_ms: float
    min_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Timing:
        return cls(1e3 * statistics.median(seconds), 1e3 * min(seconds))


# ----------------------------------------------------------------------------- models


@dataclass
class ModelResult:
    model: str
    export_s: float
    file_mib: float
    nodes: int
    max_relative_diff: float
    #: batch size -> timing (224 px or --size)
    timings: dict[int, Timing] = field(default_factory=dict)


def run_model_benchmark(
    names: Sequence[str],
    batches: Sequence[int],
    size: int,
    threads: int,
    warmup: int,
    repeats: int,
    folder: Path,
) -> list[ModelResult]:
    """Export each model, check it at batch 1, then time every batch size interleaved."""
    import onnx

    from involution.export.onnx import (
        INPUT_NAME,
        check_onnx,
        export_onnx,
        onnxruntime_session,
    )

    torch.manual_seed(0)
    results, sessions = [], {}
    for name in names:
        model = create_model(name, fused=None)
        path = folder / f"{name.replace('.', '_')}.onnx"
        _progress(f"exporting {name} ...")
        start = time.perf_counter()
        export_onnx(model, path, (size, size))
        export_s = time.perf_counter() - start
        parity = check_onnx(path, model, [(1, 3, size, size)], threads)[0]
        results.append(
            ModelResult(
                name,
                export_s,
                path.stat().st_size / 2**20,
                len(onnx.load(path, load_external_data=False).graph.node),
                parity.max_relative_diff,
            )
        )
        sessions[name] = onnxruntime_session(path, threads, spin=False)
    for batch in batches:
        feed = {INPUT_NAME: torch.randn(batch, 3, size, size).numpy()}
        _progress(f"timing batch {batch} ...")
        times = time_interleaved(
            {name: lambda s=session, f=feed: s.run(None, f) for name, session in sessions.items()},
            warmup,
            repeats,
        )
        for result in results:
            result.timings[batch] = Timing.of(times[result.model])
    return results


def format_model_table(results: Sequence[ModelResult], size: int) -> str:
    batches = list(results[0].timings)
    header = (
        "| model | "
        + " | ".join(f"batch {b}: ms (min) | batch {b}: img/s" for b in batches)
        + " | export s | ONNX MiB | nodes | max rel. diff |"
    )
    lines = [header, "|---|" + "---:|" * (2 * len(batches) + 4)]
    for r in results:
        cells = []
        for batch, t in r.timings.items():
            cells += [f"{t.median_ms:.1f} ({t.min_ms:.1f})", f"{1e3 * batch / t.median_ms:.1f}"]
        lines.append(
            f"| {r.model} | {' | '.join(cells)} | {r.export_s:.0f} | {r.file_mib:.1f} | "
            f"{r.nodes} | {r.max_relative_diff:.1e} |"
        )
    return f"{size} px, float32\n\n" + "\n".join(lines)


# ----------------------------------------------------------------------------- lowerings


#: The candidate exported as ``torch.onnx.export`` writes the op (its ONNX translation).
TRANSLATION = "translation"


class Aggregation(nn.Module):
    """The involution op alone, as a module to export: (input, kernels) -> output, through the
    op (``lowered=False``) or through the active ATen formulation."""

    def __init__(self, lowered: bool) -> None:
        super().__init__()
        self.lowered = lowered

    def forward(self, input: Tensor, kernels: Tensor) -> Tensor:
        from involution.ops import involution2d
        from involution.ops.lowering import involution2d_lowered

        if self.lowered:
            padding = (KERNEL_SIZE - 1) // 2
            return involution2d_lowered(input, kernels, (1, 1), (padding, padding), (1, 1))
        return involution2d(input, kernels)


@dataclass
class LoweringResult:
    lowering: str
    channels: int
    size: int
    export_s: float
    nodes: int
    max_relative_diff: float
    #: batch size -> timing
    timings: dict[int, Timing] = field(default_factory=dict)


def _export_aggregation(path: Path, channels: int, lowering: str) -> float:
    """Export :class:`Aggregation` for ``channels`` with dynamic batch and size through
    formulation ``lowering`` (or the op's translation); returns the seconds it took."""
    from involution.export.onnx import quiet_exporter
    from involution.ops.lowering import DEFAULT_LOWERING, use_lowering

    groups = channels // GROUP_CHANNELS
    example = (
        torch.randn(1, channels, 16, 16),
        torch.randn(1, groups, KERNEL_SIZE, KERNEL_SIZE, 16, 16),
    )
    auto = torch.export.Dim.AUTO
    shapes = ({0: auto, 2: auto, 3: auto}, {0: auto, 4: auto, 5: auto})
    start = time.perf_counter()
    traced = lowering != TRANSLATION
    with use_lowering(lowering if traced else DEFAULT_LOWERING), quiet_exporter():
        program = torch.onnx.export(
            Aggregation(lowered=traced).eval(),
            example,
            dynamo=True,
            dynamic_shapes=shapes,
            input_names=["input", "kernels"],
            verbose=False,
        )
    seconds = time.perf_counter() - start
    program.save(path)
    return seconds


def run_lowering_benchmark(
    lowerings: Sequence[str],
    shapes: Sequence[tuple[int, int]],
    batches: Sequence[int],
    threads: int,
    warmup: int,
    repeats: int,
    folder: Path,
) -> list[LoweringResult]:
    """Per layer shape: export each formulation, then time all of them interleaved per batch
    size."""
    import onnx

    from involution.export.onnx import onnxruntime_session, relative_difference
    from involution.ops import involution2d

    torch.manual_seed(0)
    results = []
    for channels, size in shapes:
        sessions = {}
        row: dict[str, LoweringResult] = {}
        for lowering in lowerings:
            path = folder / f"{lowering}_{channels}.onnx"
            _progress(f"exporting {lowering} for C={channels} ...")
            export_s = _export_aggregation(path, channels, lowering)
            sessions[lowering] = onnxruntime_session(path, threads, spin=False)
            nodes = len(onnx.load(path).graph.node)
            row[lowering] = LoweringResult(lowering, channels, size, export_s, nodes, 0.0)
        for batch in batches:
            x = torch.randn(batch, channels, size, size)
            w = torch.randn(batch, channels // GROUP_CHANNELS, KERNEL_SIZE, KERNEL_SIZE, size, size)
            with torch.no_grad():
                expected = involution2d(x, w)
            feed = {"input": x.numpy(), "kernels": w.numpy()}
            for lowering, session in sessions.items():
                actual = torch.from_numpy(session.run(None, feed)[0])
                diff = relative_difference(actual, expected)
                row[lowering].max_relative_diff = max(row[lowering].max_relative_diff, diff)
            runs = {
                name: lambda s=session, f=feed: s.run(None, f) for name, session in sessions.items()
            }
            _progress(f"timing C={channels}, {size} px, batch {batch} ...")
            times = time_interleaved(runs, warmup, repeats)
            for name, seconds in times.items():
                row[name].timings[batch] = Timing.of(seconds)
        results.extend(row.values())
    return results


def format_lowering_table(results: Sequence[LoweringResult]) -> str:
    names = list(dict.fromkeys(r.lowering for r in results))
    batches = list(results[0].timings)
    lines = [
        "| C | H=W | B | " + " | ".join(f"{n} ms (min)" for n in names) + " |",
        "|---:|---:|---:|" + "---:|" * len(names),
    ]
    by_key = {(r.lowering, r.channels): r for r in results}
    shapes = list(dict.fromkeys((r.channels, r.size) for r in results))
    for channels, size in shapes:
        for batch in batches:
            cells = []
            for name in names:
                t = by_key[(name, channels)].timings[batch]
                cells.append(f"{t.median_ms:.2f} ({t.min_ms:.2f})")
            lines.append(f"| {channels} | {size} | {batch} | {' | '.join(cells)} |")
    lines += [
        "",
        "| formulation | export s (all shapes) | ONNX nodes per layer | max rel. diff |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        rows = [r for r in results if r.lowering == name]
        lines.append(
            f"| {name} | {sum(r.export_s for r in rows):.0f} | {rows[0].nodes} | "
            f"{max(r.max_relative_diff for r in rows):.1e} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _common_arguments(parser: argparse.ArgumentParser, repeats: int) -> None:
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per candidate")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")


def lowering_candidates() -> tuple[str, ...]:
    """The formulations of :data:`involution.ops.lowering.LOWERINGS`, then the translation."""
    from involution.ops.lowering import LOWERINGS

    return (*LOWERINGS, TRANSLATION)


def add_commands(bench_subparsers: Any) -> None:
    """Register ``onnx`` and ``onnx-lowering`` under the ``involution bench`` sub-parsers."""
    models = add_documented_parser(
        bench_subparsers, "onnx", "exported RedNet-50 vs ResNet-50 in onnxruntime (CPU)", __doc__
    )
    models.add_argument(
        "--models",
        nargs="+",
        default=["rednet50", "torchvision.resnet50"],
        help="timm names or torchvision.NAME (default: rednet50 torchvision.resnet50)",
    )
    models.add_argument("--size", type=int, default=224, help="input side (224)")
    _common_arguments(models, repeats=10)
    models.set_defaults(func=onnx_command)

    lowerings = add_documented_parser(
        bench_subparsers,
        "onnx-lowering",
        "involution's ONNX formulations in onnxruntime on RedNet-50's layer shapes",
        __doc__,
    )
    lowerings.add_argument(
        "--lowerings",
        nargs="+",
        choices=LazyChoices(lowering_candidates),
        metavar="NAME",
        help="formulations to compare: %(choices)s (default: all)",
    )
    lowerings.add_argument("--shapes", choices=tuple(SHAPE_SETS), default="rednet50")
    _common_arguments(lowerings, repeats=15)
    lowerings.set_defaults(func=onnx_lowering_command)


def _counts_problem(args: argparse.Namespace) -> str | None:
    if min(args.batch) < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        return "bench: --batch, --repeats, --threads >= 1, --warmup >= 0"
    return None


def _report(args: argparse.Namespace, table: str, results: Sequence[Any]) -> int:
    """Print the environment and ``table``; with ``--json``, write both with ``results``."""
    info = environment(args.threads)
    print(", ".join(f"{key}: {value}" for key, value in info.items()))
    print()
    print(table)
    if args.json is not None:
        payload = {"environment": info, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _run(
    args: argparse.Namespace,
    benchmark: Callable[[Path], Sequence[Any]],
    table: Callable[[Sequence[Any]], str],
) -> int:
    """Check the counts, run ``benchmark`` in a temporary folder, print its ``table``."""
    problem = _counts_problem(args)
    if problem is not None:
        return user_error(problem)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        results = benchmark(Path(folder))
    return _report(args, table(results), results)


def onnx_command(args: argparse.Namespace) -> int:
    def benchmark(folder: Path) -> list[ModelResult]:
        return run_model_benchmark(
            args.models, args.batch, args.size, args.threads, args.warmup, args.repeats, folder
        )

    return _run(args, benchmark, lambda results: format_model_table(results, args.size))


def onnx_lowering_command(args: argparse.Namespace) -> int:
    def benchmark(folder: Path) -> list[LoweringResult]:
        return run_lowering_benchmark(
            args.lowerings or lowering_candidates(),
            SHAPE_SETS[args.shapes],
            args.batch,
            args.threads,
            args.warmup,
            args.repeats,
            folder,
        )

    return _run(args, benchmark, format_lowering_table)
