"""The detection task end to end: train / eval / predict through the CLI on tiny Fashion-MNIST
scenes, Mask R-CNN's mask AP, DDP training and evaluation, model options, shipped configs."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from torchvision.models.detection import FasterRCNN, RetinaNet

from conftest import fashion_mnist_scenes
from involution import Involution2d
from involution.cli import main
from involution.train.checkpoint import read_jsonl
from involution.train.config import load_config, shipped_configs
from involution.train.data import ShardSampler, build_loader
from involution.train.distributed import DistInfo
from involution.train.tasks import get_task
from involution.train.tasks.base import total_loss

#: Validation images (of rank 1's shard: odd indices) on which the DDP test's detector misses.
MISSES = {1}

SCENES = {
    "train_scenes": 8,
    "val_scenes": 4,
    "min_size": 72,
    "max_size": 80,
    "scales": [1.0, 1.5],
    "items": [1, 3],
}

# A RedNet-FPN whose every layer is 16 channels wide, on 64-80 px images; keeps every
# detection with a score above 0 so that two training steps already give boxes to draw.
TINY = [
    "task=detection",
    "data.dataset=fashion_mnist_scenes",
    *[f"data.scenes.{key}={value}" for key, value in SCENES.items()],
    "model.name=fasterrcnn_rednet26_fpn_inv_neck",
    "model.kwargs={backbone_kwargs: {layers: [1, 1, 1, 1], stage_widths: [16, 16, 16, 16], "
    "stem_width: 32}, fpn_channels: 16, trainable_stages: 5, norm_eval: false, "
    "anchor_sizes: [[16], [24], [32], [48], [64]], box_score_thresh: 0.0, "
    "rpn_pre_nms_top_n_train: 100, rpn_post_nms_top_n_train: 100, "
    "rpn_pre_nms_top_n_test: 50, rpn_post_nms_top_n_test: 20, box_batch_size_per_image: 16, "
    "box_detections_per_img: 10}",
    "detection.min_size=64",
    "detection.max_size=80",
    "detection.score_threshold=0.0",
    "data.train_subset=4",
    "train.batch_size=2",
    "train.epochs=1",
    "train.lr=0.01",
    "train.threads=1",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fashion_mnist_scenes(tmp_path_factory, **SCENES)


def _overrides(scenes: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.root={scenes}", f"output.dir={out}", *extra]


def test_train_eval_predict_through_the_cli(scenes: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--set", *_overrides(scenes, tmp_path, "output.name=run")]) == 0
    out = capsys.readouterr().out
    assert "run finished: 2 steps" in out and "COCO metrics" in out and "AP50" in out
    run = tmp_path / "run"
    (record,) = [r for r in read_jsonl(run / "metrics.jsonl") if "val_bbox_AP" in r]
    assert {"val_bbox_AP50", "val_bbox_AP75", "val_bbox_APs", "val_bbox_AR100"} <= set(record)
    assert all(-1 <= value <= 1 for key, value in record.items() if key.startswith("val_bbox"))

    assert main(["eval", "--run", str(run)]) == 0
    table = capsys.readouterr().out
    assert "model.safetensors: COCO metrics" in table
    # The engine's end-of-epoch evaluation and `involution eval` score the same weights.
    assert f"{record['val_bbox_AR100']:.3f}" in table.splitlines()[-1]

    images = [scenes / "images" / "val" / name for name in ("000001.png", "000002.png")]
    drawn = tmp_path / "drawn"
    predict = ["predict", "--run", str(run), *map(str, images), "--topk", "3", "--out", str(drawn)]
    assert main(predict) == 0
    printed = capsys.readouterr().out
    assert "000001.png: 3 detections (score >= 0)" in printed  # --topk 3 of the 10 kept
    for image in images:
        with Image.open(image) as original, Image.open(drawn / image.name) as picture:
            assert picture.size == original.size and picture.mode == "RGB"
            before = np.asarray(original.convert("RGB")).astype(int)
            after = np.asarray(picture).astype(int)
        changed = np.abs(after - before).sum(axis=-1) > 0
        assert changed.any() and changed.mean() < 0.9  # boxes drawn, the scene still visible
        # Box outlines are saturated colours; the scenes are grayscale.
        assert (after[changed].max(axis=-1) - after[changed].min(axis=-1)).max() > 100


def test_mask_rcnn_trains_and_reports_mask_ap(scenes: Path) -> None:
    config = load_config(
        None, _overrides(scenes, scenes, "model.name=maskrcnn_rednet26_fpn_inv_neck_head")
    )
    task = get_task("detection")
    data = task.build_data(config)
    _, target = data.train[(0, 0)]
    assert target["masks"].shape[0] == target["boxes"].shape[0] == target["labels"].shape[0]
    model = task.build_model(config, data.classes, data.in_chans)
    batch = task.to_device(
        data.collate_fn([data.train[(0, i)] for i in range(2)]), torch.device("cpu"), False
    )
    model.train()
    terms = task.loss(model, batch, config)
    assert set(terms) == {"classifier", "box_reg", "mask", "objectness", "rpn_box_reg"}
    loss, _ = total_loss(terms)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    involutions = [m for m in model.roi_heads.mask_head.modules() if isinstance(m, Involution2d)]
    assert involutions and all(m.span.weight.grad is not None for m in involutions)
    loader = build_loader(data.val, ShardSampler(len(data.val)), 2, 0, data.collate_fn)
    metrics = task.evaluate(model, loader, DistInfo(0, 1, torch.device("cpu")))
    assert {"bbox_AP", "segm_AP", "segm_AP50", "segm_AR100"} <= set(metrics)
    assert model.training  # evaluate restores the mode
    assert "segm" in task.format_metrics(metrics)


class _Oracle(nn.Module):
    """Answers each evaluation image it recognises (by its pixels) with its ground truth,
    except the images at ``misses`` (indices), where it finds nothing."""

    def __init__(self, dataset: Dataset, misses: set[int]) -> None:
        super().__init__()
        self.answers = {}
        for index in range(len(dataset)):
            image, target = dataset[(0, index)]
            found = target["boxes"].as_subclass(Tensor)[: 0 if index in misses else None]
            self.answers[image.numpy().tobytes()] = {
                "boxes": found,
                "labels": target["labels"][: len(found)],
                "scores": torch.ones(len(found)),
            }

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return [self.answers[image.numpy().tobytes()] for image in images]


def _ddp_worker(rank: int, world_size: int, port: int, scenes: Path, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        config = load_config(None, _overrides(scenes, out))
        task = get_task("detection")
        data = task.build_data(config)
        # One DDP training step of a detector (every parameter takes part in the loss).
        torch.manual_seed(0)
        model = DistributedDataParallel(task.build_model(config, data.classes, data.in_chans))
        batch = data.collate_fn([data.train[(0, rank)]])
        terms = task.loss(model, task.to_device(batch, torch.device("cpu"), False), config)
        total_loss(terms)[0].backward()
        info = DistInfo(rank, world_size, torch.device("cpu"))
        shard = ShardSampler(len(data.val), rank, world_size)
        loader = build_loader(data.val, shard, 1, 0, data.collate_fn)
        metrics = task.evaluate(_Oracle(data.val, MISSES), loader, info)
        torch.save({"metrics": metrics, "shard": len(shard)}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_training_step_and_evaluation_over_shards(scenes: Path, tmp_path: Path) -> None:
    """Two gloo ranks: a DDP training step of the detector, then a detector that misses the
    objects of one image (of rank 1's shard) evaluated on the two halves of the validation
    set, gathered and scored on rank 0: every rank gets the one-process metrics."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(
        _ddp_worker, args=(2, port, scenes, tmp_path), nprocs=2, join=True, start_method="spawn"
    )
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [r["shard"] for r in results] == [2, 2]
    assert results[0]["metrics"] == results[1]["metrics"]
    task = get_task("detection")
    data = task.build_data(load_config(None, _overrides(scenes, tmp_path)), train=False)
    loader = build_loader(data.val, ShardSampler(len(data.val)), 1, 0, data.collate_fn)
    expected = task.evaluate(_Oracle(data.val, MISSES), loader, DistInfo(0, 1, torch.device("cpu")))
    assert 0 < expected["bbox_AR100"] < 1  # rank 0's half alone would give 1
    assert results[0]["metrics"] == expected


