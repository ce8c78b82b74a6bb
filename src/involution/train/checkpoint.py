"""Crash-safe run-directory files: training checkpoints, safetensors weights, metrics.

Every file is written to a temporary name in the same folder, flushed to disk, then moved
over the old one with ``os.replace`` (atomic on POSIX): a kill at any moment leaves either the
previous complete file or the new complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "model.safetensors"
EMA_WEIGHTS_NAME = "model_ema.safetensors"
CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "curves.png"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success, fsync it and move it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` atomically through ``write(binary_file)``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically ``torch.save`` a training state."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training state saved by :func:`save_checkpoint` (on the CPU)."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # Our own file, holding RNG states and numpy scalars: not restricted to weights.
    return torch.load(path, map_location="cpu", weights_only=False)


def save_weights(path: Path, model: nn.Module, metadata: dict[str, str]) -> None:
    """Atomically save ``model``'s state dict as safetensors with string ``metadata``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensors[key] = f.get_tensor(key)
    return tensors, metadata


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
    """Every RNG the training loop may draw from (Python, numpy, torch CPU and CUDA)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNGs saved by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
