"""The interface between the training engine and a task."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from involution.train.config import Config
from involution.train.data import DataBundle

if TYPE_CHECKING:
    from involution.train.engine import DistInfo


class Task(ABC):
    """What the engine (:class:`involution.train.engine.Trainer`) asks of a task.

    The engine owns the loop, devices and processes (DDP), autocast, gradient accumulation and
    clipping, EMA, the NaN guard, checkpoints, resume, logging and curves. A task owns the data,
    the model, the loss and the metrics. Subclasses set :attr:`name`, :attr:`key_metric` and
    :attr:`curve_metrics` and implement every method.
    """

    #: The config's ``task`` value.
    name: ClassVar[str]
    #: The metric (a key of :meth:`evaluate`'s result) that summarises a run.
    key_metric: ClassVar[str]
    #: The metrics drawn in the run's validation curves, :attr:`key_metric` first.
    curve_metrics: ClassVar[tuple[str, ...]]

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
    def loss(self, net: nn.Module, batch: Any, config: Config) -> Tensor:
        """Scalar float loss of one on-device training batch (``net`` in train mode, under the
        engine's autocast)."""

    @abstractmethod
    def evaluate(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        info: DistInfo,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        progress: bool = False,
    ) -> dict[str, float]:
        """Metrics over the whole evaluation set (reduced over every rank of ``info``)."""

    @abstractmethod
    def format_metrics(self, metrics: dict[str, float]) -> str:
        """``metrics`` for people: one line or a table."""

    @abstractmethod
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
        """Run ``model`` on image files: print results and/or write pictures into ``out_dir``."""
