"""``involution bench``: one sub-command per benchmark (``op``, ``model``)."""

from __future__ import annotations

from typing import Any

from involution.bench import detect, gpu, memory, model, onnx, op


def add_commands(subparsers: Any) -> None:
    """Register ``bench`` and its benchmarks on the top-level ``involution`` sub-parsers."""
    bench = subparsers.add_parser(
        "bench",
        help="benchmarks of the involution operator and of RedNet",
        description="Benchmarks. Each prints a markdown table; see `involution bench NAME -h`.",
    )
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for module in (op, model, gpu, onnx, detect, memory):
        module.add_commands(benchmarks)
