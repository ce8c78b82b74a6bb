"""Involution2d against the official implementation's recorded outputs, and its argument checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from involution import Involution2d, involution2d
from involution.ops.modules import convert_official_involution_state_dict

CONFORMANCE = Path(__file__).resolve().parents[1].parent / "shared" / "conformance"
OP_CASES = CONFORMANCE / "involution_op_cases.pt"


@pytest.fixture(scope="module")
def official_cases() -> list[dict]:
    if not OP_CASES.exists():
        pytest.skip(f"official conformance data not found at {OP_CASES}")
    return torch.load(OP_CASES, weights_only=True)


def _official_module(case: dict) -> Involution2d:
    module = Involution2d(case["channels"], case["kernel_size"], case["stride"]).double()
    module.load_state_dict(convert_official_involution_state_dict(case["state_dict"]))
    return module.eval()


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_module_reproduces_official_outputs(official_cases, backend):
    checked = 0
    for case in official_cases:
        if not case["ok"]:
            continue
        module = _official_module(case)
        module.backend = backend
        with torch.no_grad():
            kernels = module.generate_kernels(case["input"])
            output = module(case["input"])
        torch.testing.assert_close(kernels.flatten(1, 3), case["kernel"], rtol=0, atol=1e-10)
        torch.testing.assert_close(output, case["output"], rtol=0, atol=1e-10)
        checked += 1
    assert checked == 8


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_op_reproduces_official_outputs_from_recorded_kernels(official_cases, backend):
    for case in (c for c in official_cases if c["ok"]):
        k, groups = case["kernel_size"], case["groups"]
        batch, _, out_h, out_w = case["kernel"].shape
        weight = case["kernel"].view(batch, groups, k, k, out_h, out_w)
        output = involution2d(case["input"], weight, stride=case["stride"], backend=backend)
        torch.testing.assert_close(output, case["output"], rtol=0, atol=1e-10)


def test_odd_sizes_with_stride_work_where_the_official_code_fails(official_cases):
    failing = [c for c in official_cases if not c["ok"]]
    assert len(failing) == 3
    for case in failing:
        module = _official_module(case)
        with torch.no_grad():
            kernels = module.generate_kernels(case["input"]).flatten(1, 3)
            output = module(case["input"])
        stride = case["stride"]
        expected_hw = (math.ceil(case["height"] / stride), math.ceil(case["width"] / stride))
        assert tuple(output.shape) == (case["batch"], case["channels"], *expected_hw)
        # Where the official floor-mode pooling saw whole windows, the kernels agree exactly.
        floor_h, floor_w = case["kernel"].shape[-2:]
        torch.testing.assert_close(
            kernels[..., :floor_h, :floor_w], case["kernel"], rtol=0, atol=1e-10
        )


def test_converter_rejects_foreign_keys():
    with pytest.raises(KeyError, match=r"conv3\.weight"):
        convert_official_involution_state_dict({"conv3.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": 24}, "not divisible by group_channels"),
        ({"channels": 32, "kernel_size": 4}, "must be odd"),
        ({"channels": 32, "stride": 0}, "stride must be a positive int"),
        ({"channels": 32, "dilation": -1}, "dilation must be a positive int"),
        ({"channels": 0}, "channels must be a positive int"),
        ({"channels": 32, "kernel_size": 3.0}, "kernel_size must be a positive int"),
        ({"channels": 2, "group_channels": 1, "reduction_ratio": 4}, "smaller than reduction"),
    ],
)
def test_constructor_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Involution2d(**kwargs)


@pytest.mark.parametrize(("stride", "dilation"), [(1, 1), (2, 1), (1, 2), (3, 2)])
@pytest.mark.parametrize(("height", "width"), [(9, 8), (7, 7), (10, 5)])
def test_output_shape_and_gradients(stride, dilation, height, width):
    torch.manual_seed(0)
    module = Involution2d(8, kernel_size=3, stride=stride, dilation=dilation, group_channels=4)
    x = torch.randn(2, 8, height, width, requires_grad=True)
    y = module(x)
    assert y.shape == (2, 8, math.ceil(height / stride), math.ceil(width / stride))
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, param in module.named_parameters():
        assert param.grad is not None, name


def test_backends_agree_on_module_and_channels_last():
    torch.manual_seed(0)
    module = Involution2d(32, kernel_size=7, stride=2).double()
    x = torch.randn(2, 32, 11, 10, dtype=torch.float64)
    module.backend = "reference"
    expected = module(x)
    module.backend = "auto"
    torch.testing.assert_close(module(x), expected)
    module = module.to(memory_format=torch.channels_last)
    output = module(x.to(memory_format=torch.channels_last))
    assert output.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(output, expected)


def test_custom_norm_and_activation_layers():
    module = Involution2d(16, kernel_size=3, norm_layer=nn.Identity, act_layer=nn.GELU)
    assert isinstance(module.act, nn.GELU) and isinstance(module.norm, nn.Identity)
    assert module(torch.randn(1, 16, 5, 5)).shape == (1, 16, 5, 5)
