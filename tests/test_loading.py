"""The one model loader: a registered name, a weights file, a converted checkpoint, a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from involution.models.convert import convert_checkpoint
from involution.models.loading import create_model, is_known_model
from involution.train.loading import load_model


def test_a_name_gives_the_model_and_its_input() -> None:
    loaded = load_model(name="rednet_compact")
    assert not loaded.model.training
    assert (loaded.in_chans, loaded.input_size) == (1, (28, 28))
    assert loaded.config is None and loaded.classes is None
    assert loaded.transform is not None


def test_weights_size_the_classifier_and_must_fit(tmp_path: Path) -> None:
    source = timm.create_model("rednet_compact", num_classes=3)
    weights = tmp_path / "compact.safetensors"
    save_file(source.state_dict(), weights)
    model = create_model("rednet_compact", weights)
    assert model.fc.out_features == 3
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="does not match the model"):
        create_model("rednet_compact_conv", weights)


def test_names_from_timm_torchvision_and_the_task_models() -> None:
    assert is_known_model("rednet26") and is_known_model("torchvision:resnet18")
    assert is_known_model("torchvision.resnet18") and is_known_model("upernet_rednet50")
    assert not is_known_model("torchvision.rednet26") and not is_known_model("rednet7")
    assert create_model("torchvision:resnet18", num_classes=3).fc.out_features == 3
    with pytest.raises(ValueError, match="unknown model 'rednet7'"):
        create_model("rednet7")


def test_a_converted_checkpoint_alone(tmp_path: Path) -> None:
    source = timm.create_model("rednet_compact", num_classes=4)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "compact.pth")
    convert_checkpoint(tmp_path / "compact.pth", tmp_path / "compact.safetensors")
    loaded = load_model(weights=tmp_path / "compact.safetensors")
    assert loaded.in_chans == 1 and loaded.model.fc.out_features == 4
    assert loaded.name == "compact"


def test_what_cannot_be_loaded_says_why(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give one of"):
        load_model()
    with pytest.raises(ValueError, match="give one of"):
        load_model(run=tmp_path, name="rednet26")
    with pytest.raises(FileNotFoundError, match="not a training run directory"):
        load_model(run=tmp_path / "none")
    plain = tmp_path / "plain.safetensors"
    save_file(timm.create_model("rednet_compact").state_dict(), plain)
    with pytest.raises(ValueError, match="carries no training config: pass --config"):
        load_model(weights=plain)
