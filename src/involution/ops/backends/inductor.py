"""The ``"inductor"`` backend: the op as shift-and-accumulate in PyTorch, compiled by inductor.

Every pass is written with pad, strided slices, multiplies and sums over the K*K taps (the
taps are a strided view, never a materialised unfolded tensor), and compiled with
``torch.compile`` (the forward, the input gradient and the weight gradient each as their own
function), so on CUDA the Triton code that inductor generates competes with the hand-written
kernels of the ``"triton"`` backend (whose dispatch can delegate here when the winner table
says so). The backend runs on CUDA tensors; called directly on CPU tensors (tests, the Triton
interpreter) the same functions run eagerly.

- forward: ``y[g, c, p] = sum_k w[g, k, p] * x_pad[g, c, p*s + k*d]``, where tap ``k`` of every
  output pixel is one strided slice of the zero-padded input; the K*K slices are taken as one
  strided view (``Tensor.unfold``), multiplied and summed over the taps.
- grad_input, the adjoint gather: ``grad_x_pad = sum_k place_k(w[:, :, k] * grad_y)``, where
  ``place_k`` puts an (H_out, W_out) map at the tap's offset of the padded input, spread by the
  stride (pads and reshapes, which inductor fuses into one kernel that reads each tap's term).
- grad_weight: ``sum_c grad_y[g, c, p] * x_pad[g, c, p*s + k*d]`` over the group's channels,
  for every tap of the same view.

Half-precision tensors are computed in float32. Compiled functions are cached per geometry
(kernel size, stride, padding, dilation) with dynamic sizes, so a new batch or image size
does not recompile.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from involution.ops.layout import Pair, memory_format_of

#: Compiled functions per (pass, geometry, device type); each recompiles for a new dtype or
#: memory layout, so the per-function recompile limit is raised for these calls.
_RECOMPILE_LIMIT = 64


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` on CUDA devices with Triton, else why the backend cannot run there.

    CPU tensors are refused: compiling for them would produce C++ no faster than the ``"cpu"``
    backend, at seconds per new problem. (The passes still run eagerly on CPU tensors when
    called directly, as the tests and the Triton interpreter's dispatch do.)
    """
    if device.type != "cuda":
        return (
            f"the inductor backend compiles the op for CUDA GPUs, got {device.type!r} "
            "(on CPU use the 'cpu' backend)"
        )
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if importlib.util.find_spec("triton") is None:
        return "torch.compile needs Triton for CUDA tensors (pip install triton)"
    return None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Geometry:
    """Kernel size, stride, padding, dilation and the padded input size of one problem."""

    def __init__(
        self,
        input_size: Pair,
        kernel: Pair,
        out_size: Pair,
        stride: Pair,
        padding: Pair,
        dilation: Pair,
    ) -> None:
        self.kernel, self.out_size = kernel, out_size
        self.stride, self.padding, self.dilation = stride, padding, dilation
        # Bottom/right padding: exactly what the last tap of the last output pixel reaches
        # (negative: rows/columns past it are cropped).
        self.pad_end = tuple(
            (o - 1) * s + (k - 1) * d - p - (n - 1)
            for n, k, o, s, p, d in zip(
                input_size, kernel, out_size, stride, padding, dilation, strict=True
            )
        )
        self.padded = tuple(
            n + p + e for n, p, e in zip(input_size, padding, self.pad_end, strict=True)
        )

    def pad(self, x: Tensor) -> Tensor:
        """Zero-pad (or crop) the last two dimensions of ``x`` to the padded input size."""
        (top, left), (bottom, right) = self.padding, self.pad_end
        return F.pad(x, (left, right, top, bottom))

    def taps(self, x_pad: Tensor) -> Tensor:
        """(..., H_out, W_out, Kh, Kw): the input pixels every tap of every output pixel reads.

        Tap (kh, kw) is the strided slice ``x_pad[..., kh*d :: s, kw*d :: s]`` (H_out x W_out
        of it); all taps together are one strided view of ``x_pad`` (no copy).
        """
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        extent_h, extent_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
        windows = x_pad.unfold(-2, extent_h, sh).unfold(-2, extent_w, sw)
        return windows[..., : self.out_size[0], : self.out_size[1], ::dh, ::dw]

    def place(self, value: Tensor, kh: int, kw: int) -> Tensor:
        """The adjoint of tap (kh, kw) of :meth:`taps`: ``value`` (..., H_out, W_out) on the
        padded input grid, zero elsewhere."""
        (sh, sw), (dh, dw), (oh, ow) = self.stride, self.dilation, self.out_size
        if (sh, sw) != (1, 1):  # zeros between the pixels: (oh, sh, ow, sw) -> (oh*sh, ow*sw)
            spread = F.pad(value[..., :, None, :, None], (0, sw - 1, 0, 0, 0, sh - 1))
            value = spread.flatten(-4, -3).flatten(-2, -1)[
                ..., : (oh - 1) * sh + 1, : (ow - 1) * sw + 1
            ]
        top, left = kh * dh, kw * dw
        height, width = value.shape[-2:]
        bottom, right = self.padded[0] - top - height, self.padded[1] - left - width
        return F.pad(value, (left, right, top, bottom))

    def crop(self, x_pad: Tensor) -> Tensor:
        """The (..., H, W) input part of a padded-grid tensor (zeros where :meth:`pad` cropped)."""
        (top, left), (bottom, right) = self.padding, self.pad_end
        return F.pad(x_pad, (-left, -right, -top, -bottom))


