"""Backends of the involution operator, behind one front door.

Every backend is a module exposing the same four functions (and optionally a fifth), all taking
already-validated
arguments (see :func:`involution.functional.involution2d`):

- ``unavailable_reason(device) -> str | None``: why the backend cannot run on ``device``
  (``None`` when it can).
- ``forward(input, weight, stride, padding, dilation) -> output``
- ``backward_input(grad_output, input, weight, stride, padding, dilation) -> grad_input``
- ``backward_weight(grad_output, input, weight, stride, padding, dilation) -> grad_weight``
- optional ``backward(grad_output, input, weight, stride, padding, dilation) -> (grad_input,
  grad_weight)``, for a backend that saves work by computing both in one call.

Shapes: ``input`` (B, C, H, W), ``weight`` (B, G, Kh, Kw, H_out, W_out), ``output`` and
``grad_output`` (B, C, H_out, W_out), any strides; ``stride``, ``padding``, ``dilation`` are pairs.
Backends may return any memory layout: the custom op normalises it.

``"reference"`` is the ground truth every other backend is tested against.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

#: Backend name -> module implementing it. ``"auto"`` is resolved by :func:`resolve_backend`.
_BACKEND_MODULES: dict[str, str] = {
    "reference": "involution.backends.reference",
    "cpu": "involution.backends.cpu",
    "triton": "involution.backends.triton",
}

BACKENDS: tuple[str, ...] = ("auto", *_BACKEND_MODULES)


def get_backend(name: str) -> ModuleType:
    """The module implementing backend ``name`` (not ``"auto"``)."""
    try:
        return importlib.import_module(_BACKEND_MODULES[name])
    except KeyError:
        raise ValueError(f"unknown involution backend {name!r}; choose one of {BACKENDS}") from None


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
