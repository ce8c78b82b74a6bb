"""The front doors of the 1-D and 3-D involution: :func:`involution1d` and :func:`involution3d`.

Same semantics as :func:`~involution.ops.involution2d` (contiguous groups, kernel taps in
row-major order, zero padding ``d*(K-1)//2`` by default), one more or one less spatial
dimension. Each checks its arguments, applies autocast, resolves the backend once and calls
``torch.ops.involution.involution3d`` (:mod:`involution.ops.registration_nd`); the 1-D op is
the 3-D one on (B, C, 1, 1, L) views, so every backend needs only a 3-D kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from involution.ops import registration_nd
from involution.ops.backends import resolve_backend
from involution.ops.checks import (
    autocast,
    check_backend,
    check_dtypes,
    check_groups,
    check_rank,
    check_tensors,
    geometry_nd,
)

__all__ = ["involution1d", "involution3d"]

#: An int for every spatial dimension, or one int per dimension.
IntOrTriple = int | tuple[int, int, int]

_LAYOUTS = {
    1: (("B", "C", "L"), ("B", "G", "K", "L_out")),
    3: (
        ("B", "C", "D", "H", "W"),
        ("B", "G", "Kd", "Kh", "Kw", "D_out", "H_out", "W_out"),
    ),
}


def as_tuple(name: str, value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    """``value`` as one int per spatial dimension; ``TypeError`` naming ``name`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * dims
    if (
        isinstance(value, (tuple, list))
        and len(value) == dims
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return tuple(int(v) for v in value)
    raise TypeError(f"{name} must be an int or {dims} ints, got {value!r}")


def check_nd(
    input: Tensor,
    weight: Tensor,
    stride: int | tuple[int, ...],
    padding: int | tuple[int, ...] | None,
    dilation: int | tuple[int, ...],
    dims: int,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Checks a ``dims``-D call and returns its (stride, padding, dilation), one int per
    dimension. ``ValueError``/``TypeError`` with the offending shapes or values."""
    check_tensors(input=input, weight=weight)
    input_layout, weight_layout = _LAYOUTS[dims]
    check_rank("input", input, input_layout)
    check_rank("weight", weight, weight_layout)
    shapes = f"input {tuple(input.shape)}, weight {tuple(weight.shape)}"
    size, kernel = tuple(input.shape[2:]), tuple(weight.shape[2 : 2 + dims])
    geo = geometry_nd(
        size,
        kernel,
        as_tuple("stride", stride, dims),
        None if padding is None else as_tuple("padding", padding, dims),
        as_tuple("dilation", dilation, dims),
    )
    if weight.shape[0] != input.shape[0]:
        raise ValueError(f"weight batch {weight.shape[0]} does not match input batch ({shapes})")
    check_groups(weight.shape[1], input.shape[1], shapes)
    if tuple(weight.shape[2 + dims :]) != geo.out_size:
        raise ValueError(
            f"weight output size {tuple(weight.shape[2 + dims :])} does not match the output "
            f"size {geo.out_size} of input {size} with kernel {kernel}, stride {geo.stride}, "
            f"padding {geo.padding}, dilation {geo.dilation} ({shapes})"
        )
    return geo.stride, geo.padding, geo.dilation


def _checked_involution3d(input: Tensor, weight: Tensor, conv_args: tuple, dims: int) -> Tensor:
    """Check a ``dims``-D call (1 or 3), autocast, and run the 3-D op (1-D on views).
    ``conv_args``: the front door's (stride, padding, dilation, backend)."""
    stride, padding, dilation, backend = conv_args
    check_backend(backend)
    geometry = check_nd(input, weight, stride, padding, dilation, dims)
    input, weight = autocast(input, weight)
    check_dtypes(input=input, weight=weight)
    concrete = resolve_backend(backend, input.device)
    if dims == 3:
        return registration_nd.involution3d_op(input, weight, *geometry, concrete)
    (s,), (p,), (d,) = geometry
    batch, groups, kernel, length = weight.shape
    output = registration_nd.involution3d_op(
        input.unsqueeze(2).unsqueeze(2),
        weight.view(batch, groups, 1, 1, kernel, 1, 1, length),
        (1, 1, s),
        (0, 0, p),
        (1, 1, d),
        concrete,
    )
    return output.flatten(1, 3).view(*input.shape[:2], length)


def involution3d(
    input: Tensor,
    weight: Tensor,
    stride: IntOrTriple = 1,
    padding: IntOrTriple | None = None,
    dilation: IntOrTriple = 1,
    backend: str = "auto",
) -> Tensor:
    r"""3-D involution: spatially varying, channel-shared kernels over volumes (or clips).

    .. math::
        y[b, c, o] = \sum_{k} W[b, g(c), k, o]\, x[b, c, o \odot s + k \odot d - p]

    for output voxels ``o`` and kernel taps ``k`` (3-vectors), zero padding, contiguous groups
    ``g(c) = c // (C // G)``.

    Args:
        input: (B, C, D, H, W) features, contiguous or channels_last_3d (kept in the output).
        weight: (B, G, Kd, Kh, Kw, D_out, H_out, W_out) per-voxel kernels; ``G`` divides ``C``.
            Kernels may be anisotropic, e.g. (3, 7, 7).
        stride: int or (sd, sh, sw), each >= 1.
        padding: int or a triple, each >= 0. ``None``: ``d*(K-1)//2`` per dimension (odd K;
            give even kernels an explicit padding).
        dilation: int or a triple, each >= 1.
        backend: ``"auto"`` (by device), ``"reference"``, ``"cpu"`` or ``"triton"``.

    Returns:
        (B, C, D_out, H_out, W_out), ``N_out = floor((N + 2p - d(K-1) - 1) / s) + 1``.

    Differentiable in ``input`` and ``weight``; half precision accumulates in float32.
    ``torch.compile``, ``torch.export`` and ``torch.onnx.export`` see the custom op
    ``torch.ops.involution.involution3d``; TorchScript calls it without these checks.
    """
    if torch.jit.is_scripting():
        return torch.ops.involution.involution3d(
            input,
            weight,
            _scripted_triple(stride),
            _scripted_padding(padding, weight.shape[2:5], _scripted_triple(dilation)),
            _scripted_triple(dilation),
            backend,
        )
    else:
        return _checked_involution3d(input, weight, (stride, padding, dilation, backend), 3)


def involution1d(
    input: Tensor,
    weight: Tensor,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    backend: str = "auto",
) -> Tensor:
    r"""1-D involution: :func:`involution3d` on sequences.

    .. math:: y[b, c, i] = \sum_{k} W[b, g(c), k, i]\, x[b, c, i s + k d - p]

    Args:
        input: (B, C, L) features.
        weight: (B, G, K, L_out) per-position kernels; ``G`` divides ``C``.
        stride, padding, dilation, backend: ints, as in :func:`involution3d` (``padding=None``:
            ``d*(K-1)//2``).

    Returns:
        (B, C, L_out), ``L_out = floor((L + 2p - d(K-1) - 1) / s) + 1``.
    """
    if torch.jit.is_scripting():
        batch, groups, kernel, length = weight.shape
        pad = dilation * (kernel - 1) // 2 if padding is None else padding
        output = torch.ops.involution.involution3d(
            input.unsqueeze(2).unsqueeze(2),
            weight.view(batch, groups, 1, 1, kernel, 1, 1, length),
            [1, 1, stride],
            [0, 0, pad],
            [1, 1, dilation],
            backend,
        )
        return output.flatten(1, 3).view(batch, input.shape[1], length)
    else:
        return _checked_involution3d(input, weight, (stride, padding, dilation, backend), 1)


def _scripted_triple(value: IntOrTriple) -> list[int]:
    """An int or triple as the op schema's int list (TorchScript's ``as_tuple``)."""
    if isinstance(value, int):
        return [value, value, value]
    return [value[0], value[1], value[2]]


def _scripted_padding(
    padding: IntOrTriple | None, kernel: list[int], dilation: list[int]
) -> list[int]:
    if padding is None:
        return [dilation[i] * (kernel[i] - 1) // 2 for i in range(3)]
    return _scripted_triple(padding)
