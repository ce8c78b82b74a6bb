"""Image classification: timm models (RedNet registered), cross-entropy, top-1/top-5."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

import involution  # noqa: F401  (registers the RedNet models with timm)
from involution.train.config import Config
from involution.train.data import DataBundle, build_datasets, build_transform
from involution.train.engine import DistInfo, all_reduce_sum
from involution.train.tasks.base import Task


class ClassificationTask(Task):
    """``model.name`` is any timm model; the data is Fashion-MNIST, an ImageFolder or synthetic."""

    name = "classification"
    key_metric = "top1"
    curve_metrics = ("top1", "top5")

    def build_data(self, config: Config, train: bool = True) -> DataBundle:
        return build_datasets(config, train=train)

    def build_model(self, config: Config, classes: list[str], in_chans: int) -> nn.Module:
        """``timm.create_model(model.name, num_classes, in_chans, **model.kwargs)``."""
        name = config["model"]["name"]
        if not timm.is_model(name):
            ours = ", ".join(timm.list_models("rednet*"))
            raise ValueError(f"unknown model {name!r}; RedNet models: {ours} (or any timm model)")
        kwargs = {"num_classes": len(classes), "in_chans": in_chans, **config["model"]["kwargs"]}
        return timm.create_model(name, **kwargs)

    def to_device(
        self, batch: tuple[Tensor, Any], device: torch.device, channels_last: bool
    ) -> tuple[Tensor, Tensor]:
        images, labels = batch
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, torch.as_tensor(labels).to(device, non_blocking=True)

    def loss(self, net: nn.Module, batch: tuple[Tensor, Tensor], config: Config) -> Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(
            net(images).float(), labels, label_smoothing=config["train"]["label_smoothing"]
        )

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        info: DistInfo,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        progress: bool = False,
    ) -> dict[str, float]:
        """Loss, top-1 and top-5 accuracy (%) over ``loader``, summed over ranks."""
        was_training = model.training
        model.eval()
        totals = [0.0, 0.0, 0.0, 0.0]  # loss sum, top-1 hits, top-5 hits, samples
        for batch in tqdm(loader, desc="eval", leave=False, disable=not progress):
            images, labels = self.to_device(batch, info.device, channels_last)
            with torch.autocast(info.device.type, amp_dtype, enabled=amp_dtype is not None):
                logits = model(images)
            logits = logits.float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == labels[:, None]
            totals[0] += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            totals[1] += hits[:, :1].sum().item()
            totals[2] += hits.sum().item()
            totals[3] += len(labels)
        model.train(was_training)
        loss, top1, top5, count = all_reduce_sum(totals, info)
        if count == 0:
            raise ValueError("the evaluation set is empty")
        return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count}

    def format_metrics(self, metrics: dict[str, float]) -> str:
        return (
            f"top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%, "
            f"loss {metrics['loss']:.4f}"
        )

    @torch.no_grad()
    def predict(
        self,
        model: nn.Module,
        config: Config,
        classes: list[str],
        in_chans: int,
        images: list[Path],
        out_dir: Path | None,
        topk: int,
    ) -> None:
        """Print the ``topk`` classes of each image with their probabilities."""
        transform = build_transform(config, train=False, channels=in_chans)
        batch = []
        for path in images:
            try:
                with Image.open(path) as image:
                    batch.append(transform(image.convert("L" if in_chans == 1 else "RGB")))
            except OSError as err:
                raise OSError(f"cannot read image {path}: {err}") from err
        probs = model(torch.stack(batch)).softmax(dim=1)
        top = probs.topk(min(topk, probs.shape[1]), dim=1)
        for path, values, indices in zip(images, top.values, top.indices, strict=True):
            print(path)
            for p, i in zip(values.tolist(), indices.tolist(), strict=True):
                print(f"  {100 * p:6.2f}%  {classes[i]}")


TASK = ClassificationTask()
