"""The involution operator in standard PyTorch operators, for tracers and exporters.

The registered op (:mod:`involution.ops.registration`) runs C++ or Triton kernels. Here is the
same computation written with operators every tracer and exporter knows (pad, index/slice,
multiply, sum, convolution), in several formulations, for models that must not contain the
custom op: :class:`~involution.ops.Involution2d` with ``exportable=True`` (timm's
``set_layer_config(exportable=True)`` sets it in RedNet) uses the active one
(:data:`DEFAULT_LOWERING`, or the one chosen with :func:`use_lowering`) in every mode, so that
``torch.jit.trace`` and ``torch.export`` (for runtimes without this library) see standard
operators. ``torch.onnx.export`` needs none of this: it translates the op itself
(:mod:`involution.ops.onnx_translation`, the ``"shifts"`` formulation in ONNX operators).

All take ``input`` (B, C, H, W) and ``weight`` (B, G, Kh, Kw, H_out, W_out) with (height, width)
pairs ``stride``, ``padding``, ``dilation`` already validated by the front door, and return
(B, C, H_out, W_out). None does size arithmetic in Python: slices count their end from the far
edge and gather indices come from ``weight``'s sizes, so traced graphs keep batch, height and
width dynamic.

The formulations, and what each becomes in ONNX when traced:

- ``"gather"``: two Gathers with (H_out, Kh) and (W_out, Kw) window indices build the unfolded
  input (B, C, H_out, Kh, W_out, Kw), one Mul with the kernels, one ReduceSum over the taps.
- ``"rows"``: one Gather along the width gives (B, C, H_pad, W_out, Kw); for each of the Kh
  kernel rows a strided Slice, Mul, ReduceSum over Kw and Add. Stores Kw copies of the input.
- ``"shifts"`` (the default): for each of the Kh*Kw taps a strided Slice of the padded input
  and a multiply-add with the tap's kernel plane. Nothing larger than the input is ever
  stored, so each step works in cache: the fastest in onnxruntime on RedNet-50's layers. Its
  Kh*Kw steps are also the slowest to trace (``torch.export`` with dynamic shapes: about 15 s
  per 7x7 layer on a 2-core CPU), which is why ONNX export emits them directly instead.
- ``"onehot"``: a grouped Conv with a fixed one-hot (C*Kh*Kw, 1, Kh, Kw) weight gathers the
  taps (Kh*Kw times the multiply-adds of the gather it replaces), then Mul and ReduceSum.

``involution bench onnx-lowering`` times them in onnxruntime (the README has the table).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from involution.ops.layout import Pair

__all__ = [
    "DEFAULT_LOWERING",
    "LOWERINGS",
    "active_lowering",
    "exporting_to_onnx",
    "involution2d_lowered",
    "use_lowering",
]


def _padded(input: Tensor, padding: Pair) -> Tensor:
    return F.pad(input, (padding[1], padding[1], padding[0], padding[0]))


def _windows(out_size: int, kernel: int, stride: int, dilation: int, device: torch.device):
    """Input positions read by each (output position, tap): (out_size * kernel,) int64."""
    starts = torch.arange(out_size, device=device) * stride
    taps = torch.arange(kernel, device=device) * dilation
    return (starts[:, None] + taps[None, :]).flatten()


def gather(input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair) -> Tensor:
    """Unfold with two axis Gathers, multiply, reduce over the taps (see the module docstring)."""
    batch, channels = input.shape[:2]
    _, groups, kh, kw, out_h, out_w = weight.shape
    padded = _padded(input, padding)
    cols = padded.index_select(3, _windows(out_w, kw, stride[1], dilation[1], input.device))
    cols = cols.index_select(2, _windows(out_h, kh, stride[0], dilation[0], input.device))
    cols = cols.view(batch, groups, channels // groups, out_h, kh, out_w, kw)
    kernels = weight.permute(0, 1, 4, 2, 5, 3).unsqueeze(2)  # (B, G, 1, H_out, Kh, W_out, Kw)
    return (cols * kernels).sum((4, 6)).view(batch, channels, out_h, out_w)


def _taps(tensor: Tensor, dim: int, tap: int, kernel: int, stride: int, dilation: int) -> Tensor:
    """The positions along ``dim`` that kernel tap ``tap`` reads for every output position.

    A strided slice whose end is counted from the far edge (a constant), so that exports carry
    no size arithmetic.
    """
    end = (kernel - 1 - tap) * dilation
    index = [slice(None)] * tensor.dim()
    index[dim] = slice(tap * dilation, -end if end else None, stride)
    return tensor[tuple(index)]


def rows(input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair) -> Tensor:
    """Gather along the width once, then one strided slice per kernel row (module docstring)."""
    batch, channels = input.shape[:2]
    _, groups, kh, kw, out_h, out_w = weight.shape
    padded = _padded(input, padding)
    cols = padded.index_select(3, _windows(out_w, kw, stride[1], dilation[1], input.device))
    cols = cols.view(batch, groups, channels // groups, -1, out_w, kw)
    kernels = weight.permute(0, 1, 2, 4, 5, 3)  # (B, G, Kh, H_out, W_out, Kw)
    output = None
    for u in range(kh):
        taps = _taps(cols, 3, u, kh, stride[0], dilation[0])
        term = (taps * kernels[:, :, u].unsqueeze(2)).sum(-1)
        output = term if output is None else output + term
    return output.reshape(batch, channels, out_h, out_w)


def shifts(input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair) -> Tensor:
    """One strided slice and one multiply-add per tap (module docstring)."""
    batch, channels = input.shape[:2]
    _, groups, kh, kw, out_h, out_w = weight.shape
    padded = _padded(input, padding).unflatten(1, (groups, channels // groups))
    # Kh*Kw kernel planes (B, G, 1, H_out, W_out), split in one op (one ONNX Split)
    kernels = weight.flatten(2, 3).unsqueeze(2).unbind(3)
    output = None
    for u in range(kh):
        row = _taps(padded, 3, u, kh, stride[0], dilation[0])
        for v in range(kw):
            tap = _taps(row, 4, v, kw, stride[1], dilation[1])
            kernel = kernels[u * kw + v]
            output = tap * kernel if output is None else torch.addcmul(output, tap, kernel)
    return output.reshape(batch, channels, out_h, out_w)


def onehot(input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair) -> Tensor:
    """Gather the taps with a one-hot grouped convolution, multiply, reduce (module docstring)."""
    batch, channels = input.shape[:2]
    _, groups, kh, kw, out_h, out_w = weight.shape
    taps = kh * kw
    eye = torch.eye(taps, dtype=input.dtype, device=input.device).view(taps, 1, kh, kw)
    cols = F.conv2d(
        input,
        eye.repeat(channels, 1, 1, 1),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=channels,
    )
    cols = cols.view(batch, groups, channels // groups, taps, out_h, out_w)
    kernels = weight.reshape(batch, groups, 1, taps, out_h, out_w)
    return (cols * kernels).sum(3).view(batch, channels, out_h, out_w)


Lowering = Callable[[Tensor, Tensor, Pair, Pair, Pair], Tensor]

#: Formulation name -> function. All give the same result within float rounding.
LOWERINGS: dict[str, Lowering] = {
    "gather": gather,
    "rows": rows,
    "shifts": shifts,
    "onehot": onehot,
}
#: The formulation exports use unless :func:`use_lowering` picks another.
DEFAULT_LOWERING = "shifts"
_chosen: list[str] = []


@contextlib.contextmanager
def use_lowering(name: str) -> Iterator[None]:
    """Lower the op with formulation ``name`` (a key of :data:`LOWERINGS`) inside the block."""
    if name not in LOWERINGS:
        raise ValueError(f"unknown lowering {name!r}; choose one of {tuple(LOWERINGS)}")
    _chosen.append(name)
    try:
        yield
    finally:
        _chosen.pop()


def active_lowering() -> str:
    """The formulation :func:`involution2d_lowered` uses now."""
    return _chosen[-1] if _chosen else DEFAULT_LOWERING


def involution2d_lowered(
    input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair
) -> Tensor:
    """The op in standard operators with the active formulation; arguments as the backends'.

    Computed in the dtype of the tensors (the exported graph's precision is the model's).
    """
    return LOWERINGS[active_lowering()](input, weight, stride, padding, dilation)


def exporting_to_onnx() -> bool:
    """Whether ``torch.onnx.export(..., dynamo=True)`` is capturing the model now.

    ``torch.compiler.is_exporting()`` first: it is a plain flag, so ``torch.compile`` never
    traces into the ONNX exporter's state.
    """
    return torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export()
