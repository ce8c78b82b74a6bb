"""Segmentation metrics, inference, loss, and train -> eval -> predict through the CLI."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor, nn
from torchmetrics.classification import MulticlassJaccardIndex

from involution.cli import main
from involution.datasets.fashion_mnist import find_fashion_mnist
from involution.datasets.segmentation import IGNORE_INDEX, SegmentationBatch
from involution.metrics.segmentation import (
    confusion_matrix_metric,
    iou_table,
    segmentation_scores,
)
from involution.train.checkpoint import read_jsonl
from involution.train.config import load_config
from involution.train.tasks import get_task
from involution.train.tasks.segmentation import (
    Inference,
    pixel_cross_entropy,
    sliding_window_logits,
    window_starts,
)

# ----------------------------------------------------------------------------- metrics


def test_scores_of_a_hand_checked_example() -> None:
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 255, 255])
    preds = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 1, 2])
    metric = confusion_matrix_metric(4)  # class 3 appears nowhere
    metric.update(preds[:5], target[:5])  # two batches, one matrix
    metric.update(preds[5:], target[5:])
    confmat = metric.compute()
    # Rows: target, columns: prediction; the two 255 pixels are left out.
    expected = torch.tensor([[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    assert torch.equal(confmat.cpu(), expected)
    scores = segmentation_scores(confmat, ["a", "b", "c", "d"])
    # IoU = TP / (row + column - TP): a 2/(3+3-2), b 1/(2+2-1), c 2/(3+3-2), d 0/0.
    assert scores["IoU.a"] == pytest.approx(0.5)
    assert scores["IoU.b"] == pytest.approx(1 / 3)
    assert scores["IoU.c"] == pytest.approx(0.5)
    assert math.isnan(scores["IoU.d"]) and math.isnan(scores["Acc.d"])
    assert scores["mIoU"] == pytest.approx(4 / 9)  # NaN class left out of the mean
    assert scores["aAcc"] == pytest.approx(5 / 8)
    assert [scores[f"Acc.{c}"] for c in "abc"] == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert scores["mAcc"] == pytest.approx(11 / 18)
    table = iou_table({f"val_{k}": v for k, v in scores.items()})
    rows = [" ".join(line.split()) for line in table.splitlines()]
    assert "b 33.33 50.00" in rows and "d n/a n/a" in rows
    assert "mIoU 44.44%, mAcc 61.11%, aAcc 62.50%" in table


def test_a_class_only_predicted_scores_zero_iou() -> None:
    confmat = torch.tensor([[3, 1], [0, 0]])  # class 1 predicted once, never labelled
    scores = segmentation_scores(confmat, ["a", "b"])
    assert scores["IoU.b"] == 0.0 and math.isnan(scores["Acc.b"])
    assert scores["mIoU"] == pytest.approx((3 / 4 + 0) / 2)


def test_scores_agree_with_torchmetrics_jaccard_index() -> None:
    generator = torch.Generator().manual_seed(0)
    classes = 5
    ours = confusion_matrix_metric(classes)
    per_class = MulticlassJaccardIndex(classes, average=None, ignore_index=IGNORE_INDEX)
    macro = MulticlassJaccardIndex(classes, average="macro", ignore_index=IGNORE_INDEX)
    for _ in range(3):
        target = torch.randint(0, classes, (2, 9, 11), generator=generator)
        target[torch.rand(target.shape, generator=generator) < 0.2] = IGNORE_INDEX
        preds = torch.where(
            torch.rand(target.shape, generator=generator) < 0.6,
            target.clamp(max=classes - 1),
            torch.randint(0, classes, target.shape, generator=generator),
        )
        for metric in (ours, per_class, macro):
            metric.update(preds, target)
    scores = segmentation_scores(ours.compute(), [str(k) for k in range(classes)])
    expected = per_class.compute()
    assert [scores[f"IoU.{k}"] for k in range(classes)] == pytest.approx(expected.tolist())
    assert scores["mIoU"] == pytest.approx(float(macro.compute()))


def test_score_input_checks() -> None:
    with pytest.raises(ValueError, match="must be square"):
        segmentation_scores(torch.zeros(2, 3), ["a", "b"])
    with pytest.raises(ValueError, match="3 class names"):
        segmentation_scores(torch.zeros(2, 2), ["a", "b", "c"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Rank 0 scores one pixel of each class right, rank 1 makes two mistakes and one ignored pixel.
_RANK_SCRIPT = """
import json, torch, torch.distributed as dist
from involution.metrics.segmentation import confusion_matrix_metric
dist.init_process_group("gloo")
metric = confusion_matrix_metric(3)
if dist.get_rank() == 0:
    metric.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
else:
    metric.update(torch.tensor([1, 2, 0]), torch.tensor([0, 255, 2]))
