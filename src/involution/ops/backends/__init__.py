"""Backends of the involution operator, behind one front door.

Every backend is a module exposing the same four functions (and optionally two more), all taking
already-validated arguments (see the front doors in :mod:`involution.ops.functional`):

- ``unavailable_reason(device) -> str | None``: why the backend cannot run on ``device``
  (``None`` when it can).
- ``forward(input, weight, stride, padding, dilation) -> output``
- ``backward_input(grad_output, input, weight, stride, padding, dilation) -> grad_input``
- ``backward_weight(grad_output, input, weight, stride, padding, dilation) -> grad_weight``
- optional ``backward(grad_output, input, weight, stride, padding, dilation) -> (grad_input,
  grad_weight)``, for a backend that saves work by computing both in one call.
- optional ``fused_forward(input, reduced, span_weight, span_bias, kernel_size, stride, padding,
  dilation) -> output``, for a backend that generates the kernels inside the aggregation
  (``reduced`` (B, R, H_out, W_out), ``span_weight`` (G*Kh*Kw, R), ``span_bias`` (G*Kh*Kw,) or
  ``None``); without it the fused op runs the span conv, then ``forward``.
- optional ``fused_backward(grad_output, input, reduced, span_weight, span_bias, kernel_size,
  stride, padding, dilation, needs) -> (grad_input, grad_reduced, grad_span_weight,
  grad_span_bias)``: the gradients of ``fused_forward`` without materialising the kernels
  (``needs``: input, span weight, span bias), which the regenerating training path
  (:mod:`involution.ops.regenerate`) uses in eager mode; ``"triton"`` has it.
- optional ``layer_prepare(spec) -> run or None``: the whole Involution2d layer for inference
  (pooled kernel branch, reduce conv + ReLU, span conv, aggregation, optional per-channel
  affine + ReLU, optional 1x1 projection + residual + ReLU) in one pass, for an
  :class:`~involution.ops.layer.Involution2dLayerSpec` (configuration and parameters, checked),
  as ``run(input, residual) -> output`` with the parameters prepared once for all its calls;
  ``None`` where it does not handle them (e.g. the dtype), and the layer op composes the steps
  instead.
- optional ``span_backward(grad_output, input, activated, span_weight, span_bias, kernel_size,
  stride, dilation, needs) -> (grad_input, grad_activated, grad_span_weight, grad_span_bias)``:
  ``fused_backward``'s gradients for the layer's square, "same"-padded geometry, as a
  registered op with a fake implementation, so traced code runs it too (``needs``: input, span
  weight, span bias); :func:`involution.ops.regenerate.layer_gradients` uses it, ``"cpu"`` has
  it (float32, float64).
- optional ``forward3d`` and ``backward3d``: the 3-D op (and so the 1-D one), see
  :mod:`involution.ops.registration_nd`; ``reference``, ``cpu`` and ``triton`` have them.

Shapes: ``input`` (B, C, H, W), ``weight`` (B, G, Kh, Kw, H_out, W_out), ``output`` and
``grad_output`` (B, C, H_out, W_out), any strides; ``stride``, ``padding``, ``dilation`` are pairs.
Backends may return any memory layout: the custom op normalises it. Backends import only
downward (:mod:`involution.ops.layout`, :mod:`involution.ops.layer`), never the registration or
the front doors.

``"reference"`` is the ground truth every other backend is tested against.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

#: Backend name -> module implementing it. ``"auto"`` is resolved by :func:`resolve_backend`.
_BACKEND_MODULES: dict[str, str] = {
    "reference": "involution.ops.backends.reference",
    "cpu": "involution.ops.backends.cpu",
    "triton": "involution.ops.backends.triton",
    "inductor": "involution.ops.backends.inductor",
}

BACKENDS: tuple[str, ...] = ("auto", *_BACKEND_MODULES)


def get_backend(name: str) -> ModuleType:
    """The module implementing backend ``name`` (not ``"auto"``)."""
    module = _LOADED.get(name)
    if module is not None:
        return module
    try:
        path = _BACKEND_MODULES[name]
    except KeyError:
        raise ValueError(f"unknown involution backend {name!r}; choose one of {BACKENDS}") from None
    # Kept: the ops look their backend up on every call (import_module costs microseconds).
    module = _LOADED[name] = importlib.import_module(path)
    return module


_LOADED: dict[str, ModuleType] = {}


# Evaluated once at trace time under torch.compile: the choice depends only on constants.
@torch.compiler.assume_constant_result
def resolve_backend(name: str, device: torch.device) -> str:
    """Turn a user-facing backend name into a concrete one that can run on ``device``.

    ``"auto"`` picks ``"cpu"`` on CPU tensors, ``"triton"`` on CUDA tensors when Triton is
    usable, and ``"reference"`` everywhere else. An explicit name that cannot run on
    ``device`` raises ``RuntimeError`` with the reason.
    """
    if name == "auto":
        preferred = {"cpu": "cpu", "cuda": "triton"}.get(device.type, "reference")
        if get_backend(preferred).unavailable_reason(device) is None:
            return preferred
        return "reference"
    reason = get_backend(name).unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"involution backend {name!r} is unavailable on {device}: {reason}")
    return name
