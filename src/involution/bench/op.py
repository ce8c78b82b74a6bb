"""``involution bench op``: the involution operator against its reference and two convolutions.

For every shape and batch size, the forward pass and the forward+backward pass of each backend
run side by side in one process with a depthwise 7x7 convolution
(``nn.Conv2d(C, C, 7, padding=3, groups=C)``) and a dense 3x3 convolution
(``nn.Conv2d(C, C, 3, padding=1)``) on the same feature map.

Time is the median (and the minimum) wall-clock time of ``--repeats`` calls after ``--warmup``
calls (CUDA work is synchronised). On a machine shared with other processes the minimum is the
better estimate of what the code itself costs. The forward pass runs under ``torch.no_grad()``;
forward+backward computes the gradients of the input and of the kernel (or convolution
parameters) for a random upstream gradient with ``torch.autograd.grad``.

Peak memory is the peak of the memory allocated during one extra call, above what was
allocated before it (so it counts the outputs, gradients and every temporary, but not the inputs):

- CUDA: ``torch.cuda.max_memory_allocated`` minus ``torch.cuda.memory_allocated`` before the call.
- CPU: every allocation and free of PyTorch's CPU allocator during the call, recorded by
  ``torch.profiler`` (``profile_memory=True``) and summed in time order. Memory taken outside
  PyTorch's allocator is not seen; the C++ kernels allocate their tensors through ATen and use
  no other heap memory.

It is reported in MiB and relative to the bytes of input + weight + output, where the weight is
the (B, G, K, K, H, W) kernel tensor for involution and the parameters for the convolutions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from involution.bench.bandwidth import peak_memory_bandwidth
from involution.cli_utils import LazyChoices, add_documented_parser, user_error

#: (channels, spatial size) of the involution layers of RedNet-50, one per stage; G = C/16,
#: kernel 7, stride 1.
SHAPE_SETS: dict[str, tuple[tuple[int, int], ...]] = {
    "rednet50": ((64, 56), (128, 28), (256, 14), (512, 7)),
    "tiny": ((32, 8), (16, 5)),
}
KERNEL_SIZE = 7
GROUP_CHANNELS = 16
PASSES = ("forward", "forward+backward")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DEPTHWISE, DENSE = "depthwise 7x7 conv", "dense 3x3 conv"


@dataclass(frozen=True)
class Measurement:
    """One method on one problem."""

    channels: int
    size: int
    batch: int
    pass_name: str
    method: str
    median_ms: float
    min_ms: float
    peak_bytes: int
    #: Bytes of input + weight (or conv parameters) + output.
    tensor_bytes: int


def backend_names(auto: bool = True) -> tuple[str, ...]:
    """The involution backends (:data:`involution.ops.BACKENDS`), with ``"auto"`` or not."""
    from involution.ops import BACKENDS

    return tuple(name for name in BACKENDS if auto or name != "auto")


def default_backends(device: torch.device) -> list[str]:
    """The reference plus every fast backend that runs natively on ``device``.

    Triton in its CPU interpreter counts as unavailable here: it is a test vehicle, not fast.
    """
    from involution.ops.backends import get_backend

    names = ["reference"]
    for name in ("cpu", "triton"):
        interpreted = name == "triton" and device.type != "cuda"
        if not interpreted and get_backend(name).unavailable_reason(device) is None:
            names.append(name)
    return names


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def times_ms(
    function: Callable[[], Any], device: torch.device, warmup: int, repeats: int
) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` calls of ``function`` after ``warmup`` calls."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        function()
        _synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    return times


def peak_bytes(function: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated during one call of ``function`` above those allocated before it."""
    if device.type == "cuda":
        _synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        function()
        _synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        function()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:  # allocations are positive, frees negative
        current += nbytes
        peak = max(peak, current)
    return peak


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _problem_functions(
    channels: int, size: int, batch: int, method: str, dtype: torch.dtype, device: torch.device
) -> tuple[Callable[[], Any], Callable[[], Any], int]:
    """(forward, forward+backward, tensor bytes) of one method on one problem."""
    from involution.ops import involution2d

    factory = {"dtype": dtype, "device": device}
    input = torch.randn(batch, channels, size, size, **factory, requires_grad=True)
    grad_output = torch.randn(batch, channels, size, size, **factory)
    if method in (DEPTHWISE, DENSE):
        if method == DEPTHWISE:
            conv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels, **factory)
        else:
            conv = nn.Conv2d(channels, channels, 3, padding=1, **factory)
        params = tuple(conv.parameters())
        tensor_bytes = _nbytes(input, *params, grad_output)

        def forward() -> Any:
            with torch.no_grad():
                return conv(input)

        def forward_backward() -> Any:
            return torch.autograd.grad(conv(input), (input, *params), grad_output)

        return forward, forward_backward, tensor_bytes

    groups = channels // GROUP_CHANNELS
    weight = torch.randn(
        batch, groups, KERNEL_SIZE, KERNEL_SIZE, size, size, **factory, requires_grad=True
    )
    tensor_bytes = _nbytes(input, weight, grad_output)

    def forward() -> Any:
        with torch.no_grad():
            return involution2d(input, weight, backend=method)

    def forward_backward() -> Any:
        output = involution2d(input, weight, backend=method)
        return torch.autograd.grad(output, (input, weight), grad_output)

    return forward, forward_backward, tensor_bytes


