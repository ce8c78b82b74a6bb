"""``involution bench gpu``: the dry run end to end (CPU, Triton interpreter), and its pieces.

The dry run goes through every step of the GPU run (the op tests in a subprocess, layer shapes
read off a RedNet, every variant's passes beside the two convolutions, the winner table, the
models) on tiny shapes; its timings mean nothing.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from involution import cli
from involution.bench import gpu
from involution.ops.backends import triton as triton_backend
from involution.ops.backends.triton import winners


@pytest.mark.skipif(
    torch.cuda.is_available() or triton_backend.unavailable_reason(torch.device("cpu")) is not None,
    reason="the dry run runs on CPU under the Triton interpreter",
)
def test_dry_run_end_to_end(tmp_path, capsys):
    assert cli.main(["bench", "gpu", "--out", str(tmp_path), "--dry-run"]) == 0
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert report["dry_run"] and report["environment"]["device"] == "cpu"

    tests = report["tests"]
    assert tests["returncode"] == 0 and tests["counts"]["PASSED"] >= 3 and not tests["failures"]
    assert tests["verdicts"] == dict.fromkeys(winners.VARIANTS, "passed")

    shapes = [shape["label"] for shape in report["layer_shapes"]]
    assert shapes == ["C32 4x4 K3 s1"]  # RedNet-26's stem involution
    measured = {(t["shape"], t["method"], t["pass_name"]) for t in report["op"] if t["ms"]}
    assert not [t for t in report["op"] if t["error"]]
    for shape in shapes:
        for variant in winners.VARIANTS:
            assert {(shape, variant, "forward"), (shape, variant, "backward")} <= measured
        assert (shape, "tiled", "fused") in measured
        assert (shape, gpu.DEPTHWISE, "backward") in measured

    table = winners.load_table(tmp_path / "winners.json")
    assert table == report["winners"] and len(table) == len(shapes)
    assert all(set(passes) == set(gpu.PASSES) for passes in table.values())

    regeneration = report["regeneration"]
    paths = [(t["shape"], t["path"]) for t in regeneration["layers"] if t["ms"] is not None]
    assert paths == [(shapes[0], "kept"), (shapes[0], "regenerated")]
    assert [(m["model"], m["path"]) for m in regeneration["models"] if not m["error"]] == [
        ("rednet26", "kept"),
        ("rednet26", "regenerated"),
    ]

    models = {(m["model"], m["variant"], m["mode"]) for m in report["models"]}
    assert ("rednet26", "unfused", "train") in models
    assert ("torchvision.resnet18", "-", "infer") in models
    assert all(math.isfinite(m["images_per_second"]) for m in report["models"])
    assert [s["what"] for s in report["skipped"]] == ["compiled models"]

    printed = capsys.readouterr().out
    assert "| C32 4x4 K3 s1 | forward |" in printed and "winners" in printed
    assert "| C32 4x4 K3 s1 | regenerated |" in printed


def test_variant_verdicts():
    outcomes = {
        "t.py::test_variant_matches_reference[tiled-odd_sizes-fp32-nchw]": "PASSED",
        "t.py::test_variant_matches_reference[gather-odd_sizes-fp32-nchw]": "PASSED",
        "t.py::test_tiled_kernels_compile_for_hopper": "FAILED",
        "t.py::test_missing_table_means_default": "FAILED",  # names no variant
    }
    verdicts = gpu.variant_verdicts(outcomes, winners.VARIANTS)
    assert verdicts == {"gather": "passed", "tiled": "failed", "inductor": "untested"}


def _timing(method: str, pass_name: str, ms: float, fraction: float) -> dict:
    return vars(gpu.OpTiming("C64 56x56 K7 s1", method, pass_name, ms, 1, fraction))


def test_winners_and_targets_from_measurements():
    run = gpu.plan(dry_run=False, budget_s=480, batch=None)
    shape = gpu.LayerShape(64, 56, 56, 7, 1, 4, 16)
    timings = [
        gpu.OpTiming(shape.label, "gather", "forward", 2.0, 1),
        gpu.OpTiming(shape.label, "tiled", "forward", 1.0, 1),
        gpu.OpTiming(shape.label, "inductor", "forward", 0.5, 1),  # fastest, but not eligible
        gpu.OpTiming(shape.label, "tiled", "backward", None, 0, error="RuntimeError: x"),
        gpu.OpTiming(shape.label, "gather", "backward", 3.0, 1),
    ]
    table = gpu.choose_winners([shape], timings, ("gather", "tiled"), run)
    assert table == {
        "bfloat16/channels_last/C64/G4/56x56/K7x7/s1x1/p3x3/d1x1": {
            "forward": "tiled",
            "backward": "gather",
        }
    }

    models = [
        {"model": "rednet50", "variant": "unfused", "mode": "train", "compiled": False,
         "images_per_second": 1400.0, "peak_memory_mib": 7500.0, "error": None},
        {"model": "torchvision.resnet50", "variant": "-", "mode": "train", "compiled": False,
         "images_per_second": 2800.0, "peak_memory_mib": 6000.0, "error": None},
    ]  # fmt: skip
    report = {
        "op": [_timing("tiled", "forward", 1.0, 0.75), _timing("gather", "backward", 3.0, 0.2)],
        "models": models,
    }
    targets = gpu.check_targets(report, run)
    assert targets["forward_bandwidth"].startswith("met: worst shape 75 %")
    assert targets["backward_bandwidth"].startswith("not met: worst shape 20 %")
    assert targets["train_speed_vs_resnet"].startswith("not met: best 0.50x")
    assert targets["train_memory_vs_resnet"].startswith("not met: best 1.25x")
    assert targets["infer_speed_vs_resnet"] == "not measured"


def test_layer_shapes_of_rednet50():
    shapes = gpu.layer_shapes("rednet50", 224)
    assert [(s.label, s.count) for s in shapes] == [
        ("C32 112x112 K3 s1", 1),
        ("C64 56x56 K7 s1", 3),
        ("C128 56x56 K7 s2", 1),
        ("C128 28x28 K7 s1", 3),
        ("C256 28x28 K7 s2", 1),
        ("C256 14x14 K7 s1", 5),
        ("C512 14x14 K7 s2", 1),
        ("C512 7x7 K7 s1", 2),
    ]
    assert shapes[2].out_size == (28, 28) and shapes[2].groups == 8 and shapes[2].reduced == 32


def test_budget_records_what_it_skips():
    budget = gpu.Budget(10.0)
    assert budget.allows("cheap", 1.0)
    assert not budget.allows("expensive", 60.0)
    assert budget.skipped[0]["what"] == "expensive" and "60 s" in budget.skipped[0]["why"]


def test_needs_cuda_without_dry_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="--dry-run"):
        gpu.bench_gpu(tmp_path, dry_run=False, budget_s=60, batch=None)
