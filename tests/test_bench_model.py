"""``involution bench model`` on CPU: side-by-side rounds, baseline ratios, folding, profiles."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from involution import cli
from involution.bench.model import create_model, is_known_model
from involution.models.fold import ConvAct
from involution.models.fold_resnet import fold_model


def test_model_names_from_timm_and_torchvision():
    assert is_known_model("rednet26") and is_known_model("torchvision.resnet18")
    assert not is_known_model("torchvision.rednet26") and not is_known_model("rednet7")
    with pytest.raises(ValueError, match=r"torchvision\.nope"):
        create_model("torchvision.nope", None)


def test_fold_model_folds_torchvision_and_rednet_batchnorms():
    torch.manual_seed(0)
    # A small torchvision bottleneck ResNet (ResNet-50's block, narrow): RedNet's treatment.
    small_resnet = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16)
    cases = [
        ("basic-block resnet18", create_model("torchvision.resnet18", None, num_classes=10), 3),
        ("bottleneck resnet", small_resnet, 3),
        ("rednet_compact", create_model("rednet_compact", None, num_classes=10), 1),
    ]
    for name, model, channels in cases:
        x = torch.randn(1, channels, 28, 28)
        model = model.eval()
        with torch.no_grad():  # BatchNorms that are not the identity
            for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
                norm.running_var.uniform_(0.5, 2.0)
                norm.weight.uniform_(0.5, 1.5)
        folded = fold_model(model)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        # Bottleneck ResNets get RedNet's treatment (ReLUs and adds inside the convs).
        assert any(isinstance(m, ConvAct) for m in folded.modules()) == (name != cases[0][0])
        assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # untouched
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