print(json.dumps(metric.compute().tolist()))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_confusion_matrix_is_summed_over_ranks() -> None:
    port = str(_free_port())
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_SCRIPT],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "OMP_NUM_THREADS": "1",
            },
        )
        for rank in range(2)
    ]
    outputs = [process.communicate(timeout=240) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-2000:]
    expected = [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert [json.loads(stdout) for stdout, _ in outputs] == [expected, expected]


# ----------------------------------------------------------------------------- inference


class _PixelModel(nn.Module):
    """A 1x1 conv: every output pixel depends on its own input pixel only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"out": self.conv(x)}


class _ContextModel(nn.Module):
    """Adds each window's mean: outputs depend on the window, so averaging shows."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"out": x[:, :2] + x.mean(dim=(2, 3), keepdim=True)[:, :2]}


def test_window_starts_cover_the_image_and_end_at_its_border() -> None:
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(3, 4, 3) == [0]  # smaller than a window: one window
    assert window_starts(4, 4, 3) == [0]


def test_sliding_window_with_one_window_equals_whole_image() -> None:
    torch.manual_seed(0)
    images = torch.randn(2, 3, 13, 17)
    model = _ContextModel()
    whole = Inference("whole")(model, images)
    for crop in ((13, 17), (20, 20)):
        slide = Inference("slide", crop, (5, 5))(model, images)
        torch.testing.assert_close(slide, whole)


def test_sliding_window_averages_overlapping_windows() -> None:
    torch.manual_seed(0)
    images = torch.randn(1, 3, 13, 17)
    pixel = _PixelModel()
    # A per-pixel model gives the whole-image logits whatever the windows.
    torch.testing.assert_close(
        sliding_window_logits(pixel, images, (6, 7), (4, 5)), pixel(images)["out"]
    )
    # By hand on one axis: windows [0, 6) and [4, 10) over width 10; columns 4, 5 averaged.
    images = torch.randn(1, 2, 1, 10)
    slide = sliding_window_logits(_ContextModel(), images, (1, 6), (1, 4))
    left = images[..., :6] + images[..., :6].mean(dim=(2, 3), keepdim=True)
    right = images[..., 4:] + images[..., 4:].mean(dim=(2, 3), keepdim=True)
    expected = torch.cat([left[..., :4], (left[..., 4:] + right[..., :2]) / 2, right[..., 2:]], -1)
    torch.testing.assert_close(slide, expected)


def test_slide_inference_needs_crop_and_stride() -> None:
    with pytest.raises(ValueError, match="slide_crop"):
        Inference("slide", None, (2, 2))
    with pytest.raises(ValueError, match="must be one of"):
        Inference("tiles")


# ----------------------------------------------------------------------------- loss


def test_loss_ignores_255_and_weights_the_aux_head() -> None:
    task = get_task("segmentation")
    config = load_config(None, ["task=segmentation", "data.dataset=folder"])
    torch.manual_seed(0)
    out, aux = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    masks = torch.randint(0, 3, (2, 4, 5))
    masks[0, 0] = IGNORE_INDEX
    batch = SegmentationBatch(torch.zeros(2, 3, 4, 5), masks, torch.zeros(2, 2), torch.zeros(2, 2))
    keep = masks != IGNORE_INDEX

    def ce(logits: Tensor) -> Tensor:
        return nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[keep], masks[keep])

    loss = task.loss(lambda _: {"out": out}, batch, config)
    torch.testing.assert_close(loss, ce(out))
    loss = task.loss(lambda _: {"out": out, "aux": aux}, batch, config)
    torch.testing.assert_close(loss, ce(out) + 0.4 * ce(aux))
    # Every pixel ignored: a zero loss (the engine's NaN guard would stop on 0 / 0).
    assert pixel_cross_entropy(out, torch.full_like(masks, IGNORE_INDEX)) == 0


# ----------------------------------------------------------------------------- end to end


TINY_MODEL = (
    "model.kwargs={backbone_kwargs: {layers: [1, 1, 1, 1], stage_widths: [16, 16, 16, 16], "
    "stem_width: 32}, fpn_channels: 16, head_channels: 16}"
)


@pytest.fixture(scope="module")
def fashion_mnist() -> Path:
    try:
        return find_fashion_mnist(download=False)
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST (for the scenes) not available: {err}")


