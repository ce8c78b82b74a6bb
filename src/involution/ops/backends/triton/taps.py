"""``@triton.jit`` helpers every kernel of the backend shares: where a kernel tap reads, and
where a pixel lies in a strided tensor.

Triton inlines a jit function into the kernel that calls it, so these cost nothing at run time;
they take and return tensors of any shape (broadcasting as the caller arranges its operands).
``geometry`` is the kernels' (stride, padding, dilation) argument: a tuple of three tuples with
one entry per spatial axis, ``AXIS`` (a constexpr) picking one. The helpers index it rather than
unpack it: the 3-D kernels pass it as a constexpr, and Triton 3.6 cannot unpack a constexpr tuple.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tap(out_pos, geometry, AXIS: tl.constexpr, k, size):
    """(input position, inside [0, size)) that tap ``k`` of output position ``out_pos`` reads,
    along axis ``AXIS``: ``out_pos * stride - pad + k * dil``."""
    stride, pad, dil = geometry[0][AXIS], geometry[1][AXIS], geometry[2][AXIS]
    pos = out_pos * stride - pad + k * dil
    return pos, (pos >= 0) & (pos < size)


@triton.jit
def adjoint_tap(in_pos, geometry, AXIS: tl.constexpr, k, out_size):
    """(output position, whether it exists) whose tap ``k`` reads input position ``in_pos``
    along axis ``AXIS``.

    ``o = (in_pos + pad - k * dil) / stride`` when that division is exact and
    ``0 <= o < out_size``; the gradient of the input gathers over these, without atomics.
    """
    stride, pad, dil = geometry[0][AXIS], geometry[1][AXIS], geometry[2][AXIS]
    shifted = in_pos + pad - k * dil
    pos = shifted // stride
    # shifted >= 0 is tested as well: the rounding of // and % on negatives does not matter then.
    return pos, (shifted >= 0) & (shifted % stride == 0) & (pos < out_size)


@triton.jit
def source(pos, geometry, AXIS: tl.constexpr, k, size, out_size, ADJOINT: tl.constexpr):
    """(position, whether it exists) that a gather at position ``pos`` reads through tap ``k``
    along axis ``AXIS``: the input position :func:`tap` of output position ``pos``, or when
    ``ADJOINT`` the output position :func:`adjoint_tap` of input position ``pos``. ``size`` and
    ``out_size`` are the input's and the output's sizes along the axis."""
    if ADJOINT:
        return adjoint_tap(pos, geometry, AXIS, k, out_size)
    return tap(pos, geometry, AXIS, k, size)


@triton.jit
def spatial_offsets(strides, row, col):
    """Offsets of pixels (``row``, ``col``) in a (B, C, H, W) tensor of ``strides``."""
    return row * strides[2] + col * strides[3]