def _grouped(tensor: Tensor, groups: int) -> Tensor:
    """(B, C, H, W) -> (B, G, C/G, H, W), a view."""
    batch, channels, height, width = tensor.shape
    return tensor.view(batch, groups, channels // groups, height, width)


def _forward(input: Tensor, weight: Tensor, geometry: _Geometry) -> Tensor:
    dtype = _compute_dtype(input.dtype)
    batch, channels = input.shape[:2]
    groups = weight.shape[1]
    taps = geometry.taps(_grouped(geometry.pad(input), groups))  # (B, G, C/G, Ho, Wo, Kh, Kw)
    kernels = weight.permute(0, 1, 4, 5, 2, 3)[:, :, None]  # (B, G, 1, Ho, Wo, Kh, Kw)
    output = (taps.to(dtype) * kernels.to(dtype)).sum(dim=(-2, -1))
    output = output.reshape(batch, channels, *geometry.out_size).to(input.dtype)
    return output.contiguous(memory_format=memory_format_of(input))


def _backward_input(
    grad_output: Tensor, input: Tensor, weight: Tensor, geometry: _Geometry
) -> Tensor:
    dtype = _compute_dtype(input.dtype)
    batch, channels, height, width = input.shape
    groups = weight.shape[1]
    kernel_h, kernel_w = geometry.kernel
    grad = _grouped(grad_output, groups).to(dtype)
    grad_pad = None
    for kh in range(kernel_h):
        for kw in range(kernel_w):
            term = geometry.place(grad * weight[:, :, None, kh, kw].to(dtype), kh, kw)
            grad_pad = term if grad_pad is None else grad_pad + term
    grad_input = geometry.crop(grad_pad).reshape(batch, channels, height, width)
    return grad_input.to(input.dtype).contiguous(memory_format=memory_format_of(input))


def _backward_weight(
    grad_output: Tensor, input: Tensor, weight: Tensor, geometry: _Geometry
) -> Tensor:
    dtype = _compute_dtype(input.dtype)
    groups = weight.shape[1]
    taps = geometry.taps(_grouped(geometry.pad(input), groups))  # (B, G, C/G, Ho, Wo, Kh, Kw)
    grad = _grouped(grad_output, groups)[..., None, None]
    grad_weight = (taps.to(dtype) * grad.to(dtype)).sum(dim=2)  # (B, G, Ho, Wo, Kh, Kw)
    return grad_weight.permute(0, 1, 4, 5, 2, 3).to(weight.dtype).contiguous()


def _backward(
    grad_output: Tensor, input: Tensor, weight: Tensor, geometry: _Geometry
) -> tuple[Tensor, Tensor]:
    return (
        _backward_input(grad_output, input, weight, geometry),
        _backward_weight(grad_output, input, weight, geometry),
    )


#: The passes: name -> function(*tensors, geometry); tensors end with (input, weight).
_PASSES: dict[str, Callable] = {
    "forward": _forward,
    "backward_input": _backward_input,
    "backward_weight": _backward_weight,
    "backward": _backward,
}


@functools.lru_cache(maxsize=256)
def _compiled(pass_name: str, geometry_args: tuple, compiler: str) -> Callable:
    """Pass ``pass_name`` compiled for one geometry (sizes dynamic, the geometry constant)."""
    function, geometry = _PASSES[pass_name], _Geometry(*geometry_args)

    def run(*tensors: Tensor):
        return function(*tensors, geometry)

    return torch.compile(run, backend=compiler, dynamic=True, fullgraph=True)


def call(
    pass_name: str,
    *tensors: Tensor,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    compiler: str | None = None,
):
    """Run pass ``pass_name`` (``"forward"``, ``"backward_input"``, ``"backward_weight"`` or
    ``"backward"``) on ``tensors``: (input, weight) for the forward, (grad_output, input,
    weight) for the gradients.

    ``compiler`` is the ``torch.compile`` backend; by default ``"inductor"`` for CUDA tensors,
    and no compilation for others.
    """
    input, weight = tensors[-2:]
    geometry_args = (
        tuple(input.shape[-2:]),
        tuple(weight.shape[2:4]),
        tuple(weight.shape[4:6]),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
    )
    compiler = compiler or ("inductor" if input.is_cuda else None)
    if compiler is None:
        return _PASSES[pass_name](*tensors, _Geometry(*geometry_args))
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
        return _compiled(pass_name, geometry_args, compiler)(*tensors)


def forward(input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair) -> Tensor:
    """(B, C, H, W), (B, G, Kh, Kw, H_out, W_out) -> (B, C, H_out, W_out), input's layout."""
    return call("forward", input, weight, stride=stride, padding=padding, dilation=dilation)


def backward_input(
    grad_output: Tensor, input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair
) -> Tensor:
    """Gradient (B, C, H, W) with respect to ``input``, in its memory format."""
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    return call("backward_input", grad_output, input, weight, **geometry)


def backward_weight(
    grad_output: Tensor, input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair
) -> Tensor:
    """Gradient (B, G, Kh, Kw, H_out, W_out) with respect to ``weight``, contiguous."""
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    return call("backward_weight", grad_output, input, weight, **geometry)


def backward(
    grad_output: Tensor, input: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair
) -> tuple[Tensor, Tensor]:
    """Both gradients from one compiled function (inductor may share their reads)."""
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    return call("backward", grad_output, input, weight, **geometry)
