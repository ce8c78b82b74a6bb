"""Kernel regeneration on the GPU: the kept-kernel training path against the regenerating one.

A step of ``involution bench gpu`` (:mod:`involution.bench.gpu`). For every involution layer
shape of RedNet-50 (an :class:`~involution.ops.Involution2d` of that shape on the ``"triton"``
backend, in training mode, its input in the run's dtype and channels_last) it times one
forward and backward with the kernels kept for backward (``regenerate_kernels = False``) and
regenerated (:mod:`involution.ops.regenerate`: the fused forward from the activated features,
the backward of :mod:`involution.ops.backends.triton.regeneration`), and records each path's
peak CUDA memory over that step, less what was allocated before it. Then a RedNet-50 training
step both ways (:mod:`involution.bench.model`, ``keep_kernels``): images per second and peak
memory. On CPU (the dry run) the times mean nothing and there is no peak memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from involution.bench.gpu import LayerShape
    from involution.bench.model import BenchSettings

#: The two training paths: (label, Involution2d.regenerate_kernels).
PATHS = (("kept", False), ("regenerated", True))


@dataclass(frozen=True)
class PathTiming:
    """One training path on one layer shape: forward + backward milliseconds (median) and peak
    memory in MiB (``None`` on CPU); ``ms`` is ``None`` and ``error`` set when it failed."""

    shape: str
    path: str
    ms: float | None
    peak_mib: float | None
    error: str | None = None


def _peak_mib(function: Callable[[], Any], device: torch.device) -> float | None:
    """Peak CUDA memory (MiB) of one call of ``function`` above what was allocated before it."""
    if device.type != "cuda":
        function()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    function()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _training_step(shape: LayerShape, batch: int, dtype: torch.dtype, device: torch.device):
    """(step, layer): a forward and backward of a training Involution2d of ``shape``."""
    from involution.ops import Involution2d

    layer = Involution2d(
        shape.channels,
        shape.kernel,
        stride=shape.stride,
        group_channels=shape.channels // shape.groups,
        reduction_ratio=shape.channels // shape.reduced,
        backend="triton",
    )
    layer = layer.to(device=device, dtype=dtype).train()
    x = torch.randn(batch, shape.channels, shape.height, shape.width, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()

    def step() -> Tensor:
        output = layer(x)
        output.backward(torch.ones_like(output))
        return output

    return step, layer


def time_layer_paths(
    shapes: list[LayerShape],
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
    time_ms: Callable[[Callable[[], Any]], float],
) -> list[PathTiming]:
    """Both paths on every shape; ``time_ms(function)`` is the run's median timer."""
    timings = []
    for shape in shapes:
        for path, regenerate in PATHS:
            ms = peak = error = None
            try:
                step, layer = _training_step(shape, batch, dtype, device)
                layer.regenerate_kernels = regenerate
                step()  # the Triton kernels' compilation and autotuning, outside the peak
                peak = _peak_mib(step, device)
                ms = time_ms(step)
            except Exception as failure:  # a path that fails is recorded, not fatal
                error = f"{type(failure).__name__}: {str(failure)[:300]}"
            timings.append(PathTiming(shape.label, path, ms, peak, error))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return timings


def time_model_paths(model_name: str, settings: BenchSettings) -> list[dict[str, Any]]:
    """``model_name``'s training step (unfused Involution2d layers) both ways, as records of
    :class:`~involution.bench.model.BenchResult` with the path added."""
    from involution.bench import model as model_bench

    records = []
    for path, regenerate in PATHS:
        chosen = replace(settings, fused="off", keep_kernels=not regenerate)
        for result in model_bench.run_benchmarks([model_name], ["train"], chosen):
            records.append({**asdict(result), "path": path})
    return records


def format_table(layers: list[PathTiming], models: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: per shape, each path's ms and peak MiB; then the model's."""
    lines = ["| shape | path | fwd+bwd ms | peak MiB |", "|---|---|---:|---:|"]
    for t in layers:
        ms = t.error or f"{t.ms:.3f}"
        peak = "-" if t.peak_mib is None else f"{t.peak_mib:.0f}"
        lines.append(f"| {t.shape} | {t.path} | {ms} | {peak} |")
    for m in models:
        speed = m["error"] or f"{m['images_per_second']:.1f} images/s"
        peak = "-" if m["peak_memory_mib"] is None else f"{m['peak_memory_mib']:.0f} MiB"
        lines.append(f"{m['model']} train, kernels {m['path']}: {speed}, peak {peak}")
    return lines
