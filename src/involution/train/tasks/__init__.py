"""Training tasks: what the one engine needs to know about classification, detection, ...

A task (:class:`~involution.train.tasks.base.Task`) builds the data and the model, moves a
batch to the device, computes the training loss, evaluates and predicts; the engine
(:mod:`involution.train.engine`) does everything else. Tasks load lazily, so classification
does not import detection's dependencies.
"""

from __future__ import annotations

import importlib

from involution.train.tasks.base import Task

#: Task name (the config's ``task`` key) -> module defining ``TASK``.
TASK_MODULES: dict[str, str] = {
    "classification": "involution.train.tasks.classification",
    "detection": "involution.train.tasks.detection",
    "segmentation": "involution.train.tasks.segmentation",
}


def get_task(name: str) -> Task:
    """The task registered as ``name``."""
    if name not in TASK_MODULES:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASK_MODULES)}")
    return importlib.import_module(TASK_MODULES[name]).TASK


__all__ = ["TASK_MODULES", "Task", "get_task"]
