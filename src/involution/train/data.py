"""What the engine trains on: a task's datasets (:class:`DataBundle`), the samplers that key
them and the loaders.

Samplers yield ``(epoch, index)`` keys (:data:`~involution.datasets.sampling.SampleKey`) and
datasets seed each sample's augmentation from them, so batches and augmentation are a pure
function of ``(seed, epoch, rank)``: a run resumed mid-epoch sees the same images. The datasets
themselves are in :mod:`involution.datasets`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torch.utils.data._utils.collate import default_collate

from involution.datasets.sampling import SampleKey
from involution.train.signals import ignore_stop_signals

# ----------------------------------------------------------------------------- bundle


@dataclass
class DataBundle:
    """Train and evaluation datasets plus what the model needs to know about them."""

    train: Dataset
    val: Dataset
    classes: list[str]
    in_chans: int
    #: Batches samples into what the task's model takes (``None``: :func:`collate`).
    collate_fn: Callable[[list[Any]], Any] | None = None
    #: One group per training sample (e.g. an aspect-ratio bin): batches come from one group.
    group_ids: Sequence[int] | None = None


# ----------------------------------------------------------------------------- loaders


class EpochBatchSampler(Sampler[list[SampleKey]]):
    """Per-rank training batches of ``(epoch, index)`` keys, reshuffled every epoch.

    The shuffle is :class:`torch.utils.data.DistributedSampler`'s (disjoint shards, a
    permutation per epoch from ``seed``). With ``group_ids`` (one group per sample, e.g. an
    aspect-ratio bin) each batch is filled from one group in shuffled order; the leftovers of all
    groups fill the last batches, so an epoch always has ``len(self)`` batches. Batches are a
    pure function of (seed, epoch, rank), so skipping the first ones resumes mid-epoch exactly.
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        group_ids: Sequence[int] | None = None,
    ) -> None:
        if group_ids is not None and len(group_ids) != len(dataset):
            raise ValueError(
                f"group_ids has {len(group_ids)} entries for a dataset of {len(dataset)} samples"
            )
        self.inner = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        self.batch_size = batch_size
        self.group_ids = group_ids
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Start ``epoch`` after its first ``skip`` batches."""
        self.inner.set_epoch(epoch)
        self.epoch = epoch
        self.skip = skip

    def _batches(self) -> list[list[int]]:
        order = list(self.inner)
        size = self.batch_size
        if self.group_ids is None:
            return [order[i : i + size] for i in range(0, len(self) * size, size)]
        batches, pending, leftovers = [], {}, []
        for index in order:
            bucket = pending.setdefault(self.group_ids[index], [])
            bucket.append(index)
            if len(bucket) == size:
                batches.append(bucket.copy())
                bucket.clear()
        for bucket in pending.values():
            leftovers.extend(bucket)
        batches.extend(leftovers[i : i + size] for i in range(0, len(leftovers), size))
        return batches[: len(self)]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for batch in self._batches()[self.skip :]:
            yield [(self.epoch, index) for index in batch]

    def __len__(self) -> int:
        return len(self.inner) // self.batch_size


class ShardSampler(Sampler[SampleKey]):
    """Evaluation shard: every ``world_size``-th sample from ``rank``, in order, no padding (so
    all-reduced counts are exact)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[SampleKey]:
        return ((0, i) for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def collate(batch: Any) -> Any:
    """Pass batches that datasets assembled themselves; stack lists of samples."""
    return batch if isinstance(batch, tuple) else default_collate(batch)


def build_loader(
    dataset: Dataset,
    sampler: Sampler,
    batch_size: int | None,
    workers: int,
    collate_fn: Callable[[Any], Any] | None = None,
) -> DataLoader:
    """A loader over ``sampler``'s keys (workers persist across epochs).

    ``batch_size=None``: ``sampler`` yields whole batches (:class:`EpochBatchSampler`).
    ``collate_fn`` defaults to :func:`collate`.
    """
    batching = (
        {"batch_sampler": sampler}
        if batch_size is None
        else {"sampler": sampler, "batch_size": batch_size}
    )
    return DataLoader(
        dataset,
        **batching,
        num_workers=workers,
        collate_fn=collate_fn or collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        # Stop signals are the training process's to handle (it ends the workers).
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
        # Its own generator: starting an epoch must not draw from the global RNG (that would
        # shift the model's dropout stream on resume).
        generator=torch.Generator(),
    )
