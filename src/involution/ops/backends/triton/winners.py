"""The per-shape winner table: which Triton variant runs each pass of each problem.

``involution bench gpu`` times every variant on every layer shape and writes the fastest per
pass into a JSON file; the ``"triton"`` backend (and so ``backend="auto"`` on CUDA) reads it
on every call. The committed table is ``winners.json`` beside this module;
``INVOLUTION_TRITON_WINNERS=/path/to/table.json`` points to another one. A missing file, or a
problem or pass it does not list, means the safe default, :data:`DEFAULT_VARIANT`.

Format (``"format": 1``)::

    {"format": 1, "device": "NVIDIA H100 80GB HBM3", "source": "involution bench gpu ...",
     "winners": {"<shape key>": {"forward": "tiled", "backward": "gather", "fused": "tiled"}}}

with shape keys from :func:`shape_key`. The batch size is not part of the key: a table
measured at one batch size is used for all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from involution.ops.layout import Pair, memory_format_of

#: The Triton variants: ``"gather"`` (the first kernels, one group per program), ``"tiled"``
#: (channel-vector tiles, :mod:`involution.ops.backends.triton.tiled`) and ``"inductor"`` (the
#: op written in PyTorch and compiled by torch.compile, :mod:`involution.ops.backends.inductor`).
VARIANTS: tuple[str, ...] = ("gather", "tiled", "inductor")
#: The passes a table chooses for: the aggregation forward, its two gradients (one choice for
#: both) and the fused forward (kernel generation inside the aggregation).
PASSES: tuple[str, ...] = ("forward", "backward", "fused")
#: The variants with their own fused forward; others materialise the kernels first.
FUSED_VARIANTS: tuple[str, ...] = ("gather", "tiled")
#: What runs where no table says otherwise: the kernels measured on an H100 so far.
DEFAULT_VARIANT = "gather"
FORMAT = 1
WINNERS_ENV = "INVOLUTION_TRITON_WINNERS"
DEFAULT_PATH = Path(__file__).with_name("winners.json")
_DEFAULT_NAME = str(DEFAULT_PATH)


def shape_key(
    input: torch.Tensor,
    weight_shape: tuple[int, ...],
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> str:
    """The table key of one problem: dtype, layout, channels, groups, sizes and geometry.

    ``input`` is (B, C, H, W) (its dtype and memory format count, not its batch size);
    ``weight_shape`` is (B, G, Kh, Kw, H_out, W_out).
    """
    _, channels, height, width = input.shape
    groups, kernel_h, kernel_w = weight_shape[1:4]
    dtype = str(input.dtype).removeprefix("torch.")
    layout = "channels_last" if memory_format_of(input) == torch.channels_last else "nchw"
    return (
        f"{dtype}/{layout}/C{channels}/G{groups}/{height}x{width}/K{kernel_h}x{kernel_w}"
        f"/s{stride[0]}x{stride[1]}/p{padding[0]}x{padding[1]}/d{dilation[0]}x{dilation[1]}"
    )


def _check_table(data: object, path: Path) -> dict[str, dict[str, str]]:
    """The ``winners`` mapping of a parsed table; ``ValueError`` naming the bad entry."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not an involution winner table (expected 'format': {FORMAT})")
    winners = data.get("winners")
    if not isinstance(winners, dict):
        raise ValueError(f"{path}: 'winners' must map shape keys to {{pass: variant}}")
    for key, choices in winners.items():
        if not isinstance(choices, dict):
            raise ValueError(f"{path}: entry {key!r} must map passes to variants")
        for pass_name, variant in choices.items():
            allowed = FUSED_VARIANTS if pass_name == "fused" else VARIANTS
            if pass_name not in PASSES or variant not in allowed:
                raise ValueError(
                    f"{path}: entry {key!r} has {pass_name!r}: {variant!r}; passes are "
                    f"{PASSES}, variants {VARIANTS} ({FUSED_VARIANTS} for 'fused')"
                )
    return winners


#: Tables read so far: path -> (modification time in ns, winners). Every call checks the
#: file's modification time (one stat), so a table rewritten in-process is re-read.
_loaded: dict[str, tuple[int, dict[str, dict[str, str]]]] = {}


def load_table(path: Path | str | None = None) -> dict[str, dict[str, str]]:
    """The winners of the table at ``path`` (default: ``$INVOLUTION_TRITON_WINNERS`` when set,
    else the committed :data:`DEFAULT_PATH`); ``{}`` when the file does not exist."""
    name = str(path) if path is not None else os.environ.get(WINNERS_ENV) or _DEFAULT_NAME
    try:
        modified_ns = os.stat(name).st_mtime_ns
    except FileNotFoundError:
        return {}
    cached = _loaded.get(name)
    if cached is not None and cached[0] == modified_ns:
        return cached[1]
    try:
        data = json.loads(Path(name).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{name}: not valid JSON ({error})") from None
    winners = _check_table(data, Path(name))
    _loaded[name] = (modified_ns, winners)
    return winners


def lookup(pass_name: str, key: str, path: Path | None = None) -> str:
    """The variant for ``pass_name`` of the problem ``key``; the default when not listed."""
    if pass_name not in PASSES:
        raise ValueError(f"unknown pass {pass_name!r}; choose one of {PASSES}")
    return load_table(path).get(key, {}).get(pass_name, DEFAULT_VARIANT)


def write_table(path: Path, winners: dict[str, dict[str, str]], device: str, source: str) -> None:
    """Write a winner table (checked as :func:`load_table` would read it)."""
    data = {"format": FORMAT, "device": device, "source": source, "winners": winners}
    _check_table(data, Path(path))
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
