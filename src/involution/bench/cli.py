"""``involution bench``: one sub-command per benchmark (``op``, ``model``, ...)."""

from __future__ import annotations

from typing import Any

from involution.bench import detect, gpu, memory, model, onnx, op
from involution.cli_utils import add_command


def add_commands(subparsers: Any) -> None:
    """Register ``bench`` and its benchmarks on the top-level ``involution`` sub-parsers.

    A benchmark module's ``add_arguments`` declares its options (its docstring is the help
    line, the module's docstring the description); ``op`` and ``onnx`` register their own.
    """
    bench = subparsers.add_parser(
        "bench",
        help="benchmarks of the involution operator and of RedNet",
        description="Benchmarks. Each prints a markdown table; see `involution bench NAME -h`.",
    )
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    op.add_commands(benchmarks)
    add_command(benchmarks, "model", model.model_command, model.add_arguments, model.__doc__)
    add_command(benchmarks, "gpu", gpu.gpu_command, gpu.add_arguments, gpu.__doc__)
    onnx.add_commands(benchmarks)
    add_command(benchmarks, "detect", detect.detect_command, detect.add_arguments, detect.__doc__)
    add_command(benchmarks, "memory", memory.memory_command, memory.add_arguments, memory.__doc__)
