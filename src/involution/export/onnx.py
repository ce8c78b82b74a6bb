"""ONNX export of image models (RedNet or any other) and its parity check through onnxruntime.

The plain ``torch.onnx.export(model, (x,), f, dynamo=True)`` works on every RedNet by itself:
the exporter translates the involution op to standard ONNX operators
(:mod:`involution.ops.onnx_translation`). :func:`export_onnx` adds the usual choices for an image
model (eval mode, batch, height and width left dynamic, named input and output) and
:func:`check_onnx` runs the file in onnxruntime against the PyTorch model at several input
sizes. Needs the ``onnx`` extra (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "Parity",
    "check_onnx",
    "export_onnx",
    "onnxruntime_session",
    "quiet_exporter",
    "relative_difference",
]

INPUT_NAME = "input"
OUTPUT_NAME = "output"


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's per-step progress log (errors still raise)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_onnx(
    model: nn.Module,
    path: str | PathLike,
    input_size: tuple[int, int] = (224, 224),
    in_chans: int = 3,
    batch: int = 1,
    opset: int | None = None,
) -> Path:
    """Export ``model`` (in eval mode) to an ONNX file with dynamic batch, height and width.

    Args:
        model: maps a (B, in_chans, H, W) float32 image batch to one tensor (e.g. logits).
        path: the ``.onnx`` file to write (parent folders are created).
        input_size: (H, W) of the example input the exporter traces with.
        in_chans, batch: channels and batch size of that example input.
        opset: ONNX opset version (default: the exporter's, 18 in torch 2.14).

    Returns the path. The graph's input is named ``"input"``, its output ``"output"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(batch, in_chans, *input_size)
    dims = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    model.eval()
    with torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=(dims,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            verbose=False,
        )
    program.save(path)
    return path


def onnxruntime_session(path: str | PathLike, threads: int | None = None, spin: bool = True):
    """An onnxruntime CPU session for ``path``; ``threads`` intra-op threads (default: ORT's).

    ``spin=False`` makes idle worker threads sleep instead of spinning (onnxruntime's default
    is to spin): for benchmarks that alternate sessions, where a spinning pool would steal the
    cores of the next session.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def relative_difference(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|``: the error relative to the output's scale."""
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (scale if scale > 0 else 1.0)


@dataclass(frozen=True)
class Parity:
    """onnxruntime against PyTorch on one random input of ``shape`` (B, C, H, W)."""

    shape: tuple[int, ...]
    max_abs_diff: float
    max_relative_diff: float


def check_onnx(
    path: str | PathLike,
    model: nn.Module,
    shapes: Sequence[tuple[int, int, int, int]],
    threads: int | None = None,
    seed: int = 0,
) -> list[Parity]:
    """Run the ONNX file and ``model`` (eval mode) on a standard-normal input of each shape.

    Returns one :class:`Parity` per shape. Raises onnxruntime's error if a shape is rejected
    (e.g. a dimension the export fixed).
    """
    session = onnxruntime_session(path, threads)
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    results = []
    for shape in shapes:
        image = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = model(image)
        actual = torch.from_numpy(session.run(None, {INPUT_NAME: image.numpy()})[0])
        if actual.shape != expected.shape:
            raise ValueError(
                f"{path} gave shape {tuple(actual.shape)} for input {tuple(shape)}, "
                f"PyTorch {tuple(expected.shape)}"
            )
        results.append(
            Parity(
                tuple(shape),
                (actual - expected).abs().max().item(),
                relative_difference(actual, expected),
            )
        )
    return results