def test_train_eval_predict_on_tiny_scenes(
    tmp_path: Path, fashion_mnist: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = [
        f"data.root={tmp_path / 'scenes'}",
        "data.scenes={train_scenes: 4, val_scenes: 3, min_size: 48, max_size: 56, "
        "scales: [1.0, 1.5]}",
        TINY_MODEL,
        "segmentation.crop_size=[32, 40]",
        "segmentation.scale=[48, 48]",
        "train.batch_size=2",
        "train.iterations=2",
        "train.warmup_steps=1",
        "train.progress=false",
        "data.workers=0",
        f"output.dir={tmp_path}",
        "output.name=run",
    ]
    # The demo's config (involution neck), shrunk.
    assert main(["train", "scenes_seg", "--set", *overrides]) == 0
    printed = capsys.readouterr().out
    assert "run finished: 2 steps" in printed and "mIoU" in printed and "Ankle boot" in printed
    run = tmp_path / "run"
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "val_mIoU" in r]
    assert len(evals) == 1 and 0 <= evals[0]["val_aAcc"] <= 1
    assert {"val_IoU.background", "val_Acc.Bag", "val_mAcc"} <= set(evals[0])

    # `involution eval --run` rebuilds the model from the weights and prints the IoU table.
    assert (
        main(
            [
                "eval",
                "--run",
                str(run),
                "--set",
                "segmentation.inference=slide",
                "segmentation.slide_crop=[32, 32]",
                "segmentation.slide_stride=[16, 16]",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "IoU %" in table and "T-shirt/top" in table and "mIoU" in table

    image = tmp_path / "scenes/images/val/000001.png"
    out = tmp_path / "drawn"
    assert main(["predict", "--run", str(run), str(image), "--out", str(out), "--topk", "2"]) == 0
    assert str(out / "000001_segmentation.png") in capsys.readouterr().out
    with Image.open(out / "000001_segmentation.png") as drawn, Image.open(image) as original:
        assert drawn.mode == "RGB" and drawn.size == original.size


def _fake_tree(root: Path, kind: str) -> None:
    """Two 256x512 pairs per split in the layout of ``kind``."""
    labels = torch.randint(0, 19, (256, 512), generator=torch.Generator().manual_seed(0))
    splits = {"cityscapes": ("train", "val"), "ade20k": ("training", "validation")}[kind]
    for split in splits:
        for i in range(2):
            if kind == "cityscapes":
                stem = f"{split}/city/city_00000{i}_000019"
                image = root / f"leftImg8bit/{stem}_leftImg8bit.png"
                label = root / f"gtFine/{stem}_gtFine_labelTrainIds.png"
            else:
                image = root / f"ADEChallengeData2016/images/{split}/ADE_{split}_{i}.jpg"
                label = root / f"ADEChallengeData2016/annotations/{split}/ADE_{split}_{i}.png"
            for path in (image, label):
                path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (512, 256), (90, 120, 30)).save(image)
            Image.fromarray(labels.to(torch.uint8).numpy()).save(label)


@pytest.mark.parametrize(
    ("config", "kind", "classes"),
    [("cityscapes_upernet_rednet50", "cityscapes", 19), ("ade20k_upernet_rednet50", "ade20k", 150)],
)
def test_shipped_configs_read_their_layouts(
    tmp_path: Path, config: str, kind: str, classes: int
) -> None:
    _fake_tree(tmp_path, kind)
    config = load_config(config, [f"data.root={tmp_path}"])
    assert config["train"]["sync_bn"] and config["train"]["schedule"] == "poly"
    bundle = get_task("segmentation").build_data(config)
    assert (len(bundle.train), len(bundle.val), len(bundle.classes)) == (2, 2, classes)
    image, mask = bundle.train[(0, 1)]
    assert image.shape == (3, *config["segmentation"]["crop_size"])
    assert mask.shape == tuple(config["segmentation"]["crop_size"])
    image, mask = bundle.val[(0, 0)]
    assert mask.shape == (256, 512)  # scored at the label's size


def test_cityscapes_configs_share_the_official_recipe() -> None:
    names = {}
    for neck in ("", "_involution_neck"):
        config = load_config(f"cityscapes_semantic_fpn_rednet50{neck}")
        names[neck] = config["model"]["name"]
        train = config["train"]
        assert (train["iterations"], train["lr"], train["weight_decay"]) == (80000, 0.01, 5e-4)
        assert train["batch_size"] == 2 and train["sync_bn"]
        assert train["min_lr_ratio"] * train["lr"] == pytest.approx(1e-4)
    assert names == {
        "": "semantic_fpn_rednet50",
        "_involution_neck": "semantic_fpn_rednet50_involution_neck",
    }


def test_folder_dataset_needs_its_class_names(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for folder in ("images", "labels"):
            (tmp_path / folder / split).mkdir(parents=True)
        Image.new("RGB", (6, 4)).save(tmp_path / f"images/{split}/a.jpg")
        Image.new("L", (6, 4), 2).save(tmp_path / f"labels/{split}/a.png")
    task = get_task("segmentation")
    base = ["task=segmentation", "data.dataset=folder", f"data.root={tmp_path}"]
    with pytest.raises(ValueError, match=r"needs segmentation\.classes"):
        task.build_data(load_config(None, base))
    config = load_config(None, [*base, "segmentation.classes=[sky, road, car]"])
    bundle = task.build_data(config, train=False)
    assert bundle.classes == ["sky", "road", "car"] and bundle.train == []
    assert bundle.val[(0, 0)][1].unique().tolist() == [2]
    config = load_config(None, [*base, "segmentation.classes=[sky, road]"])
    with pytest.raises(ValueError, match=r"label .*a\.png holds value\(s\) \[2\]"):
        task.build_data(config, train=False).val[(0, 0)]
