"""``involution bench model`` on CPU: side-by-side rounds, baseline ratios, folding, profiles."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from involution import cli
from involution.bench.model import create_model, fold_model, is_known_model


def test_model_names_from_timm_and_torchvision():
    assert is_known_model("rednet26") and is_known_model("torchvision.resnet18")
    assert not is_known_model("torchvision.rednet26") and not is_known_model("rednet7")
    with pytest.raises(ValueError, match=r"torchvision\.nope"):
        create_model("torchvision.nope", None)


def test_fold_model_folds_torchvision_and_rednet_batchnorms():
    torch.manual_seed(0)
    for name, channels in (("torchvision.resnet18", 3), ("rednet_compact", 1)):
        x = torch.randn(1, channels, 28, 28)
        model = create_model(name, None, num_classes=10).eval()
        folded = fold_model(model)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_cli_times_side_by_side_against_a_baseline(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "model", "--device", "cpu", "--models", "rednet26,torchvision.resnet18"]
    argv += ["--modes", "infer", "--batch-size", "1", "--image-size", "32", "--warmup", "1"]
    argv += ["--iters", "1", "--repeats", "2", "--threads", "1", "--fold-bn", "--profile"]
    argv += ["--baseline", "torchvision.resnet18", "--json", str(out)]
    assert cli.main(argv) == 0
    records = json.loads(out.read_text())
    assert [r["model"] for r in records] == ["rednet26", "torchvision.resnet18"]
    for record in records:
        assert record["ms_min"] <= record["ms_median"] <= record["ms_max"]
        assert record["cpu_ms_median"] > 0 and record["profile_ms"]["total"] > 0
    assert records[1]["ratio_median"] == 1.0
    assert records[0]["profile_ms"]["involution layer (fused)"] > 0
    printed = capsys.readouterr().out
    assert "ratio to torchvision.resnet18" in printed and "# profile" in printed


def test_cli_rejects_a_baseline_outside_the_models(capsys):
    argv = ["bench", "model", "--device", "cpu", "--models", "rednet26"]
    argv += ["--baseline", "torchvision.resnet18"]
    assert cli.main(argv) == 2
    assert "--baseline" in capsys.readouterr().err
