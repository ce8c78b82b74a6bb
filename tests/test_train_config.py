"""Training configs: shipped files, inheritance, dotted overrides and clear errors."""

from __future__ import annotations

import pytest

from involution.train.config import (
    DEFAULT_CONFIG_NAME,
    load_config,
    parse_override,
    shipped_configs,
)


def test_default_config_is_fashion_mnist_compact_rednet() -> None:
    config = load_config(DEFAULT_CONFIG_NAME)
    assert config["model"]["name"] == "rednet_compact"
    assert config["data"]["dataset"] == "fashion_mnist"
    conv = load_config("fashion_mnist_conv")
    assert conv["model"]["name"] == "rednet_compact_conv"
    # The twin changes the model only.
    assert {k: v for k, v in conv.items() if k != "model"} == {
        k: v for k, v in config.items() if k != "model"
    }


@pytest.mark.parametrize("depth", [26, 38, 50, 101, 152])
def test_imagenet_configs_hold_the_official_recipe(depth: int) -> None:
    config = load_config(f"imagenet_rednet{depth}.yaml")
    train, data = config["train"], config["data"]
    assert config["model"]["name"] == f"rednet{depth}"
    assert (train["optimizer"], train["momentum"], train["nesterov"]) == ("sgd", 0.9, True)
    assert (train["lr"], train["lr_base_batch"], train["weight_decay"]) == (0.8, 2048, 1e-4)
    assert (train["epochs"], train["warmup_epochs"], train["label_smoothing"]) == (130, 5.0, 0.1)
    assert (data["augment"], data["image_size"], data["eval_resize"]) == (
        "random_resized_crop",
        224,
        256,
    )


def test_every_shipped_config_loads() -> None:
    names = shipped_configs()
    assert DEFAULT_CONFIG_NAME in names
    for name in names:
        load_config(name)


def test_overrides_are_parsed_as_yaml_and_type_checked() -> None:
    config = load_config(
        None,
        ["train.lr=1e-2", "train.epochs=7", "data.mean=[0.5]", "model.kwargs.stem_width=16"],
    )
    assert config["train"]["lr"] == 0.01 and isinstance(config["train"]["lr"], float)
    assert config["train"]["epochs"] == 7
    assert config["data"]["mean"] == [0.5]
    assert config["model"]["kwargs"] == {"stem_width": 16}
    # Ints are accepted for floats and promoted.
    assert load_config(None, ["train.lr=1"])["train"]["lr"] == 1.0
    assert parse_override("output.name=") == ("output.name", None)


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ("train.lrr=0.1", KeyError, "unknown config key 'train.lrr'.*known keys"),
        ("nosection.x=1", KeyError, "unknown config key 'nosection'"),
        ("train.epochs=three", TypeError, "'train.epochs' expects int"),
        ("train.nesterov=1", TypeError, "expects bool"),
        ("train=3", TypeError, "must be a mapping"),
        ("train.amp=fp8", ValueError, "must be one of"),
        ("train.batch_size=0", ValueError, "must be positive"),
        ("train.ema_decay=1.5", ValueError, "ema_decay"),
        ("train.lr", ValueError, "section.key=value"),
        ("train.lr=[1", ValueError, "not valid YAML"),
    ],
)
def test_bad_overrides_raise_clear_errors(override: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        load_config(None, [override])


def test_base_inheritance_and_file_errors(tmp_path) -> None:
    parent = tmp_path / "parent.yaml"
    parent.write_text("train:\n  epochs: 9\n  lr: 0.5\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\ntrain:\n  lr: 0.25\n")
    config = load_config(child)
    assert (config["train"]["epochs"], config["train"]["lr"]) == (9, 0.25)
    # A file may also inherit a shipped config by name.
    shipped_child = tmp_path / "conv.yaml"
    shipped_child.write_text("base: imagenet_rednet26\n")
    assert load_config(shipped_child)["model"]["name"] == "rednet26"

    cycle = tmp_path / "cycle.yaml"
    cycle.write_text("base: cycle.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(cycle)
    with pytest.raises(FileNotFoundError, match=r"not found.*shipped"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping at top level"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  epoch: 3\n")
    with pytest.raises(KeyError, match=r"train\.epoch"):
        load_config(typo)
