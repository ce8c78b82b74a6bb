"""Official RedNet checkpoints (d-li14/involution, mmcls format) -> this library's RedNet.

An official file is ``{"meta": ..., "state_dict": {...}}`` with ``backbone.*`` keys (and
``head.fc.*`` for classifiers). :func:`convert_official_state_dict` renames the keys,
:func:`infer_rednet_kwargs` reads the architecture off the tensor shapes, and
:func:`check_state_dict` compares a state dict with a model key by key and shape by shape, so
a file from another model, a truncated file or a wrong depth fails with the offending keys
listed. Files are read by :func:`involution.serialization.read_state_dict` (``weights_only``
or safetensors): a pickle holding more than tensors and plain data is refused unread. The CLI
``involution convert SRC DST`` writes our state dict as safetensors.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from involution.models.rednet import MODEL_DEPTHS, RedNet, official_key_to_ours
from involution.serialization import read_state_dict

__all__ = [
    "CONVERTED_KEY",
    "CheckpointMismatchError",
    "check_state_dict",
    "convert_checkpoint",
    "convert_official_state_dict",
    "infer_rednet_kwargs",
    "is_official_state_dict",
    "load_checkpoint",
    "load_official_checkpoint",
    "read_rednet_state_dict",
    "read_state_dict",
    "rednet_from_checkpoint",
]

#: Metadata key of a converted safetensors file: the RedNet constructor arguments (JSON).
CONVERTED_KEY = "rednet_kwargs"
#: Listed keys per category in error messages (the rest is counted).
_MAX_LISTED = 20
_STAGE_BLOCK = re.compile(r"layer(\d+)\.(\d+)\.")


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit a model: missing, unexpected or mis-shaped keys."""

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        context: str = "",
    ) -> None:
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        lines = [f"state dict does not match the model{context}:"]
        for title, items in (
            ("missing keys (in the model, not in the checkpoint)", missing),
            ("unexpected keys (in the checkpoint, not in the model)", unexpected),
            (
                "shape mismatches (key: checkpoint vs model)",
                [f"{key}: {tuple(got)} vs {tuple(want)}" for key, got, want in mismatched],
            ),
        ):
            if items:
                listed = ", ".join(items[:_MAX_LISTED])
                hidden = len(items) - _MAX_LISTED
                more = f", ... ({hidden} more)" if hidden > 0 else ""
                lines.append(f"  {len(items)} {title}: {listed}{more}")
        super().__init__("\n".join(lines))


def is_official_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether the keys follow the official mmcls layout (``backbone.*`` / ``head.*``)."""
    return any(key.startswith(("backbone.", "head.")) for key in state_dict)


def convert_official_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an official mmcls RedNet state dict to ours (tensors are not copied).

    Works on any tensors, including ``meta`` ones. Raises :class:`CheckpointMismatchError`
    listing every key that has no counterpart in our layout.
    """
    converted: dict[str, Tensor] = {}
    unexpected = []
    for key, value in state_dict.items():
        ours = official_key_to_ours(key)
        if ours is None:
            unexpected.append(key)
        else:
            converted[ours] = value
    if unexpected:
        raise CheckpointMismatchError(
            [], unexpected, [], " (keys with no counterpart in an official RedNet)"
        )
    return converted


def _not_a_rednet(state_dict: Mapping[str, Tensor], reason: str) -> CheckpointMismatchError:
    """The error for a state dict whose architecture cannot be read: its differences from the
    official RedNet depth (1000 classes) that shares the most keys with it."""
    best: tuple[int, int, dict[str, Tensor]] | None = None
    for depth, layers in MODEL_DEPTHS.items():
        with torch.device("meta"):
            expected = RedNet(layers).state_dict()
        shared = len(expected.keys() & state_dict.keys())
        if best is None or shared > best[0]:
            best = (shared, depth, expected)
    _, depth, expected = best
    mismatched = [
        (key, tuple(value.shape), tuple(expected[key].shape))
        for key, value in state_dict.items()
        if key in expected and value.shape != expected[key].shape
    ]
    return CheckpointMismatchError(
        [key for key in expected if key not in state_dict],
        [key for key in state_dict if key not in expected],
        mismatched,
        f" (not a RedNet checkpoint: {reason}; compared with rednet{depth}, the official "
        "depth sharing the most keys)",
    )


