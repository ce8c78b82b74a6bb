"""Run directories: their names, and whether a start continues the run already in one.

A run started with ``output.name`` lives in ``output.dir/output.name``; without one in a new
``output.dir/<model label>-<dataset>-<UTC time>``. Under ``torchrun --max-restarts N`` without
``output.name`` the time is replaced by the rendezvous id, which every restart of the job
shares, so a restarted worker group finds the directory its first attempt made.

A start *continues* (:func:`open_run_dir`) when it is an elastic restart
(``TORCHELASTIC_RESTART_COUNT`` > 0) or asked to (``involution train --resume-if-exists``, for
schedulers that requeue the same command) and its directory holds a checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from involution.train import checkpoint as ckpt
from involution.train.config import Config, dump_config

#: Files a run writes before its first checkpoint (a start that died before it left only these).
EARLY_FILES = frozenset({ckpt.CONFIG_NAME, ckpt.METRICS_NAME, ckpt.PLOT_NAME})


def elastic_restart_count() -> int:
    """How many times torchrun has restarted this worker group (0: the first attempt, or no
    torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def model_label(config: Config, num_params: int, config_name: str | None = None) -> str:
    """What an unnamed run's directory calls the model it trains.

    ``model.name`` for a model built as registered. ``model.kwargs`` may reshape it (the
    detection demo trains a 4.8M-parameter RedNet through ``fasterrcnn_rednet26_fpn_inv_neck``),
    so with kwargs the label names where the architecture was written and its size instead:
    ``<config file stem>-<parameters>`` (``custom-<parameters>`` without a file), e.g.
    ``scenes_det-4.8M``.
    """
    if not config["model"]["kwargs"]:
        return config["model"]["name"]
    if num_params >= 1_000_000:
        size = f"{num_params / 1e6:.1f}M"
    elif num_params >= 1_000:
        size = f"{num_params / 1e3:.1f}k"
    else:
        size = str(num_params)
    return f"{config_name or 'custom'}-{size}"


def restartable_name(config: Config, label: str) -> str | None:
    """The directory name every attempt of a job shares: ``output.name``, or under
    ``torchrun --max-restarts N`` (N > 0) ``<label>-<dataset>-<rendezvous id>``; ``None`` for
    a one-shot unnamed run."""
    if config["output"]["name"] is not None:
        return config["output"]["name"]
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return None
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id == "none":
        raise ValueError(
            "torchrun --max-restarts without --standalone or --rdzv-id gives every job the same "
            "id: set output.name (or --rdzv-id) so that a restart finds its run directory"
        )
    return f"{label}-{config['data']['dataset']}-{run_id}"


def new_run_dir(config: Config, label: str | None = None, name: str | None = None) -> Path:
    """Create and return a new, empty run directory that no other process also got.

    ``output.dir/<name>`` (default ``output.name``), refused (``ValueError`` naming
    ``--resume``) if it exists; without a name ``output.dir/<label>-<dataset>-<UTC time>``
    (``label``: :func:`model_label`, default ``model.name``), then ``-2``, ``-3``, ... for the
    runs started in the same second. ``mkdir`` without ``exist_ok`` is atomic: of the
    processes racing for one name, exactly one creates it.
    """
    root = Path(config["output"]["dir"]).expanduser()
    name = name or config["output"]["name"]
    if name is not None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            if (path / ckpt.CHECKPOINT_NAME).exists():
                raise ValueError(
                    f"{path} already holds a run: continue it with --resume {path} (or "
                    "--resume-if-exists), or set another output.name"
                ) from None
            raise ValueError(
                f"{path} already exists and holds no {ckpt.CHECKPOINT_NAME} to --resume {path} "
                "from: set another output.name (run directories are never reused)"
            ) from None
        return path
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = f"{label or config['model']['name']}-{config['data']['dataset']}-{stamp}"
    root.mkdir(parents=True, exist_ok=True)
    path, suffix = root / base, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            suffix += 1
            path = root / f"{base}-{suffix}"


@dataclass(frozen=True)
class RunStart:
    """Where a run starts and whether it continues from that directory's checkpoint."""

    path: Path
    resume: bool


def open_run_dir(config: Config, label: str, continue_if_exists: bool) -> RunStart:
    """The directory of a start without ``--resume`` (called by rank 0 alone).

    When the start may continue (``continue_if_exists`` or an elastic restart) and the
    directory every attempt shares (:func:`restartable_name`) holds a checkpoint, it continues
    from it; one holding only an earlier attempt's :data:`EARLY_FILES` is started over.
    Otherwise a new directory is made (:func:`new_run_dir`). Raises ``ValueError`` when the
    run found was trained with another config, or the folder is not a run's.
    """
    name = restartable_name(config, label)
    if name is None and continue_if_exists:
        raise ValueError(
            "--resume-if-exists needs output.name: the directory every start of the command "
            "shares (an unnamed run gets a new one each time)"
        )
    if name is None or not (continue_if_exists or elastic_restart_count() > 0):
        return RunStart(new_run_dir(config, label, name), resume=False)
    path = Path(config["output"]["dir"]).expanduser() / name
    if (path / ckpt.CHECKPOINT_NAME).exists():
        _check_same_config(path, config)
        return RunStart(path, resume=True)
    if not path.exists():
        return RunStart(new_run_dir(config, label, name), resume=False)
    found = {p.name for p in path.iterdir() if not ckpt.is_temporary(p)}
    if not found <= EARLY_FILES:
        raise ValueError(
            f"{path} exists, holds no {ckpt.CHECKPOINT_NAME} and is not a run directory "
            f"({', '.join(sorted(found - EARLY_FILES))}): set another output.name"
        )
    # An earlier attempt died before its first checkpoint: nothing of it to keep.
    for early in found:
        (path / early).unlink()
    return RunStart(path, resume=False)


def _check_same_config(path: Path, config: Config) -> None:
    """Refuse to continue, under this command's config, a run trained with another one."""
    stored = path / ckpt.CONFIG_NAME
    if not stored.is_file():
        return
    if yaml.safe_load(stored.read_text()) != yaml.safe_load(dump_config(config)):
        raise ValueError(
            f"{path} holds a run trained with another config than this command's: continue it "
            f"with --resume {path} (its own config), or set another output.name"
        )