def test_model_options(scenes: Path) -> None:
    task = get_task("detection")
    config = load_config(None, _overrides(scenes, scenes))
    model = task.build_model(config, ["a", "b", "c"], 3)
    assert isinstance(model, FasterRCNN)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    assert model.transform.min_size == (64,) and model.transform.max_size == 80
    assert model.rpn.anchor_generator.sizes == ((16,), (24,), (32,), (48,), (64,))
    retina = load_config(
        None,
        _overrides(
            scenes,
            scenes,
            "model.name=retinanet_rednet26_fpn_inv_neck",
            "model.kwargs={backbone_kwargs: {layers: [1, 1, 1, 1], stage_widths: [16, 16, 16, "
            "16], stem_width: 32}, fpn_channels: 16, anchor_sizes: [16, 32, 64, 128, 256], "
            "anchor_aspect_ratios: [1.0]}",
        ),
    )
    model = task.build_model(retina, ["a", "b"], 3)
    assert isinstance(model, RetinaNet)
    assert model.anchor_generator.num_anchors_per_location() == [1] * 5
    with pytest.raises(ValueError, match="unknown detection model 'fasterrcnn_resnet7'"):
        task.build_model(load_config(None, [*TINY, "model.name=fasterrcnn_resnet7"]), ["a"], 3)
    with pytest.raises(ValueError, match="anchor_aspect_ratios needs anchor_sizes"):
        only_ratios = "model.kwargs={anchor_aspect_ratios: [1.0]}"
        bad = load_config(None, [*TINY[:2], "model.name=fasterrcnn_rednet26_fpn", only_ratios])
        task.build_model(bad, ["a"], 3)
    with pytest.raises(ValueError, match=r"data\.root must be set for data\.dataset=coco"):
        task.build_data(load_config(None, [*TINY, "data.dataset=coco"]))


@pytest.mark.parametrize(
    "name", [n for n in shipped_configs() if n.startswith(("coco_", "scenes_det", "scenes_mask"))]
)
def test_shipped_detection_configs(name: str) -> None:
    config = load_config(name)
    train = config["train"]
    assert config["task"] == "detection"
    assert train["optimizer"] == "sgd" and train["momentum"] == 0.9
    if name.startswith("coco_"):
        # The official 1x schedule for a global batch of 16 (2 images x 8 GPUs).
        lr = 0.01 if "retinanet" in config["model"]["name"] else 0.02
        assert train["lr"] * 16 / train["lr_base_batch"] == pytest.approx(lr)
        assert (train["epochs"], train["milestones"], train["schedule"]) == (12, [8, 11], "step")
        assert (train["warmup_steps"], train["warmup_factor"]) == (2000, 0.001)
        assert train["weight_decay"] == 1e-4
        assert (config["detection"]["min_size"], config["detection"]["max_size"]) == (800, 1333)
    model = get_task("detection").build_model(config, [str(i) for i in range(10)], 3)
    if isinstance(model, FasterRCNN):  # Mask R-CNN too
        assert model.roi_heads.box_predictor.cls_score.out_features == 11
    else:
        assert isinstance(model, RetinaNet) and model.head.classification_head.num_classes == 11
