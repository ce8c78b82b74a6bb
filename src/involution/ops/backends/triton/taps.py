"""``@triton.jit`` helpers every kernel of the backend shares: where a kernel tap reads.

Triton inlines a jit function into the kernel that calls it, so these cost nothing at run time;
they take and return tensors of any shape (broadcasting as the caller arranges its operands).
"""

from __future__ import annotations

import triton
import triton.language as tl  # noqa: F401  (Triton requires it in a jit function's globals)


@triton.jit
def tap(out_pos, stride, pad, k, dil, size):
    """(input position, inside [0, size)) that tap ``k`` of output position ``out_pos`` reads,
    along one axis: ``out_pos * stride - pad + k * dil``."""
    pos = out_pos * stride - pad + k * dil
    return pos, (pos >= 0) & (pos < size)


@triton.jit
def adjoint_tap(in_pos, stride, pad, k, dil, out_size):
    """(output position, whether it exists) whose tap ``k`` reads input position ``in_pos``.

    ``o = (in_pos + pad - k * dil) / stride`` when that division is exact and
    ``0 <= o < out_size``; the gradient of the input gathers over these, without atomics.
    """
    shifted = in_pos + pad - k * dil
    pos = shifted // stride
    # shifted >= 0 is tested as well: the rounding of // and % on negatives does not matter then.
    return pos, (shifted >= 0) & (shifted % stride == 0) & (pos < out_size)
