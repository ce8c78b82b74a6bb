"""Image classification: timm models (RedNet registered), cross-entropy, top-1/top-5."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from torch import Tensor, nn

import involution  # noqa: F401  (registers the RedNet models with timm)
from involution.datasets.classification import build_datasets, build_transform
from involution.train.config import Config
from involution.train.data import DataBundle
from involution.train.distributed import DistInfo, all_reduce_sum
from involution.train.tasks.base import Evaluation, Predictor, Task


class ClassificationTask(Task):
    """``model.name`` is any timm model; the data is Fashion-MNIST, an ImageFolder or synthetic."""

    name = "classification"
    key_metric = "top1"
    curve_metrics = ("top1", "top5")

    def build_data(self, config: Config, train: bool = True) -> DataBundle:
        return DataBundle(*build_datasets(config, train=train))

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

    def start_evaluation(self, loader: Iterable[Any], info: DistInfo) -> Evaluation:
        return _Accuracy(info)

    def format_metrics(self, metrics: dict[str, float]) -> str:
        return (
            f"top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%, "
            f"loss {metrics['loss']:.4f}"
        )

    def predictor(
        self, model: nn.Module, config: Config, classes: list[str], in_chans: int
    ) -> Predictor:
        transform = build_transform(config, train=False, channels=in_chans)
        return _TopClasses(model, transform, classes, "L" if in_chans == 1 else "RGB")


class _Accuracy(Evaluation):
    """Loss, top-1 and top-5 accuracy (%), summed over ranks."""

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self.totals = [0.0, 0.0, 0.0, 0.0]  # loss sum, top-1 hits, top-5 hits, samples

    def forward(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return model(batch[0])

    def update(self, batch: tuple[Tensor, Tensor], outputs: Tensor) -> None:
        labels = batch[1]
        logits = outputs.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        self.totals[0] += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        self.totals[1] += hits[:, :1].sum().item()
        self.totals[2] += hits.sum().item()
        self.totals[3] += len(labels)

    def compute(self) -> dict[str, float]:
        loss, top1, top5, count = all_reduce_sum(self.totals, self.info)
        if count == 0:
            raise ValueError("the evaluation set is empty")
        return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count}


class _TopClasses(Predictor):
    """An image's most probable classes with their probabilities."""

    def __init__(
        self,
        model: nn.Module,
        transform: Callable[[Image.Image], Tensor],
        classes: list[str],
        mode: str,
    ) -> None:
        self.model = model
        self.transform = transform
        self.classes = classes
        self.mode = mode  # the PIL mode of the model's input channels ("L" or "RGB")

    def __call__(self, path: Path, topk: int, draw: bool) -> tuple[str, None]:
        try:
            with Image.open(path) as image:
                batch = self.transform(image.convert(self.mode))[None]
        except OSError as err:
            raise OSError(f"cannot read image {path}: {err}") from err
        probs = self.model(batch).softmax(dim=1)[0]
        top = probs.topk(min(topk, probs.shape[0]))
        lines = [str(path)]
        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            lines.append(f"  {100 * p:6.2f}%  {self.classes[i]}")
        return "\n".join(lines), None


TASK = ClassificationTask()
