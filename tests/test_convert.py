"""Official RedNet checkpoints: conversion, outputs against the official model, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

import involution  # noqa: F401  (registers the models with timm)
from involution.cli import main
from involution.models import MODEL_DEPTHS, RedNet
from involution.models.convert import (
    CheckpointMismatchError,
    check_state_dict,
    convert_official_state_dict,
    infer_rednet_kwargs,
    load_checkpoint,
    load_official_checkpoint,
    read_state_dict,
    rednet_from_checkpoint,
)

CONFORMANCE = Path(__file__).resolve().parents[1].parent / "shared" / "conformance"
CHECKPOINT = CONFORMANCE / "rednet26_official_random.pth"
IO = CONFORMANCE / "rednet26_official_io.pt"
SCHEMA = CONFORMANCE / "rednet_state_dict_schema.json"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"official conformance data not found at {path}")
    return path


@pytest.fixture(scope="module")
def official_state_dict() -> dict[str, torch.Tensor]:
    return read_state_dict(_require(CHECKPOINT))


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(_require(SCHEMA).read_text())


@pytest.fixture(scope="module")
def rednet26_outputs() -> tuple[dict, dict[str, torch.Tensor]]:
    """The recorded official outputs and ours, from one float64 forward of both samples."""
    expected = torch.load(_require(IO), weights_only=True)
    model = rednet_from_checkpoint(_require(CHECKPOINT)).double().eval()
    captured: dict[str, torch.Tensor] = {}
    for name in ("stem", "layer1", "layer2", "layer3", "layer4", "global_pool"):
        getattr(model, name).register_forward_hook(
            lambda module, args, output, name=name: captured.__setitem__(name, output)
        )
    with torch.no_grad():
        captured["logits"] = model(expected["input"].double())
    return expected, captured


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-9)


def test_rednet26_reproduces_official_logits(rednet26_outputs) -> None:
    expected, ours = rednet26_outputs
    _close(ours["logits"], expected["logits"])
    _close(ours["global_pool"], expected["pooled"])


def test_rednet26_reproduces_official_stem_and_stages(rednet26_outputs) -> None:
    expected, ours = rednet26_outputs
    index = expected["features_batch_index"]
    _close(ours["stem"][index : index + 1], expected["stem"])
    for stage, reference in enumerate(expected["features"], start=1):
        _close(ours[f"layer{stage}"][index : index + 1], reference)


@pytest.mark.parametrize(
    "name",
    ["rednet26", "rednet38", "rednet50", "rednet101", "rednet152", "rednet50_det_stem7"],
)
def test_schema_keys_convert_one_to_one(schema: dict, name: str) -> None:
    official = {
        key: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
        for key, shape, dtype in schema["models"][name]
    }
    converted = convert_official_state_dict(official)
    assert len(converted) == len(official)  # no two official keys collapse into one
    kwargs = infer_rednet_kwargs(converted)
    depth = int(name.removeprefix("rednet").split("_")[0])
    assert kwargs["layers"] == MODEL_DEPTHS[depth]
    assert kwargs["stem_kernel_size"] == (7 if name.endswith("stem7") else 3)
    assert kwargs["num_classes"] == (0 if name.endswith("stem7") else 1000)
    with torch.device("meta"):
        model = RedNet.from_kwargs(kwargs)
    check_state_dict(converted, model)  # every key of ours filled, with the right shape
    params = sum(p.numel() for p in model.parameters())
    assert params == schema["param_counts"][name]["params_total"]


def test_cli_convert_then_timm_pretrained(tmp_path: Path, official_state_dict) -> None:
    dst = tmp_path / "rednet26.safetensors"
    assert main(["convert", str(_require(CHECKPOINT)), str(dst)]) == 0
    with safe_open(str(dst), "pt") as handle:
        assert json.loads(handle.metadata()["rednet_kwargs"])["layers"] == [1, 2, 4, 1]
    converted = convert_official_state_dict(official_state_dict)
    from_file = timm.create_model(
        "rednet26", pretrained=True, pretrained_cfg_overlay={"file": str(dst)}
    )
    # timm also accepts the official file directly, through the model's filter function.
    from_official = timm.create_model(
        "rednet26", pretrained=True, pretrained_cfg_overlay={"file": str(CHECKPOINT)}
    )
    for model in (from_file, from_official):
        state = model.state_dict()
        for key, value in converted.items():
            assert torch.equal(state[key], value.to(state[key].dtype)), key


def test_load_official_checkpoint_into_model(official_state_dict) -> None:
    model = load_official_checkpoint(RedNet(MODEL_DEPTHS[26]), _require(CHECKPOINT))
    value = official_state_dict["backbone.layer3.2.conv2.conv2.conv.bias"]
    assert torch.equal(model.layer3[2].conv2.span.bias, value.float())


def test_wrong_depth_lists_missing_and_unexpected_keys() -> None:
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(RedNet(MODEL_DEPTHS[38], num_classes=10), _require(CHECKPOINT))
    error = info.value
    assert "layer1.1.conv1.weight" in error.missing
    assert ("fc.weight", (1000, 2048), (10, 2048)) in error.mismatched
    assert "layer1.1.conv1.weight" in str(error) and "fc.weight" in str(error)

    model = RedNet(MODEL_DEPTHS[26])
    with_extra_block = dict(model.state_dict())
    with_extra_block["layer1.1.conv1.weight"] = torch.empty(1)
    with pytest.raises(CheckpointMismatchError, match=r"layer1\.1\.conv1\.weight") as info:
        check_state_dict(with_extra_block, model)
    assert info.value.unexpected == ["layer1.1.conv1.weight"]


def test_truncated_state_dict_names_the_missing_keys(tmp_path: Path, official_state_dict) -> None:
    keys = list(official_state_dict)
    partial = {key: official_state_dict[key] for key in keys[:-5]}
    path = tmp_path / "partial.pth"
    torch.save({"meta": {}, "state_dict": partial}, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(RedNet(MODEL_DEPTHS[26]), path)
    assert "fc.bias" in info.value.missing and "layer4.0.downsample.1.running_var" in str(
        info.value
    )


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    data = _require(CHECKPOINT).read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        rednet_from_checkpoint(path)


def test_foreign_checkpoint_lists_unknown_keys(tmp_path: Path) -> None:
    # An mmcls ResNet-50 has the same prefixes but a plain conv2 and a conv1/bn1 stem.
    foreign = {
        "backbone.conv1.weight": torch.zeros(64, 3, 7, 7),
        "backbone.bn1.weight": torch.zeros(64),
        "backbone.layer1.0.conv2.weight": torch.zeros(64, 64, 3, 3),
        "head.fc.weight": torch.zeros(1000, 2048),
    }
    path = tmp_path / "resnet50.pth"
    torch.save({"state_dict": foreign}, path)
    with pytest.raises(CheckpointMismatchError) as info:
        rednet_from_checkpoint(path)
    assert info.value.unexpected == list(foreign)[:3]
    ours = tmp_path / "ours.pth"
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, ours)
    with pytest.raises(ValueError, match="not an official"):
        load_official_checkpoint(RedNet(MODEL_DEPTHS[26]), ours)


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="no state dict"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "missing.pth")
    assert main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 2
