"""FLOP/MAC profiling: the involution formula, per-stage sums, and the paper's RedNet table."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import involution  # noqa: F401  (registers the models with timm)
from involution import Involution2d, involution2d
from involution.cli import main
from involution.models import RedNet, RedNetArch
from involution.models.profile import PAPER_GMACS, format_profile, profile_model


@pytest.mark.parametrize("name", sorted(PAPER_GMACS))
def test_rednet_totals_match_the_paper(name: str) -> None:
    profile = profile_model(lambda: timm.create_model(name))
    paper = PAPER_GMACS[name] * 1e9
    # Both conventions land within 3%; the mmcv-style one (with element-wise ops) within 1.2%.
    assert abs(profile.total.macs / paper - 1) < 0.03
    assert abs(profile.total.macs_elementwise / paper - 1) < 0.012
    assert profile.total.macs < profile.total.macs_elementwise
    # The remaining gap is the size of a K=7 stem involution (as in the det/seg backbone).
    stem7 = profile_model(lambda: timm.create_model(name, stem_kernel_size=7))
    assert abs(stem7.total.macs_elementwise / paper - 1) < 0.0035


def test_stages_add_up_to_the_total() -> None:
    profile = profile_model(lambda: timm.create_model("rednet50"))
    names = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert [s.name for s in profile.stages] == names
    assert sum(s.macs for s in profile.stages) == profile.total.macs
    assert sum(s.macs_elementwise for s in profile.stages) == profile.total.macs_elementwise
    assert sum(s.params for s in profile.stages) == profile.total.params == 15_540_806
    head = profile.stages[-1]
    assert head.macs == 2048 * 1000  # the linear layer only


@pytest.mark.parametrize(("stride", "size"), [(1, 12), (2, 12), (2, 9)])
def test_involution_module_count_is_analytic(stride: int, size: int) -> None:
    channels, k, groups, reduced = 32, 5, 2, 8
    profile = profile_model(
        lambda: torch.nn.Sequential(Involution2d(channels, k, stride=stride)),
        input_size=size,
        in_chans=channels,
        batch_size=2,
    )
    out = -(-size // stride)  # ceil: both the kernel branch and the aggregation
    positions = 2 * out * out
    expected = positions * (channels * k * k + channels * reduced + reduced * groups * k * k)
    assert profile.total.macs == expected


def test_involution_backward_ops_cost_as_much_as_the_forward() -> None:
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    weight = torch.randn(1, 1, 3, 3, 6, 6, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter:
        involution2d(x, weight, backend="reference").sum().backward()
    counts = counter.get_flop_counts()["Global"]
    forward = 2 * 4 * 6 * 6 * 9
    assert counts[torch.ops.involution.involution2d] == forward
    # Both gradients in one op (input and weight both require grad).
    assert counts[torch.ops.involution.involution2d_backward] == 2 * forward
    # One gradient: its own op.
    for op, inputs in (
        ("involution2d_backward_input", (x, weight.detach())),
        ("involution2d_backward_weight", (x.detach(), weight)),
    ):
        counter = FlopCounterMode(display=False)
        with counter:
            involution2d(*inputs, backend="reference").sum().backward()
        counts = counter.get_flop_counts()["Global"]
        assert counts[getattr(torch.ops.involution, op)] == forward


def test_resnets_with_the_same_counter() -> None:
    resnet50 = profile_model(lambda: torchvision.models.resnet50())
    assert resnet50.total.params == 25_557_032
    assert abs(resnet50.total.macs / 4.1e9 - 1) < 0.01  # the usual "4.1 GFLOPs"
    rednet50 = profile_model(lambda: timm.create_model("rednet50"))
    assert rednet50.total.macs < 0.7 * resnet50.total.macs  # the paper's headline claim


def test_compact_input_uses_mega_units() -> None:
    profile = profile_model(lambda: timm.create_model("rednet_compact"), input_size=28, in_chans=1)
    lines = format_profile(profile, "rednet_compact").splitlines()
    assert lines[0] == "rednet_compact input 1x1x28x28"
    assert lines[2] == "| stage | params (M) | MMACs | MMACs + element-wise |"
    assert lines[-1].split(" | ")[2] == f"{profile.total.macs / 1e6:.3f}"


def test_invalid_sizes() -> None:
    with pytest.raises(ValueError, match="input_size"):
        profile_model(lambda: timm.create_model("rednet26"), input_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        profile_model(lambda: timm.create_model("rednet26"), batch_size=0)


def test_cli_profile_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "rednet26", "--json", "--num-classes", "10"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in result["rows"]}
    assert result["input_shape"] == [1, 3, 224, 224]
    assert rows["head"]["params"] == 2048 * 10 + 10
    assert main(["profile", "no_such_model"]) == 2


def test_fused_involution_counts_like_the_unfused_one() -> None:
    def build(fused: bool):
        return lambda: RedNet(RedNetArch((1, 1), stage_widths=(16, 32), stem_width=32, fused=fused))

    unfused = profile_model(build(False), input_size=32)
    fused = profile_model(build(True), input_size=32)
    assert fused.total == unfused.total
    assert fused.stages == unfused.stages
