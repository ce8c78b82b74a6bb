"""``involution bench op --dims 1|3``: the 1-D/3-D involution against plain PyTorch and a conv.

On one problem per dimension (3-D: B2, C64, 8x28x28, kernel 3x7x7; 1-D: B8, C64, L4096,
kernel 7; 16 channels per group, stride 1), the forward and forward+backward passes of

- each involution backend (``torch.ops.involution.involution3d``),
- a plain shift-and-accumulate in PyTorch (one multiply-add of the padded, shifted input per
  kernel tap, autograd for the backward),
- a depthwise convolution of the same kernel size (``nn.Conv3d``/``nn.Conv1d``, groups=C),

timed like ``involution bench op`` (median and minimum of ``--repeats`` calls after
``--warmup``; gradients of input and kernels, or of input and conv parameters), and a
``memory roofline`` row: the least time each involution pass can take, that of a ``copy_``
that moves the bytes the pass must move (:func:`pass_bytes`), measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from involution.cli_utils import user_error
from involution.ops.nd import involution1d, involution3d

#: dims -> (batch, channels, spatial size, kernel size).
PROBLEMS: dict[int, tuple[int, int, tuple[int, ...], tuple[int, ...]]] = {
    3: (2, 64, (8, 28, 28), (3, 7, 7)),
    1: (8, 64, (4096,), (7,)),
}
GROUP_CHANNELS = 16
SHIFTS = "shift-and-accumulate"


def shift_and_accumulate(input: Tensor, weight: Tensor) -> Tensor:
    """Involution at stride 1, ``d*(K-1)//2`` padding, as a sum over the taps of the shifted
    input times the tap's kernel plane: input (B, C, *S), weight (B, G, *K, *S) -> (B, C, *S)."""
    dims = input.dim() - 2
    batch, channels, *size = input.shape
    groups, kernel = weight.shape[1], weight.shape[2 : 2 + dims]
    padded = F.pad(input, [(k - 1) // 2 for k in reversed(kernel) for _ in range(2)])
    grouped = padded.view(batch, groups, channels // groups, *padded.shape[2:])
    output = None
    for tap in itertools.product(*(range(k) for k in kernel)):
        window = grouped[(..., *(slice(t, t + n) for t, n in zip(tap, size, strict=True)))]
        term = window * weight[(slice(None), slice(None), *tap)].unsqueeze(2)
        output = term if output is None else output + term
    return output.reshape(input.shape)


def pass_bytes(input: Tensor, weight: Tensor) -> dict[str, int]:
    """Compulsory memory traffic of each pass at stride 1 (output as large as the input): the
    forward reads x and w and writes y; the backward reads grad_y, x and w and writes grad_x
    and grad_w."""
    x, w = input.nbytes, weight.nbytes
    return {"forward": 2 * x + w, "forward+backward": 5 * x + 3 * w}


def roofline_rows(
    input: Tensor, weight: Tensor, times_ms: Callable, warmup: int, repeats: int
) -> list[dict[str, Any]]:
    """The ``memory roofline`` rows: per pass, the fastest of ``repeats`` ``copy_`` calls that
    move as many bytes as the pass must (:func:`pass_bytes`: half read, half written), so
    caches help the copy as much as they can help the pass."""
    rows = []
    for name, nbytes in pass_bytes(input, weight).items():
        source = torch.randn(nbytes // 2 // input.element_size())
        target = torch.empty_like(source)
        copy = min(
            times_ms(lambda t=target, s=source: t.copy_(s), torch.device("cpu"), warmup, repeats)
        )
        rows.append(
            {
                "method": f"memory roofline (copy_ of {nbytes / 2**20:.0f} MiB)",
                "pass": name,
                "median_ms": copy,
                "min_ms": copy,
            }
        )
    return rows


def _methods(dims: int, backends: list[str]) -> dict[str, tuple[Callable, bool]]:
    """Method name -> (function of (input, weight or conv), is_involution)."""
    front_door = involution3d if dims == 3 else involution1d
    methods: dict[str, tuple[Callable, bool]] = {
        f"involution {name}": (lambda x, w, name=name: front_door(x, w, backend=name), True)
        for name in backends
    }
    methods[SHIFTS] = (shift_and_accumulate, True)
    methods[f"depthwise conv{dims}d"] = (lambda x, conv: conv(x), False)
    return methods


def run(
    dims: int, backends: list[str], warmup: int, repeats: int, times_ms: Callable
) -> list[dict[str, Any]]:
    """One row per (method, pass): median and minimum milliseconds on CPU, float32; the
    roofline rows last."""
    batch, channels, size, kernel = PROBLEMS[dims]
    torch.manual_seed(0)
    device = torch.device("cpu")
    input = torch.randn(batch, channels, *size, requires_grad=True)
    weight = torch.randn(batch, channels // GROUP_CHANNELS, *kernel, *size, requires_grad=True)
    conv_class = nn.Conv3d if dims == 3 else nn.Conv1d
    conv = conv_class(channels, channels, kernel, padding=[k // 2 for k in kernel], groups=channels)
    grad = torch.randn(batch, channels, *size)
    rows = []
    for method, (function, involution) in _methods(dims, backends).items():
        second = weight if involution else conv
        wrt = (input, weight) if involution else (input, *conv.parameters())

        def forward(function=function, second=second) -> Any:
            with torch.no_grad():
                return function(input, second)

        def forward_backward(function=function, second=second, wrt=wrt) -> Any:
            return torch.autograd.grad(function(input, second), wrt, grad)

        for pass_name, call in (("forward", forward), ("forward+backward", forward_backward)):
            times = times_ms(call, device, warmup, repeats)
            rows.append(
                {
                    "method": method,
                    "pass": pass_name,
                    "median_ms": sorted(times)[len(times) // 2],
                    "min_ms": min(times),
                }
            )
    return rows + roofline_rows(input, weight, times_ms, warmup, repeats)


def format_table(dims: int, rows: list[dict[str, Any]]) -> str:
    """Markdown table with each method's minimum time relative to the cpu backend's."""
    batch, channels, size, kernel = PROBLEMS[dims]
    title = (
        f"{dims}-D involution, B{batch} C{channels} {'x'.join(map(str, size))}, kernel "
        f"{'x'.join(map(str, kernel))}, G=C/{GROUP_CHANNELS}, float32, "
        f"{torch.get_num_threads()} threads"
    )
    ours = {r["pass"]: r["min_ms"] for r in rows if r["method"] == "involution cpu"}
    lines = [
        title,
        "",
        "| method | pass | median ms | min ms | x involution cpu (min) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["min_ms"] / ours[r["pass"]] if r["pass"] in ours else math.nan
        lines.append(
            f"| {r['method']} | {r['pass']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
            f"{ratio:.2f} |"
        )
    return "\n".join(lines)


def command(args: argparse.Namespace, times_ms: Callable) -> int:
    """``involution bench op --dims 1|3`` (CPU, float32): prints the table to stdout and
    writes ``--json`` when given. ``times_ms`` is :func:`involution.bench.op.times_ms`."""
    if args.device != "cpu":
        return user_error("bench op: --dims 1 and 3 run on CPU only")
    backends = args.backends or ["reference", "cpu"]
    rows = run(args.dims, backends, args.warmup, args.repeats, times_ms)
    print(format_table(args.dims, rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"dims": args.dims, "results": rows}, indent=2) + "\n")
    return 0
