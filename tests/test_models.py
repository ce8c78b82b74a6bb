"""RedNet: architecture (parameter counts, stages, options) and the timm interface."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import involution  # noqa: F401  (registers the models with timm)
from involution import Involution2d
from involution.models import MODEL_DEPTHS, Bottleneck, RedNet, RedNetArch

#: Official totals with the 1000-class head (conformance README; official README for 26..101).
PARAM_COUNTS = {
    26: 9_233_166,
    38: 12_386_986,
    50: 15_540_806,
    101: 25_652_950,
    152: 33_984_582,
}


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth", sorted(PARAM_COUNTS))
def test_parameter_counts_match_official(depth: int) -> None:
    with torch.device("meta"):
        model = timm.create_model(f"rednet{depth}")
    assert _num_params(model) == PARAM_COUNTS[depth]
    assert model.num_features == 2048 and model.num_classes == 1000


def test_detection_backbone_parameter_count() -> None:
    with torch.device("meta"):
        model = RedNet(RedNetArch(MODEL_DEPTHS[50], stem_kernel_size=7), num_classes=0)
    assert _num_params(model) == 13_492_526
    assert isinstance(model.fc, nn.Identity)


def test_block_structure() -> None:
    with torch.device("meta"):
        model = timm.create_model("rednet26")
    first = model.layer2[0]
    assert isinstance(first.conv2, Involution2d)
    assert (first.conv2.stride, first.conv2.kernel_size, first.conv2.groups) == (2, 7, 8)
    assert first.downsample[0].stride == (2, 2)
    assert model.layer2[1].downsample is None
    assert model.stem.inv.kernel_size == 3 and model.stem.conv1.stride == (2, 2)
    assert model.pretrained_cfg["first_conv"] == "stem.conv1"
    assert model.pretrained_cfg["classifier"] == "fc"


def test_features_only_channels_and_strides() -> None:
    with torch.device("meta"):
        features = timm.create_model("rednet50", features_only=True, out_indices=(1, 2, 3, 4))
    assert features.feature_info.channels() == [256, 512, 1024, 2048]
    assert features.feature_info.reduction() == [4, 8, 16, 32]


def test_features_only_forward() -> None:
    model = timm.create_model("rednet26", features_only=True, in_chans=1)
    with torch.no_grad():
        outputs = model(torch.randn(1, 1, 64, 64))
    shapes = [tuple(o.shape) for o in outputs]
    channels = [64, 256, 512, 1024, 2048]
    assert shapes == [
        (1, c, 64 // r, 64 // r) for c, r in zip(channels, (2, 4, 8, 16, 32), strict=True)
    ]


def test_zero_init_last_makes_blocks_start_as_identity() -> None:
    block = Bottleneck(64, 32, stride=2).eval()
    block.bn3.weight.data.zero_()
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), torch.relu(block.downsample(x)))
    model = RedNet(RedNetArch((1, 1), stage_widths=(16, 32), stem_width=32), num_classes=3)
    bn3_weights = [m.bn3.weight for m in model.modules() if isinstance(m, Bottleneck)]
    assert all(torch.count_nonzero(w) == 0 for w in bn3_weights)
    other = RedNet(RedNetArch((1, 1), stage_widths=(16, 32), stem_width=32), zero_init_last=False)
    assert all(torch.all(m.bn3.weight == 1) for m in other.modules() if isinstance(m, Bottleneck))


def test_bottleneck_builds_its_spatial_layer_with_the_factory() -> None:
    calls = []

    def mixer_layer(channels: int, stride: int) -> nn.Module:
        calls.append((channels, stride))
        return Involution2d(channels, 3, stride=stride, group_channels=4)

    block = Bottleneck(16, 8, stride=2, mixer_layer=mixer_layer)
    assert calls == [(8, 2)]
    assert (block.conv2.kernel_size, block.conv2.groups) == (3, 2)
    assert block(torch.randn(1, 16, 9, 9)).shape == (1, 32, 5, 5)


@pytest.mark.parametrize("mixer", ["involution", "conv"])
def test_compact_stem_runs_on_28x28(mixer: str) -> None:
    arch = RedNetArch(
        (1, 2, 1), stage_widths=(16, 32, 64), stem_width=32, stem_type="compact", mixer=mixer
    )
    model = RedNet(arch, in_chans=1, num_classes=10)
    assert [info["reduction"] for info in model.feature_info] == [2, 2, 4, 8]
    assert isinstance(model.maxpool, nn.Identity)
    mixers = [m.conv2 for m in model.modules() if isinstance(m, Bottleneck)]
    expected = Involution2d if mixer == "involution" else nn.Conv2d
    assert all(type(m) is expected for m in mixers)
    model.train()
    logits = model(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 10)
    assert model.forward_features(torch.randn(1, 1, 28, 28)).shape == (1, 256, 4, 4)
    logits.sum().backward()
    assert model.stem.conv1.weight.grad is not None


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    arch = RedNetArch((1, 1), stage_widths=(16, 32), stem_width=32)
    model = RedNet(arch, num_classes=3, zero_init_last=False)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, checkpointed)


def test_timm_head_interface() -> None:
    model = timm.create_model("rednet26", num_classes=7, in_chans=2, drop_rate=0.1).eval()
    assert model.stem.conv1.in_channels == 2
    x = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (1, 2048, 2, 2)
        pre_logits = model.forward_head(features, pre_logits=True)
        torch.testing.assert_close(pre_logits, features.mean((2, 3)))
        torch.testing.assert_close(model.forward_head(features), model.fc(pre_logits))
        assert model(x).shape == (1, 7)
    assert model.get_classifier() is model.fc and model.get_classifier(name_only=True) == "fc"

    model.reset_classifier(4, global_pool="max")
    assert (model.num_classes, model.fc.out_features) == (4, 4)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_head(features, pre_logits=True), features.amax((2, 3))
        )
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (1, 2048)


def test_pretrained_file_loads_through_timm(tmp_path: Path) -> None:
    source = timm.create_model("rednet26", num_classes=5)
    nn.init.normal_(source.fc.weight)  # make sure a fresh model would differ
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    # num_classes in the overlay says the file's head has 5 classes (else timm drops it).
    overlay = dict(file=str(path), num_classes=5)
    loaded = timm.create_model("rednet26", pretrained=True, pretrained_cfg_overlay=overlay)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(layers=(1, 2)), "stages"),
        (dict(layers=(1, 0, 1, 1)), "positive ints"),
        (dict(layers=(1, 1, 1, 1), stem_type="tiny"), "stem_type"),
        (dict(layers=(1, 1, 1, 1), mixer="attention"), "mixer"),
        (dict(layers=(1, 1, 1, 1), num_classes=-1), "num_classes"),
        (dict(layers=(1, 1, 1, 1), drop_rate=1.0), "drop_rate"),
        (dict(layers=(1, 1, 1, 1), stem_width=33), "stem_width"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match), torch.device("meta"):
        RedNet.from_kwargs(kwargs)


def test_fused_flag_reaches_every_involution_and_keeps_outputs() -> None:
    torch.manual_seed(0)
    kwargs = dict(layers=(1, 1), stage_widths=(16, 32), stem_width=32, num_classes=3)
    plain = RedNet.from_kwargs({**kwargs, "zero_init_last": False}).eval()
    fused = RedNet.from_kwargs({**kwargs, "fused": True}).eval()
    fused.load_state_dict(plain.state_dict())
    assert all(m.fused for m in fused.modules() if isinstance(m, Involution2d))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x))


def test_forward_intermediates_match_the_feature_hooks() -> None:
    arch = RedNetArch((1, 1), stage_widths=(16, 32), stem_width=32)
    model = RedNet(arch, zero_init_last=False).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[1] for t in intermediates] == [32, 64, 128]
        torch.testing.assert_close(intermediates[0], model.stem(x))
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)
        torch.testing.assert_close(last[0], final)
        early = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert early[0].shape[1] == 64
    getter = timm.create_model("rednet26", features_only=True, feature_cls="getter")
    with torch.no_grad():
        shapes = [tuple(t.shape) for t in getter(torch.randn(1, 3, 64, 64))]
    assert shapes[-1] == (1, 2048, 2, 2) and len(shapes) == 5
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")