def run_benchmarks(
    shapes: Sequence[tuple[int, int]],
    batches: Sequence[int],
    backends: Sequence[str],
    dtype: torch.dtype,
    device: torch.device,
    warmup: int,
    repeats: int,
    progress: Callable[[str], None] = lambda message: None,
) -> list[Measurement]:
    """Time and measure every backend and both convolutions on every problem."""
    results = []
    for channels, size in shapes:
        for batch in batches:
            for method in (*backends, DEPTHWISE, DENSE):
                functions = _problem_functions(channels, size, batch, method, dtype, device)
                *passes, tensor_bytes = functions
                for pass_name, function in zip(PASSES, passes, strict=True):
                    progress(f"C={channels} {size}x{size} B={batch} {pass_name} {method}")
                    times = times_ms(function, device, warmup, repeats)
                    results.append(
                        Measurement(
                            channels=channels,
                            size=size,
                            batch=batch,
                            pass_name=pass_name,
                            method=method,
                            median_ms=statistics.median(times),
                            min_ms=min(times),
                            peak_bytes=peak_bytes(function, device),
                            tensor_bytes=tensor_bytes,
                        )
                    )
    return results


def format_table(results: Sequence[Measurement], peak_bandwidth: float | None = None) -> str:
    """A markdown table; ratios are against the reference and the two convolutions.

    With ``peak_bandwidth`` (bytes/s, see :mod:`involution.bench.bandwidth`) a last column gives
    the compulsory traffic per second as a fraction of it: in+w+out bytes once for the forward,
    three times for forward+backward (each gradient pass reads two of the tensors and writes the
    third).
    """
    by_key = {(r.channels, r.size, r.batch, r.pass_name, r.method): r for r in results}

    def ratio(numerator: float, key: tuple, method: str) -> str:
        other = by_key.get((*key, method))
        return f"{numerator / other.median_ms:.2f}" if other else "-"

    lines = [
        "| C | H=W | B | pass | method | median ms | min ms | reference / method | method / dw 7x7 "
        "| method / dense 3x3 | peak MiB | peak / (in+w+out) |",
        "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if peak_bandwidth is not None:
        lines = [lines[0] + " % peak bandwidth |", lines[1] + "---:|"]
    for r in results:
        key = (r.channels, r.size, r.batch, r.pass_name)
        reference = by_key.get((*key, "reference"))
        speedup = f"{reference.median_ms / r.median_ms:.1f}" if reference else "-"
        lines.append(
            f"| {r.channels} | {r.size} | {r.batch} | {r.pass_name} | {r.method} "
            f"| {r.median_ms:.3f} | {r.min_ms:.3f} | {speedup} "
            f"| {ratio(r.median_ms, key, DEPTHWISE)} | {ratio(r.median_ms, key, DENSE)} "
            f"| {r.peak_bytes / 2**20:.2f} "
            f"| {r.peak_bytes / r.tensor_bytes:.2f} |"
        )
        if peak_bandwidth is not None:
            traffic = r.tensor_bytes * (1 if r.pass_name == "forward" else 3)
            lines[-1] += f" {100 * traffic / (r.median_ms / 1e3) / peak_bandwidth:.1f} |"
    return "\n".join(lines)


def environment_info(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What a benchmark's figures depend on: device (GPU name and peak memory bandwidth, or the
    CPU count and load), dtype, torch version and threads; printed above every table."""
    info: dict[str, Any] = {
        "device": str(device),
        "dtype": str(dtype),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        peak = peak_memory_bandwidth(device)
        info["peak_bandwidth_gb_s"] = None if peak is None else round(peak / 1e9, 1)
    elif hasattr(os, "getloadavg"):
        info["load_average_1min"] = os.getloadavg()[0]
        info["cpu_count"] = os.cpu_count()
    return info


def add_commands(bench_subparsers: Any) -> None:
    """Register ``op`` under the ``involution bench`` sub-parsers."""
    parser = add_documented_parser(
        bench_subparsers,
        "op",
        "the involution operator vs its reference and depthwise/dense convolutions",
        __doc__,
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=LazyChoices(lambda: backend_names(auto=False)),
        metavar="NAME",
        help="involution backends to run: %(choices)s (default: reference + the fast ones on "
        "--device)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument(
        "--shapes",
        choices=tuple(SHAPE_SETS),
        default="rednet50",
        help="rednet50: RedNet-50's involution layers; tiny: a quick smoke run",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--dims",
        type=int,
        choices=(1, 2, 3),
        default=2,
        help="2: the shapes above; 1 or 3: the 1-D/3-D op on CPU (involution.bench.op_nd)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.set_defaults(func=op_command)


def op_command(args: argparse.Namespace) -> int:
    """Run ``involution bench op``; prints a markdown table to stdout, progress to stderr."""
    from involution.ops.backends import get_backend

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return user_error("bench op: --device cuda but CUDA is not available")
    if min(args.batch) < 1 or args.repeats < 1 or args.warmup < 0:
        return user_error("bench op: --batch and --repeats must be >= 1, --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.dims != 2:
        from involution.bench import op_nd

        return op_nd.command(args, times_ms)
    backends = args.backends or default_backends(device)
    for name in backends:
        reason = get_backend(name).unavailable_reason(device)
        if reason is not None:
            return user_error(f"bench op: backend {name!r} is unavailable: {reason}")
    dtype = DTYPES[args.dtype]
    environment = environment_info(device, dtype)
    results = run_benchmarks(
        SHAPE_SETS[args.shapes],
        args.batch,
        backends,
        dtype,
        device,
        args.warmup,
        args.repeats,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    if "load_average_1min" in environment and hasattr(os, "getloadavg"):
        environment["load_average_1min_after"] = os.getloadavg()[0]
    print(", ".join(f"{key}: {value}" for key, value in environment.items()))
    print()
    print(format_table(results, peak_memory_bandwidth(device)))
    if args.json is not None:
        payload = {"environment": environment, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0
