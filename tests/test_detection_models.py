"""RedNet detectors on torchvision's RetinaNet / Faster R-CNN / Mask R-CNN: the official
architecture (parameter counts and FLOPs against the official table), train and eval steps,
gradients into every involution, frozen stages and BN statistics, checkpoint loading."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.misc import FrozenBatchNorm2d

from involution.bench.detect import training_step
from involution.cli import main
from involution.models.detection import (
    DETECTION_MODELS,
    LastLevelP6P7FromC5,
    fasterrcnn_rednet50_fpn,
    fasterrcnn_rednet_fpn,
    maskrcnn_rednet_fpn,
    rednet_fpn_backbone,
    retinanet_rednet_fpn,
)
from involution.models.detection.complexity import OFFICIAL_FIGURES, DetectorComplexityView
from involution.models.profile import profile_model
from involution.models.rednet import MODEL_DEPTHS
from involution.ops import Involution2d

CONFORMANCE = Path(__file__).resolve().parents[1].parent / "shared" / "conformance"
COCO_CLASSES = 80
#: A RedNet small enough for CPU train steps (stem involution: 16 channels, one group).
SMALL = dict(layers=(1, 1, 1, 1), stage_widths=(16, 16, 32, 32), stem_width=32)
#: Small images, few proposals, sampled RoIs and detections: a step takes well under a
#: second. The RPN samples every anchor, so each FPN level (P5's output conv included) gets a
#: gradient whatever the seed.
FAST = dict(num_classes=4, backbone_kwargs=SMALL, fpn_channels=32, min_size=128, max_size=192)
FAST_RCNN = dict(
    FAST,
    rpn_batch_size_per_image=100_000,
    rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=50,
    box_batch_size_per_image=16,
    box_detections_per_img=8,
)
FAST_RETINANET = dict(FAST, topk_candidates=100, detections_per_img=8)
BUILDERS: dict[str, tuple[Callable[..., nn.Module], dict]] = {
    "retinanet": (retinanet_rednet_fpn, FAST_RETINANET),
    "fasterrcnn": (fasterrcnn_rednet_fpn, FAST_RCNN),
    "maskrcnn": (maskrcnn_rednet_fpn, FAST_RCNN),
}
VARIANTS = [
    ("retinanet", {}),
    ("retinanet", {"involution_neck": True}),
    ("fasterrcnn", {}),
    ("fasterrcnn", {"involution_neck": True}),
    ("fasterrcnn", {"involution_neck": True, "involution_head": True}),
    ("maskrcnn", {}),
    ("maskrcnn", {"involution_neck": True}),
    ("maskrcnn", {"involution_neck": True, "involution_head": True}),
]
IMAGE_SIZES = [(128, 160), (176, 144)]


def _num_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@pytest.mark.parametrize("name", sorted(OFFICIAL_FIGURES))
def test_parameter_counts_match_the_official_table(name: str) -> None:
    with torch.device("meta"):
        model = DETECTION_MODELS[name](num_classes=COCO_CLASSES + 1)
    official = OFFICIAL_FIGURES[name].params_m * 1e6
    # Every parameter: within 1.5% (0.3-0.7% above: the frozen stem and layer1, 139k).
    assert abs(_num_params(model) / official - 1) < 0.015
    # mmcv counts trainable parameters only: then within the table's rounding to 0.1M
    # (what remains: torchvision's background class in RetinaNet's classifier and 4 more box
    # regression outputs).
    assert abs(_num_params(model, trainable_only=True) / official - 1) < 0.002


@pytest.mark.parametrize(
    "name",
    [
        "fasterrcnn_rednet50_fpn_inv_neck",
        "maskrcnn_rednet50_fpn_inv_neck_head",
    ],
)
def test_flops_at_1280x800_match_the_official_table(name: str) -> None:
    profile = profile_model(
        lambda: DetectorComplexityView(DETECTION_MODELS[name](num_classes=COCO_CLASSES + 1)),
        input_size=(1280, 800),
        stage_of=lambda child: child,
    )
    assert abs(profile.total.macs_elementwise / 1e9 / OFFICIAL_FIGURES[name].gflops - 1) < 0.005
    with torch.device("meta"):
        detector = DETECTION_MODELS[name](num_classes=COCO_CLASSES + 1)
    assert profile.total.params == _num_params(detector)  # the view holds the whole detector


def test_profile_cli_compares_with_the_official_table(capsys: pytest.CaptureFixture) -> None:
    name = "retinanet_rednet50_fpn_inv_neck"
    assert main(["profile", name, "--input-size", "1280", "800", "--num-classes", "81"]) == 0
    out = capsys.readouterr().out
    for row in ("backbone", "neck", "head", "total"):
        assert f"| {row} |" in out
    # 26.27M trainable (-0.1%) of 26.41M; 200.2 GMACs (+0.2%: RetinaNet's 81st class).
    assert "official (1280x800, 80 classes): 26.3M" in out
    assert "ours 26.27M trainable (-0.1%) of 26.41M" in out
    assert "GMACs with element-wise ops counted as mmcv does (+0.2%)" in out


def test_bench_detect_runs_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    models = "retinanet_resnet50_fpn,retinanet_rednet50_fpn"
    argv = ["bench", "detect", "--models", models, "--sizes", "64x96", "--repeats", "1"]
    assert main([*argv, "--warmup", "0", "--json", str(tmp_path / "detect.json")]) == 0
    out = capsys.readouterr().out
    assert "| retinanet_rednet50_fpn | 64 x 96 |" in out
    records = json.loads((tmp_path / "detect.json").read_text())["results"]
    assert [(r["model"], r["mode"]) for r in records] == [
        ("retinanet_resnet50_fpn", "infer"),
        ("retinanet_rednet50_fpn", "infer"),
        ("retinanet_resnet50_fpn", "network"),
        ("retinanet_rednet50_fpn", "network"),
    ]
    assert all(r["median_ms"] > 0 and r["cpu_ms"] > 0 for r in records)


def test_bench_training_step_updates_the_weights() -> None:
    # The CUDA training benchmark's step, run here on CPU with a small Mask R-CNN.
    torch.manual_seed(0)
    model = maskrcnn_rednet_fpn(26, **FAST_RCNN, involution_neck=True, involution_head=True)
    before = model.roi_heads.mask_head[0][0].span.weight.clone()
    training_step(model, 96, 128, 2, torch.device("cpu"), num_classes=4)()
    assert not torch.equal(model.roi_heads.mask_head[0][0].span.weight, before)


def _targets(sizes: list[tuple[int, int]], masks: bool) -> list[dict[str, Tensor]]:
    targets = []
    for height, width in sizes:
        boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [30.0, 40.0, 110.0, 120.0]])
        target = {"boxes": boxes, "labels": torch.tensor([1, 3])}
        if masks:
            target["masks"] = torch.zeros(2, height, width, dtype=torch.uint8)
            for index, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                target["masks"][index, y0:y1, x0:x1] = 1
        targets.append(target)
    return targets


def _involutions(model: nn.Module, prefix: str) -> dict[str, Involution2d]:
    return {
        name: module
        for name, module in model.named_modules()
        if name.startswith(prefix) and isinstance(module, Involution2d)
    }


@pytest.mark.parametrize(("detector", "flags"), VARIANTS)
def test_train_and_eval_steps_reach_every_involution(detector: str, flags: dict) -> None:
    torch.manual_seed(0)
    build, kwargs = BUILDERS[detector]
    model = build(26, **kwargs, **flags)
    images = [torch.rand(3, height, width) for height, width in IMAGE_SIZES]

    losses = model(images, _targets(IMAGE_SIZES, masks=detector == "maskrcnn"))
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()

    body = _involutions(model, "backbone.body.")
    assert len(body) == 1 + sum(SMALL["layers"])  # the stem's and one per block
    for name, layer in body.items():
        frozen = name.startswith(("backbone.body.stem", "backbone.body.layer1"))
        assert (layer.span.weight.grad is None) == frozen, name
    heads = {**_involutions(model, "backbone.fpn."), **_involutions(model, "rpn.")}
    heads |= _involutions(model, "roi_heads.")
    expected = 0
    if flags.get("involution_neck"):
        expected += 3 if detector == "retinanet" else 4
    if flags.get("involution_head"):
        expected += 1 + (4 if detector == "maskrcnn" else 0)
    assert len(heads) == expected
    for name, layer in heads.items():
        assert layer.span.weight.grad is not None and layer.span.weight.grad.abs().sum() > 0, name

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    for output, (height, width) in zip(outputs, IMAGE_SIZES, strict=True):
        count = len(output["boxes"])
        assert output["boxes"].shape == (count, 4)
        assert output["scores"].shape == output["labels"].shape == (count,)
        if detector == "maskrcnn":
            assert output["masks"].shape == (count, 1, height, width)


@pytest.mark.parametrize(("trainable_stages", "norm_eval"), [(3, True), (5, False)])
def test_frozen_stages_and_statistics_survive_an_optimizer_step(
    trainable_stages: int, norm_eval: bool
) -> None:
    torch.manual_seed(0)
    model = fasterrcnn_rednet_fpn(
        26,
        **FAST_RCNN,
        involution_neck=True,
        trainable_stages=trainable_stages,
        norm_eval=norm_eval,
    )
    model.train()
    body = model.backbone.body
    before = {name: value.clone() for name, value in body.state_dict().items()}
    neck_stats = model.backbone.fpn.layer_blocks[0].norm.running_mean.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    images = [torch.rand(3, height, width) for height, width in IMAGE_SIZES]
    sum(model(images, _targets(IMAGE_SIZES, masks=False)).values()).backward()
    optimizer.step()

    after = body.state_dict()
    frozen = ("stem.", "layer1.") if trainable_stages == 3 else ()
    for name, value in before.items():
        is_statistic = "running_" in name or "num_batches_tracked" in name
        if name.startswith(frozen) or (norm_eval and is_statistic):
            assert torch.equal(after[name], value), f"{name} changed"
    # (RedNet zero-initialises each block's last BN: at the first step only that BN and the
    # shortcut of the residual branch get a gradient.)
    for name in ("layer2.0.downsample.0.weight", "layer2.0.bn3.weight", "layer4.0.bn3.weight"):
        assert not torch.equal(after[name], before[name]), f"{name} did not train"
    # BN affine weights of the trainable stages learn while their statistics stay (mmdet's
    # norm_eval); without norm_eval the statistics move too.
    stem_stats_moved = not torch.equal(
        after["stem.bn1.running_mean"], before["stem.bn1.running_mean"]
    )
    assert stem_stats_moved == (not norm_eval and trainable_stages == 5)
    assert all(not p.requires_grad for p in body.stem.parameters()) == (trainable_stages < 5)
    # The neck is not the backbone: its involutions' BN trains as in the official neck.
    assert not torch.equal(model.backbone.fpn.layer_blocks[0].norm.running_mean, neck_stats)


def test_frozen_bn_body_is_torchvisions_and_its_involutions_regenerate() -> None:
    torch.manual_seed(0)
    small = dict(SMALL, frozen_bn=True)
    model = retinanet_rednet_fpn(26, **dict(FAST_RETINANET, backbone_kwargs=small)).train()
    body = model.backbone.body
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules()) > 0
    involutions = [m for m in body.modules() if isinstance(m, Involution2d)]
    assert involutions and all(m.regeneration_applies() for m in involutions)
    images = [torch.rand(3, height, width) for height, width in IMAGE_SIZES]
    sum(model(images, _targets(IMAGE_SIZES, masks=False)).values()).backward()
    assert body.layer4[0].conv2.span.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("norm_layer", [nn.BatchNorm2d, FrozenBatchNorm2d])
def test_official_classification_checkpoint_loads_with_one_warning(norm_layer: type) -> None:
    path = CONFORMANCE / "rednet26_official_random.pth"
    if not path.exists():
        pytest.skip(f"official conformance data not found at {path}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fasterrcnn_rednet_fpn(
            26, num_classes=3, backbone_weights=path, backbone_kwargs={"norm_layer": norm_layer}
        )
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    for key in ("stem.inv.span.weight", "stem.inv.span.bias", "fc.weight", "fc.bias"):
        assert key in messages[0]
    official = torch.load(path, weights_only=True)["state_dict"]
    loaded = model.backbone.body.state_dict()
    assert torch.equal(
        loaded["layer3.3.conv2.span.weight"],
        official["backbone.layer3.3.conv2.conv2.conv.weight"].float(),
    )
    assert torch.equal(loaded["stem.conv1.weight"], official["backbone.stem.0.conv.weight"].float())
    assert loaded["stem.inv.span.weight"].shape[0] == 2 * 7 * 7  # the detection stem, K = 7
    statistic = "layer4.0.bn3.running_var"  # a buffer in both norm layers
    assert torch.equal(loaded[statistic], official[f"backbone.{statistic}"].float())


def test_retinanet_takes_p6_from_c5_even_when_c5_has_the_fpn_width() -> None:
    # C5 = 4 * 16 = 64 channels = fpn_channels: torchvision's own block would switch to P5.
    small = dict(SMALL, stage_widths=(16, 16, 32, 16))
    kwargs = dict(FAST_RETINANET, backbone_kwargs=small, fpn_channels=64)
    model = retinanet_rednet_fpn(26, **kwargs).eval()
    extra = model.backbone.fpn.extra_blocks
    assert isinstance(extra, LastLevelP6P7FromC5) and not extra.use_P5
    seen: dict[str, Tensor] = {}
    model.backbone.body.register_forward_hook(lambda m, a, out: seen.update(c5=out["2"]))
    extra.p6.register_forward_hook(lambda m, args, out: seen.update(p6_input=args[0]))
    with torch.no_grad():
        model.backbone(torch.rand(1, 3, 128, 128))
    assert seen["p6_input"] is seen["c5"]


def test_backbone_is_a_torchvision_backbone_with_fpn() -> None:
    backbone = rednet_fpn_backbone(26, backbone_kwargs=SMALL, fpn_channels=32)
    assert isinstance(backbone, BackboneWithFPN) and backbone.out_channels == 32
    with torch.no_grad():
        features = backbone.eval()(torch.rand(2, 3, 96, 64))
    assert {name: tuple(f.shape) for name, f in features.items()} == {
        "0": (2, 32, 24, 16),
        "1": (2, 32, 12, 8),
        "2": (2, 32, 6, 4),
        "3": (2, 32, 3, 2),
        "pool": (2, 32, 2, 1),
    }


def test_registry_holds_every_depth_and_the_resnet50_baselines() -> None:
    for depth in MODEL_DEPTHS:
        for name in ("retinanet", "fasterrcnn", "maskrcnn"):
            assert f"{name}_rednet{depth}_fpn_inv_neck" in DETECTION_MODELS
    assert "retinanet_rednet50_fpn_inv_neck_head" not in DETECTION_MODELS
    classes = {"retinanet": RetinaNet, "fasterrcnn": FasterRCNN, "maskrcnn": MaskRCNN}
    for detector, cls in classes.items():
        with torch.device("meta"):
            ours = DETECTION_MODELS[f"{detector}_rednet50_fpn"](num_classes=81)
            baseline = DETECTION_MODELS[f"{detector}_resnet50_fpn"](num_classes=81)
        assert type(ours) is type(baseline) is cls
        # Same detector: only the backbone body differs.
        ours_rest = {k for k in ours.state_dict() if not k.startswith("backbone.body.")}
        assert ours_rest == {k for k in baseline.state_dict() if not k.startswith("backbone.body.")}
    with torch.device("meta"):
        assert type(fasterrcnn_rednet50_fpn(num_classes=3)) is FasterRCNN


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: retinanet_rednet_fpn(26, **FAST, involution_head=True), "no involution-head"),
        (
            lambda: fasterrcnn_rednet_fpn(
                26, **FAST_RCNN, involution_head=True, rpn_head=nn.Identity()
            ),
            "rpn_head",
        ),
        (lambda: fasterrcnn_rednet_fpn(26, **FAST, trainable_stages=6), "trainable_stages"),
        (
            lambda: rednet_fpn_backbone(26, backbone_kwargs=SMALL, returned_layers=(0, 1)),
            "returned_layers",
        ),
        (lambda: rednet_fpn_backbone(27), "depth"),
        (
            lambda: rednet_fpn_backbone(
                26, backbone_kwargs=dict(SMALL, frozen_bn=True, norm_layer=nn.BatchNorm2d)
            ),
            "frozen_bn",
        ),
    ],
)
def test_bad_arguments_are_refused(build: Callable[[], nn.Module], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()
