"""Crash-safe run-directory files: training checkpoints, safetensors weights, metrics.

Every file is written to a temporary name in the same folder, flushed to disk, then moved
over the old one with ``os.replace`` (atomic on POSIX): a kill at any moment leaves either the
previous complete file or the new complete one.

A training checkpoint holds tensors and plain data only (RNG states included), so resuming
reads it with ``weights_only=True`` (:mod:`involution.serialization`): a run directory from
elsewhere cannot run code. :func:`upgrade_checkpoint` rewrites a trusted older checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from involution.serialization import (
    UPGRADE_COMMAND,
    load_safetensors,
    load_torch_file,
    to_plain_data,
)

CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "model.safetensors"
EMA_WEIGHTS_NAME = "model_ema.safetensors"
CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "curves.png"


TEMPORARY_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success, fsync it and move it onto ``path``.

    The move is made durable too (the folder is fsynced): after a power cut ``path`` is the old
    file or the new one. An error while writing (a full disk) removes the temporary and leaves
    ``path`` as it was; a killed process leaves the temporary (:func:`remove_temporaries`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    finally:
        tmp.unlink(missing_ok=True)


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is an unfinished write of :func:`atomic_path`."""
    return path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIX)


def remove_temporaries(folder: Path) -> None:
    """Delete the unfinished writes a killed process left in ``folder``."""
    for path in folder.iterdir():
        if is_temporary(path):
            path.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` atomically through ``write(binary_file)``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically ``torch.save`` a training state as tensors and plain data.

    Raises ``TypeError`` (before writing) for an entry that would not load back with
    ``weights_only=True``.
    """
    plain = to_plain_data(state)
    atomic_write(path, lambda f: torch.save(plain, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training state saved by :func:`save_checkpoint` (on the CPU, weights only).

    A file holding anything but tensors and plain data is refused unread
    (:class:`~involution.serialization.UnsafeFileError`, a ``ValueError``).
    """
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    remedy = (
        "If it is a training checkpoint you trust, written before involution stored RNG "
        f"states as tensors, convert it on a trusted machine: {UPGRADE_COMMAND} {path} {path}"
    )
    return load_torch_file(path, remedy)


def upgrade_checkpoint(src: Path, dst: Path) -> None:
    """Rewrite a trusted checkpoint ``src`` as tensors and plain data at ``dst`` (may be ``src``).

    ``src`` is unpickled in full, so it may run code: only for files whose origin is trusted,
    on a machine where that is acceptable. Numpy arrays become tensors, numpy scalars Python
    numbers and ``argparse.Namespace`` dicts (old RNG states thus take the current format);
    any other object raises ``TypeError`` naming its entry, and nothing is written.
    """
    if not src.is_file():
        raise FileNotFoundError(f"no checkpoint at {src}")
    try:
        # The one full unpickle in the project: the caller vouches for ``src``.
        state = torch.load(src, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
        raise ValueError(f"cannot read {src} (truncated or not a checkpoint): {err}") from err
    save_checkpoint(dst, state)
    load_torch_file(dst)  # the result reads back with weights_only=True


def save_weights(path: Path, model: nn.Module, metadata: dict[str, str]) -> None:
    """Atomically save ``model``'s state dict as safetensors with string ``metadata``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a run's safetensors weights file (a pickle is refused)."""
    return load_safetensors(path)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON record as a line (small appends: a crash loses at most this line)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete JSON lines of ``path`` (a torn last line is ignored)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records logged after ``last_step`` (they are re-logged when a resumed run redoes
    those steps)."""
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop may draw from (Python, numpy, torch CPU and CUDA), as
    tensors and plain data.

    ``python``: ``random.getstate()`` (a tuple of ints); ``numpy``: ``np.random.get_state()``
    with its uint32 key array as an int64 tensor of 624 entries (uint32 tensors cannot cross
    ``all_gather_object``'s pickling); ``torch``: the CPU generator's uint8 tensor; ``cuda``:
    one uint8 tensor per device.
    """
    kind, keys, *position = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), *position),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNGs saved by :func:`rng_state`."""
    random.setstate(state["python"])
    kind, keys, *position = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *position))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
