"""The interface between the training engine and a task.

A task's :meth:`Task.evaluate` and :meth:`Task.predict` are written once here; a task supplies
an :class:`Evaluation` (what it accumulates over an evaluation set) and a :class:`Predictor`
(what it reports and draws for one image file).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from involution.train.config import Config
from involution.train.data import DataBundle
from involution.train.distributed import DistInfo
from involution.train.progress import progress_iter
from involution.train.tasks.drawing import save_png


class Evaluation(ABC):
    """One pass over an evaluation set: a forward per batch, then its tally, then the metrics."""

    @abstractmethod
    def forward(self, model: nn.Module, batch: Any) -> Any:
        """The model's outputs on an on-device batch (run in eval mode, no grad, autocast)."""

    @abstractmethod
    def update(self, batch: Any, outputs: Any) -> None:
        """Add a batch and its outputs to the tally (outside autocast)."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The metrics of everything added, reduced over every rank; the same on each."""


class Predictor(ABC):
    """A trained model's prediction for image files, one at a time."""

    @abstractmethod
    def __call__(self, path: Path, topk: int, draw: bool) -> tuple[str, Tensor | None]:
        """The printed report on image ``path`` (its first line names it) and, with ``draw``,
        a uint8 (3, H, W) picture of the prediction (``None`` where the task draws nothing)."""


#: What :meth:`Task.loss` returns: the loss, or its named terms.
Loss = Tensor | dict[str, Tensor]
#: ``predict --out DIR`` writes every image's printed report to ``DIR/<this>``.
PREDICTIONS_NAME = "predictions.txt"


def total_loss(loss: Loss) -> tuple[Tensor, dict[str, Tensor]]:
    """``loss`` as (scalar total, named terms): the sum of the terms, or the loss itself and
    no terms. The one place where terms are added up, so what is logged is what is trained."""
    if isinstance(loss, Tensor):
        return loss, {}
    if not loss:
        raise ValueError("a task's loss has no terms")
    first, *rest = loss.values()
    return sum(rest, first), dict(loss)


class Task(ABC):
    """What the engine (:class:`involution.train.engine.Trainer`) asks of a task.

    The engine owns the loop, devices and processes (DDP), autocast, gradient accumulation and
    clipping, EMA, the NaN guard, checkpoints, resume, logging and curves. A task owns the data,
    the model, the loss and the metrics. Subclasses set :attr:`name`, :attr:`key_metric` and
    :attr:`curve_metrics` and implement every abstract method.
    """

    #: The config's ``task`` value.
    name: ClassVar[str]
    #: The metric (a key of :meth:`evaluate`'s result) that summarises a run.
    key_metric: ClassVar[str]
    #: The metrics drawn in the run's validation curves, :attr:`key_metric` first.
    curve_metrics: ClassVar[tuple[str, ...]]
    #: ``predict --out DIR`` writes ``DIR/<image stem><picture_suffix>.png``.
    picture_suffix: ClassVar[str] = ""

    @abstractmethod
    def build_data(self, config: Config, train: bool = True) -> DataBundle:
        """Datasets named by ``config``; with ``train=False`` only ``val`` needs to be real.

        Datasets receive ``(epoch, index)`` keys, so augmentation can be seeded per sample.
        """

    @abstractmethod
    def build_model(self, config: Config, classes: list[str], in_chans: int) -> nn.Module:
        """The model of ``config["model"]`` for ``classes`` and ``in_chans`` input channels."""

    @abstractmethod
    def to_device(self, batch: Any, device: torch.device, channels_last: bool) -> Any:
        """A collated batch moved to ``device`` (images channels_last when asked)."""

    @abstractmethod
    def loss(self, net: nn.Module, batch: Any, config: Config) -> Loss:
        """The loss of one on-device training batch (``net`` in train mode, under the engine's
        autocast): a scalar float tensor, or named scalar float terms (a detector's classifier,
        box, mask, ... losses) that the engine adds up (:func:`total_loss`) and logs one by one
        (``train_loss_<name>`` in ``metrics.jsonl``, and on the progress bar)."""

    @abstractmethod
    def start_evaluation(self, loader: Iterable[Any], info: DistInfo) -> Evaluation:
        """An empty tally for one pass over ``loader`` (this rank's shard)."""

    @abstractmethod
    def format_metrics(self, metrics: dict[str, float]) -> str:
        """``metrics`` for people: one line or a table."""

    @abstractmethod
    def predictor(
        self, model: nn.Module, config: Config, classes: list[str], in_chans: int
    ) -> Predictor:
        """Predictions of ``model`` (in eval mode, on its device) trained with ``config``."""

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
        """Metrics over the whole evaluation set (reduced over every rank of ``info``); the
        model is evaluated in eval mode and left in the mode it had."""
        evaluation = self.start_evaluation(loader, info)
        was_training = model.training
        model.eval()
        for batch in progress_iter(loader, "eval", progress):
            batch = self.to_device(batch, info.device, channels_last)
            with torch.autocast(info.device.type, amp_dtype, enabled=amp_dtype is not None):
                outputs = evaluation.forward(model, batch)
            evaluation.update(batch, outputs)
        model.train(was_training)
        return evaluation.compute()

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
        """Run ``model`` on image files: print each one's report and, with ``out_dir``, write
        the pictures the task draws there."""
        stems = [path.stem for path in images]
        repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
        if out_dir is not None and repeated:
            raise ValueError(
                f"several input images are named {repeated}: their outputs would clash"
            )
        predictor = self.predictor(model.eval(), config, classes, in_chans)
        reports = []
        for path in images:
            report, picture = predictor(path, topk, draw=out_dir is not None)
            print(report)
            reports.append(report)
            if out_dir is not None and picture is not None:
                target = out_dir / f"{path.stem}{self.picture_suffix}.png"
                save_png(picture, target)
                print(f"  -> {target}")
        if out_dir is not None:  # the reports too: a classifier draws no pictures
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / PREDICTIONS_NAME).write_text("\n".join(reports) + "\n")
            print(f"reports -> {out_dir / PREDICTIONS_NAME}")
