"""Semantic FPN / UPerNet on RedNet: official parameter counts, shapes, training, smp encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from involution.cli import main
from involution.models.fpn import InvolutionFPN, load_backbone_weights, rednet_backbone
from involution.models.rednet import official_key_to_ours
from involution.models.segmentation import (
    OFFICIAL_CITYSCAPES,
    SEGMENTATION_MODELS,
    semantic_fpn_rednet,
    upernet_rednet,
    upernet_rednet50,
)
from involution.ops import Involution2d

CONFORMANCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "conformance"
# A narrow RedNet-26 so that every test model runs in well under a second on 2 CPU cores.
SMALL_BACKBONE = {"stage_widths": (16, 32, 64, 128), "stem_width": 32}
ODD_SIZE = (67, 45)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _small_semantic_fpn(involution_neck: bool, **backbone_kwargs: object) -> nn.Module:
    return semantic_fpn_rednet(
        26,
        num_classes=5,
        involution_neck=involution_neck,
        backbone_kwargs={**SMALL_BACKBONE, **backbone_kwargs},
        fpn_channels=32,
        head_channels=16,
    )


def _small_upernet(aux_head: bool) -> nn.Module:
    return upernet_rednet(
        26, num_classes=5, aux_head=aux_head, backbone_kwargs=SMALL_BACKBONE, head_channels=32
    )


@pytest.mark.parametrize("name", sorted(OFFICIAL_CITYSCAPES))
def test_parameter_counts_match_the_official_table(name: str) -> None:
    with torch.device("meta"):
        model = SEGMENTATION_MODELS[name](num_classes=19)
    official = OFFICIAL_CITYSCAPES[name]["params_m"] * 1e6
    assert abs(_num_params(model) / official - 1) < 0.015
    # The table rounds to 0.1M: ours must round to the same figure.
    assert round(_num_params(model) / 1e6, 1) == OFFICIAL_CITYSCAPES[name]["params_m"]


@pytest.mark.parametrize("name", sorted(OFFICIAL_CITYSCAPES))
def test_profile_flops_match_the_official_table(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """At 1024x2048 (mmseg's get_flops shape), counted as mmcv does, without the aux head
    (mmseg's forward_dummy runs backbone, neck and decode head only)."""
    args = ["profile", name, "--num-classes", "19", "--input-size", "1024", "2048", "--json"]
    assert main(args) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    assert set(rows) - {"aux_head"} == {"backbone", "decode_head", "total"} | (
        {"neck"} if name.startswith("semantic_fpn") else set()
    )
    aux = rows["aux_head"]["macs_elementwise"] if "aux_head" in rows else 0
    gmacs = (rows["total"]["macs_elementwise"] - aux) / 1e9
    assert abs(gmacs / OFFICIAL_CITYSCAPES[name]["gflops"] - 1) < 0.015
    assert main(["profile", name]) == 2  # segmentation models need --num-classes


def test_involution_neck_saves_what_the_table_says() -> None:
    """Each 3x3 FPN output conv (590,080 params) becomes a 7x7 involution (67,472)."""
    with torch.device("meta"):
        conv = SEGMENTATION_MODELS["semantic_fpn_rednet50"](num_classes=19)
        inv = SEGMENTATION_MODELS["semantic_fpn_rednet50_involution_neck"](num_classes=19)
    assert isinstance(inv.neck, InvolutionFPN)
    assert _num_params(conv) - _num_params(inv) == 4 * (256 * 256 * 9 + 256 - 67_472)
    assert sum(isinstance(m, Involution2d) for m in inv.neck.modules()) == 4


def test_upernet_count_includes_the_official_aux_head() -> None:
    with torch.device("meta"):
        model = upernet_rednet50(num_classes=19)
        plain = upernet_rednet50(num_classes=19, aux_head=False)
    # mmseg's auxiliary FCNHead: 3x3 conv 1024 -> 256 (no bias) + BN, 1x1 conv 256 -> 19.
    assert _num_params(model) - _num_params(plain) == 1024 * 256 * 9 + 2 * 256 + 256 * 19 + 19
    assert plain.aux_head is None


@pytest.mark.skipif(not CONFORMANCE.is_dir(), reason=f"conformance data not found at {CONFORMANCE}")
def test_backbone_is_the_official_detseg_rednet50() -> None:
    """Same keys and shapes as the official det/seg backbone (stem involution K=7)."""
    schema = json.loads((CONFORMANCE / "rednet_state_dict_schema.json").read_text())
    official = {
        official_key_to_ours(key): tuple(shape)
        for key, shape, _ in schema["models"]["rednet50_det_stem7"]
    }
    with torch.device("meta"):
        model = semantic_fpn_rednet(50, num_classes=19)
    ours = {
        key[len("backbone.") :]: tuple(value.shape)
        for key, value in model.state_dict().items()
        if key.startswith("backbone.")
    }
    assert ours == official


@pytest.mark.skipif(not CONFORMANCE.is_dir(), reason=f"conformance data not found at {CONFORMANCE}")
def test_classification_checkpoint_loads_except_the_stem_kernel_generator() -> None:
    path = CONFORMANCE / "rednet26_official_random.pth"
    with pytest.warns(UserWarning, match="stem.inv.span.weight"):
        backbone = rednet_backbone(26, weights=path)
    official = torch.load(path, weights_only=True)["state_dict"]
    loaded = backbone.state_dict()
    assert torch.equal(
        loaded["layer3.2.conv2.span.weight"],
        official["backbone.layer3.2.conv2.conv2.conv.weight"].float(),
    )
    assert loaded["stem.inv.span.weight"].shape[0] == 7 * 7 * 2


def test_checkpoint_of_another_depth_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rednet26.pth"
    torch.save(rednet_backbone(26, **SMALL_BACKBONE).state_dict(), path)
    with pytest.raises(ValueError, match="missing keys"):
        load_backbone_weights(rednet_backbone(38, **SMALL_BACKBONE), path)


@pytest.mark.parametrize("kwargs", [{"depth": 34}, {"num_classes": 10}])
def test_bad_backbone_arguments(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=r"depth|num_classes"):
        rednet_backbone(**kwargs)


@pytest.mark.parametrize(
    ("build", "keys"),
    [
        (lambda: _small_semantic_fpn(involution_neck=False), {"out"}),
        (lambda: _small_semantic_fpn(involution_neck=True), {"out"}),
        (lambda: _small_upernet(aux_head=True), {"out", "aux"}),
        (lambda: _small_upernet(aux_head=False), {"out"}),
    ],
    ids=["fpn-conv-neck", "fpn-involution-neck", "upernet-aux", "upernet"],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_logits_at_input_resolution_for_odd_sizes(build, keys: set[str], training: bool) -> None:
    torch.manual_seed(0)
    model = build().train(training)
    with torch.no_grad():
        result = model(torch.randn(2, 3, *ODD_SIZE))
    assert set(result) == keys
    for logits in result.values():
        assert logits.shape == (2, 5, *ODD_SIZE)
        assert torch.isfinite(logits).all()


def test_gradients_reach_every_involution() -> None:
    # zero_init_last=False: with each block's last BN at zero, no gradient enters the
    # residual branches on the first step.
    torch.manual_seed(0)
    model = _small_semantic_fpn(involution_neck=True, zero_init_last=False)
    target = torch.randint(0, 5, (2, 33, 35))
    F.cross_entropy(model(torch.randn(2, 3, 33, 35))["out"], target).backward()
    involutions = {n: m for n, m in model.named_modules() if isinstance(m, Involution2d)}
    assert sum(n.startswith("neck.") for n in involutions) == 4
    assert sum(n.startswith("backbone.") for n in involutions) == 1 + sum((1, 2, 4, 1))
    for name, module in involutions.items():
        for param_name, param in module.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{name}.{param_name}"


@pytest.mark.parametrize("build", [lambda: _small_semantic_fpn(True), lambda: _small_upernet(True)])
def test_train_steps_lower_the_loss(build) -> None:
    """The torchvision recipe: cross-entropy on "out" + 0.4 x "aux", ignore index 255."""
    torch.manual_seed(0)
    model = build().train()
    images = torch.randn(2, 3, 32, 48)
    target = torch.randint(0, 5, (2, 32, 48))
    target[:, :4] = 255
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(3):
        result = model(images)
        loss = F.cross_entropy(result["out"], target, ignore_index=255)
        if "aux" in result:
            loss = loss + 0.4 * F.cross_entropy(result["aux"], target, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_sync_batchnorm_conversion_reaches_every_norm() -> None:
    model = nn.SyncBatchNorm.convert_sync_batchnorm(_small_upernet(aux_head=True))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)


def test_rednet_is_an_smp_encoder() -> None:
    torch.manual_seed(0)
    # Extra keyword arguments go to timm.create_model: a narrow RedNet-26 keeps this quick.
    model = smp.Unet(
        "tu-rednet26",
        encoder_weights=None,
        classes=3,
        decoder_channels=(32, 16, 16, 16, 16),
        **SMALL_BACKBONE,
    )
    images = torch.randn(2, 3, 64, 64)
    logits = model(images)
    assert logits.shape == (2, 3, 64, 64)
    F.cross_entropy(logits, torch.randint(0, 3, (2, 64, 64))).backward()
    stem_span = model.encoder.model.stem.inv.span.weight
    assert stem_span.grad is not None and stem_span.grad.abs().sum() > 0
