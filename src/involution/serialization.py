"""Reading tensor files from elsewhere without running code from them.

``torch.load`` unpickles, and a pickle may call any Python function while it is read. Every
``torch.save`` file the project reads (training checkpoints for ``--resume``, model checkpoints
for ``convert``, ``rednet_from_checkpoint`` and timm's ``pretrained_cfg_overlay``) goes through
:func:`load_torch_file`, which reads with ``weights_only=True``: tensors and plain data (dict,
list, tuple, str, int, float, bool, None) only. A file holding anything else is refused with
:class:`UnsafeFileError` before any of its code runs. Safetensors files hold tensors and string
metadata only; :func:`load_safetensors` reads them and refuses a pickle passed in their place.

Files saved by the project are plain data by construction (:func:`to_plain_data`). Files the
user trusts but that hold more (training checkpoints written before RNG states were stored as
tensors, checkpoints with numpy arrays or an ``argparse.Namespace``) are rewritten once, on a
machine where running their code is acceptable, with ``involution upgrade-checkpoint OLD NEW``.
"""

from __future__ import annotations

import argparse
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

__all__ = [
    "UPGRADE_COMMAND",
    "UnsafeFileError",
    "load_safetensors",
    "load_tensor_file",
    "load_torch_file",
    "read_state_dict",
    "to_plain_data",
]

#: The command that rewrites a trusted file as tensors and plain data.
UPGRADE_COMMAND = "involution upgrade-checkpoint"

# What torch.load raises on truncated or foreign files (besides the weights-only refusal).
_READ_ERRORS = (
    RuntimeError,
    EOFError,
    KeyError,
    ValueError,
    IndexError,
    OSError,  # e.g. EINVAL from the zip reader on a truncated archive
    struct.error,
    zipfile.BadZipFile,
    pickle.UnpicklingError,
)
# torch.load wraps every refusal of its weights-only unpickler in this phrase.
_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"
# The refused object, when the unpickler names it ("GLOBAL posix.system ...").
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format
_PICKLE_PROTO = b"\x80"  # first byte of a pickle stream (torch.save's legacy format)
# Leaves kept as they are by to_plain_data (exact types: subclasses such as numpy.float64
# would be pickled as their own class).
_PLAIN_LEAVES = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.Size)


class UnsafeFileError(ValueError):
    """A file holding more than tensors and plain data: refused before anything in it ran."""


def _is_pickle(path: Path) -> bool:
    """Whether ``path`` starts like a ``torch.save`` zip archive or a pickle stream."""
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    return head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO)


def _default_remedy(path: Path) -> str:
    return (
        f"If you trust its origin, convert it on a trusted machine (the conversion runs what "
        f"the file contains): {UPGRADE_COMMAND} {path} NEW, then use NEW"
    )


def load_torch_file(path: str | PathLike, remedy: str | None = None) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that say why.

    Raises :class:`UnsafeFileError` (ending with ``remedy``, or a default pointing to
    ``involution upgrade-checkpoint``) for a pickle that holds anything but tensors and plain
    data, ``ValueError`` for a truncated or foreign file, ``FileNotFoundError`` if absent.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    # Opened here so that an OSError from torch.load is about the content, not the access.
    with open(path, "rb") as f:
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            message = str(err)
            if _WEIGHTS_ONLY_REFUSAL in message and _is_pickle(path):
                refused = _REFUSED_GLOBAL.search(message)
                detail = f" (it refers to {refused.group(1)})" if refused else ""
                # torch's own message suggests weights_only=False: not chained, on purpose.
                raise UnsafeFileError(
                    f"{path} contains objects other than tensors and plain data{detail}, so it "
                    "was not loaded (nothing in it was executed). "
                    f"{remedy or _default_remedy(path)}"
                ) from None
            raise _unreadable(path, err) from None
        except _READ_ERRORS as err:
            raise _unreadable(path, err) from None


def _unreadable(path: Path, err: Exception) -> ValueError:
    return ValueError(f"cannot read {path} (truncated or not a checkpoint): {err}")


def load_safetensors(path: str | PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and string metadata of a safetensors file.

    A ``torch.save``/pickle file in its place is refused unread with :class:`UnsafeFileError`;
    other unreadable files raise ``ValueError``, a missing one ``FileNotFoundError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = f.get_tensor(key)
    except SafetensorError as err:
        if _is_pickle(path):
            raise UnsafeFileError(
                f"{path} is a torch.save (pickle) file, not safetensors, so it was not loaded "
                "(nothing in it was executed): only .safetensors weights are read here (a RedNet "
                f"checkpoint becomes one with `involution convert {path} OUT.safetensors`)"
            ) from None
        raise ValueError(
            f"cannot read {path} (truncated or not a safetensors file): {err}"
        ) from None
    return tensors, metadata


def load_tensor_file(path: str | PathLike, remedy: str | None = None) -> Any:
    """A ``.safetensors`` file's tensors, or a ``torch.save`` file's content (weights only)."""
    if Path(path).suffix == ".safetensors":
        return load_safetensors(path)[0]
    return load_torch_file(path, remedy)


def read_state_dict(path: str | PathLike, remedy: str | None = None) -> dict[str, Tensor]:
    """Tensors of a checkpoint file: safetensors, or a ``torch.save`` file (weights only)
    holding either a state dict or a dict with a ``"state_dict"`` entry (mmcls, timm)."""
    checkpoint = load_tensor_file(path, remedy)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in checkpoint.items()
    ):
        raise ValueError(f"{path} holds no state dict (a mapping of names to tensors)")
    return dict(checkpoint)


def to_plain_data(obj: Any, where: str = "the checkpoint") -> Any:
    """``obj`` with numpy arrays as tensors, numpy scalars as Python numbers and
    ``argparse.Namespace`` as dicts: what ``torch.load(weights_only=True)`` reads back.

    Dicts, lists and tuples are converted recursively; tensors and plain leaves are kept.
    Raises ``TypeError`` naming the entry (``where[key][index]``) for any other object.
    """
    if isinstance(obj, Tensor) or type(obj) in _PLAIN_LEAVES:
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f"{where} is a numpy array of Python objects, not plain data")
        return torch.from_numpy(np.array(obj))  # a copy: the tensor owns its memory
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        kind = OrderedDict if isinstance(obj, OrderedDict) else dict
        return kind(
            (to_plain_data(key, f"{where} key {key!r}"), to_plain_data(value, f"{where}[{key!r}]"))
            for key, value in obj.items()
        )
    if isinstance(obj, list | tuple):
        items = [to_plain_data(value, f"{where}[{i}]") for i, value in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which is not a tensor "
        "or plain data (dict, list, tuple, str, int, float, bool, None)"
    )