def _require(state_dict: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in state_dict:
        raise _not_a_rednet(state_dict, f"it has no {key}")
    return state_dict[key]


def infer_rednet_kwargs(state_dict: Mapping[str, Tensor], group_channels: int = 16) -> dict:
    """RedNet constructor arguments that reproduce the shapes of ``state_dict`` (our keys).

    Reads the depths, widths, stem/bottleneck kernel sizes, reduction ratio, mixer, classes
    and input channels. ``group_channels`` cannot be told apart from K from the shapes alone
    (the kernel generator has ``C / group_channels * K * K`` outputs), so it is an argument.
    The stem type (deep/compact) does not change any shape and is left to the caller.
    """
    depths: dict[int, int] = {}
    for key in state_dict:
        match = _STAGE_BLOCK.match(key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    if not depths or sorted(depths) != list(range(1, len(depths) + 1)):
        found = ", ".join(f"layer{i}" for i in sorted(depths)) or "none"
        raise _not_a_rednet(state_dict, f"no consecutive layer1..layerN blocks (found: {found})")
    stages = range(1, len(depths) + 1)
    widths = tuple(_require(state_dict, f"layer{i}.0.conv1.weight").shape[0] for i in stages)
    stem_inv_span = _require(state_dict, "stem.inv.span.weight")
    stem_width = _require(state_dict, "stem.conv2.weight").shape[0]
    kwargs: dict[str, Any] = dict(
        layers=tuple(depths[i] for i in stages),
        stage_widths=widths,
        stem_width=stem_width,
        in_chans=_require(state_dict, "stem.conv1.weight").shape[1],
        stem_kernel_size=_kernel_size(stem_inv_span.shape[0], stem_width // 2, group_channels),
        group_channels=group_channels,
        num_classes=state_dict["fc.weight"].shape[0] if "fc.weight" in state_dict else 0,
    )
    if "layer1.0.conv2.weight" in state_dict:
        kwargs["mixer"] = "conv"
    else:
        span = _require(state_dict, "layer1.0.conv2.span.weight")
        kwargs["kernel_size"] = _kernel_size(span.shape[0], widths[0], group_channels)
        kwargs["reduction_ratio"] = widths[0] // span.shape[1]
    return kwargs


def _kernel_size(span_channels: int, channels: int, group_channels: int) -> int:
    """K from a kernel generator with ``channels // group_channels * K * K`` outputs."""
    groups = channels // group_channels
    k = math.isqrt(span_channels // groups) if groups else 0
    if groups == 0 or groups * k * k != span_channels:
        raise ValueError(
            f"a kernel generator with {span_channels} outputs does not fit {channels} channels "
            f"in groups of {group_channels}"
        )
    return k


def check_state_dict(
    state_dict: Mapping[str, Tensor], model: nn.Module | Mapping[str, Tensor]
) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state_dict`` fills exactly ``model``'s keys
    with the right shapes (``model`` may be a module or its state dict, e.g. on ``meta``)."""
    expected = model.state_dict() if isinstance(model, nn.Module) else model
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        (key, tuple(value.shape), tuple(expected[key].shape))
        for key, value in state_dict.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched)


def read_rednet_state_dict(path: str | PathLike) -> dict[str, Tensor]:
    """The tensors of an official or converted checkpoint file in our key layout (an official
    file's keys renamed by :func:`convert_official_state_dict`)."""
    state_dict = read_state_dict(path)
    if is_official_state_dict(state_dict):
        return convert_official_state_dict(state_dict)
    return state_dict


def load_checkpoint(model: nn.Module, path: str | PathLike) -> nn.Module:
    """Load an official or converted checkpoint into ``model`` after a full key/shape check."""
    state_dict = read_rednet_state_dict(path)
    check_state_dict(state_dict, model)
    model.load_state_dict(state_dict)
    return model


def load_official_checkpoint(model: nn.Module, path: str | PathLike) -> nn.Module:
    """Load an official mmcls RedNet checkpoint into ``model`` (see :func:`load_checkpoint`)."""
    state_dict = read_state_dict(path)
    if not is_official_state_dict(state_dict):
        raise ValueError(f"{path} is not an official mmcls checkpoint (no backbone.* keys)")
    return load_checkpoint(model, path)


def rednet_from_checkpoint(path: str | PathLike, **kwargs: Any) -> RedNet:
    """Build the RedNet an official or converted checkpoint describes, and load it.

    ``kwargs`` override or extend the inferred constructor arguments (e.g. ``stem_type``,
    ``backend``, ``group_channels``).
    """
    state_dict = read_rednet_state_dict(path)
    group_channels = kwargs.get("group_channels", 16)
    model = RedNet.from_kwargs({**infer_rednet_kwargs(state_dict, group_channels), **kwargs})
    check_state_dict(state_dict, model)
    model.load_state_dict(state_dict)
    return model


def convert_checkpoint(src: str | PathLike, dst: str | PathLike) -> dict[str, Any]:
    """Convert an official checkpoint file to our safetensors state dict; returns its kwargs.

    The architecture is inferred and every key and shape checked against a model built on the
    ``meta`` device (no memory is spent on weights). The inferred constructor arguments are
    stored in the file's metadata under ``"rednet_kwargs"`` (JSON).
    """
    state_dict = read_rednet_state_dict(src)
    kwargs = infer_rednet_kwargs(state_dict)
    with torch.device("meta"):
        expected = RedNet.from_kwargs(kwargs).state_dict()
    check_state_dict(state_dict, expected)
    tensors = {key: value.contiguous() for key, value in state_dict.items()}
    save_file(tensors, Path(dst), metadata={CONVERTED_KEY: json.dumps(kwargs)})
    return kwargs
