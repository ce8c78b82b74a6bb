"""Training configs: shipped files, inheritance, dotted overrides and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from involution.train.config import (
    DEFAULT_CONFIG_NAME,
    dump_config,
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


def test_unknown_key_error_is_one_line_naming_the_key(tmp_path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("data:\n  scenes:\n    itemz: [2, 3]\n")
    with pytest.raises(KeyError) as info:
        load_config(typo)
    message = info.value.args[0]
    assert "\n" not in message
    assert message.startswith("unknown config key 'data.scenes.itemz' in section 'data.scenes'")
    assert "known keys: items, max_overlap" in message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=three", "config key 'train.epochs' expects int, got 'three' (str)"),
        # OmegaConf alone would read 1 as True and 5 as "5": the schema's types are kept strict.
        ("train.nesterov=1", "config key 'train.nesterov' expects bool, got 1 (int)"),
        ("output.name=5", "config key 'output.name' expects str | None, got 5 (int)"),
        ("train.epochs=null", "config key 'train.epochs' expects int, got None (NoneType)"),
        ("data.mean=[a]", "config key 'data.mean' expects list[float] | None, got ['a'] (list)"),
        ("data.scenes.items=[2, 3.5]", "'data.scenes.items' expects list[int], got [2, 3.5]"),
        ("train.lr={a: 1}", "config key 'train.lr' expects float, got {'a': 1} (dict)"),
        ("model.kwargs=null", "config key 'model.kwargs' must be a mapping, got None"),
    ],
)
def test_wrong_type_error_names_key_type_and_value(override: str, message: str) -> None:
    with pytest.raises(TypeError) as info:
        load_config(None, [override])
    assert message in info.value.args[0] and "\n" not in info.value.args[0]


def test_values_are_promoted_only_to_float() -> None:
    config = load_config(None, ["train.grad_clip=5", "train.milestones=[2, 4.5]"])
    assert config["train"]["grad_clip"] == 5.0 and isinstance(config["train"]["grad_clip"], float)
    # Milestones keep ints as ints (int | float).
    assert [type(m) for m in config["train"]["milestones"]] == [int, float]


def test_base_chain_merges_deeply_and_reports_cycles(tmp_path) -> None:
    (tmp_path / "a.yaml").write_text(
        "model:\n  kwargs:\n    inner: {x: 1, y: 2}\ntrain:\n  lr: 0.5\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text(
        "base: ../a.yaml\nmodel:\n  kwargs:\n    inner: {y: 3}\n"
    )
    (tmp_path / "c.yaml").write_text("base: sub/b.yaml\ntrain:\n  epochs: 4\n")
    config = load_config(tmp_path / "c.yaml", ["model.kwargs.inner.z=4"])
    assert config["model"]["kwargs"] == {"inner": {"x": 1, "y": 3, "z": 4}}
    assert (config["train"]["lr"], config["train"]["epochs"]) == (0.5, 4)

    (tmp_path / "d.yaml").write_text("base: e.yaml\n")
    (tmp_path / "e.yaml").write_text("base: d.yaml\n")
    with pytest.raises(ValueError, match=r"inheritance cycle: .*d\.yaml -> .*e\.yaml -> .*d\.yaml"):
        load_config(tmp_path / "d.yaml")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("train.lr=1e-4", ("train.lr", 1e-4)),  # YAML 1.1 reads 1e-4 as a string
        ("train.lr=0.5", ("train.lr", 0.5)),
        (" data.root = /data/a=b", ("data.root", "/data/a=b")),
        ("train.nesterov=no", ("train.nesterov", False)),
        ("output.name=", ("output.name", None)),
        ("output.name=null", ("output.name", None)),
        ("output.name=nan", ("output.name", "nan")),
        ("segmentation.crop_size=[64, 96]", ("segmentation.crop_size", [64, 96])),
        ("model.kwargs.x={a: 1}", ("model.kwargs.x", {"a": 1})),
    ],
)
def test_parse_override(text: str, parsed: tuple[str, object]) -> None:
    assert parse_override(text) == parsed


def test_an_older_runs_config_dump_still_loads(tmp_path) -> None:
    """A run's config.yaml written before keys were added loads with their defaults, from the
    file (``train --resume``) and from weights metadata (``eval``, ``predict``)."""
    current = load_config("scenes_seg", ["output.name=old"])
    older = yaml.safe_load(dump_config(current))
    del older["segmentation"]["aux_weight"], older["train"]["sync_bn"], older["detection"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older, sort_keys=False))
    assert load_config(tmp_path / "config.yaml") == current
    assert load_config(None, base=older) == current
    resumed = load_config(tmp_path / "config.yaml", ["train.max_steps=null", "train.epochs=9"])
    assert resumed["train"]["epochs"] == 9
    assert dump_config(load_config(tmp_path / "config.yaml")) == dump_config(current)


def test_importing_the_cli_does_not_import_omegaconf() -> None:
    code = "import sys, involution.train.cli; assert 'omegaconf' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
