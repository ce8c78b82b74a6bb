"""Test-session setup shared by every test file."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

# Without a GPU the Triton kernels are tested in Triton's CPU interpreter. ``triton.jit``
# decides between compiling and interpreting when a kernel is *defined*, i.e. when its module is
# first imported, so the variable must be set here, before any test module imports a kernel;
# it also makes the "triton" backend report itself available for CPU tensors. setdefault keeps
# an explicit choice (e.g. TRITON_INTERPRET=0) from the environment.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One fixed tiling per Triton kernel on a GPU: autotuning every random test shape over all
# candidate tilings would take minutes; the benchmarks exercise the autotuner.
os.environ.setdefault("INVOLUTION_TRITON_AUTOTUNE", "0")


def gradcheck_module(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Float64 ``gradcheck`` (fast mode) of ``module(x)`` in ``x`` and every parameter of
    ``module``: gradcheck perturbs the parameters in place, so the module sees them."""
    params = list(module.parameters())

    def run(x: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return module(x)

    return torch.autograd.gradcheck(run, (x, *params), fast_mode=True)


def training_step(
    model: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``model(x)`` backward with ``grad`` on a fresh leaf copy of ``x``: (the output, x's
    gradient, each parameter's gradient)."""
    x = x.detach().clone().requires_grad_()
    output = model(x)
    output.backward(grad)
    return output.detach(), x.grad, [p.grad for p in model.parameters()]


def assert_same_training_step(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    x: torch.Tensor,
    grad: torch.Tensor,
    **tolerances: Any,
) -> None:
    """One :func:`training_step` of each on the same ``x`` and ``grad``: the outputs, the input
    gradients, the parameter gradients and the buffers close (``tolerances`` as
    ``assert_close``'s), each parameter and buffer named where it fails."""
    out, grad_x, grads = training_step(model, x, grad)
    out_ref, grad_x_ref, grads_ref = training_step(reference, x, grad)
    torch.testing.assert_close(out, out_ref, **tolerances)
    torch.testing.assert_close(grad_x, grad_x_ref, **tolerances)
    names = [name for name, _ in model.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, msg=lambda m, n=name: f"{n}: {m}", **tolerances)
    for (name, b), b_ref in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, msg=lambda m, n=name: f"{n}: {m}", **tolerances)


def assert_same_accumulated_and_autocast_gradients(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    x: torch.Tensor,
    **float32_tolerances: Any,
) -> None:
    """The parameter gradients of ``model`` and ``reference`` close after two micro-batches of
    ``x`` accumulated (``float32_tolerances`` as ``assert_close``'s), then after one step under
    bfloat16 CPU autocast (whose output must be bfloat16), at bfloat16's tolerances."""
    for net in (model, reference):
        for half in x.chunk(2):  # two micro-batches, one optimizer step
            net(half).square().sum().backward()
    for p, p_ref in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, **float32_tolerances)
    for net in (model, reference):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
    for p, p_ref in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=0.05, rtol=0.02)


def fashion_mnist_scenes(tmp_path_factory: pytest.TempPathFactory, **params: Any) -> Path:
    """A small Fashion-MNIST scenes set (``involution.datasets.scenes.build_scenes`` with
    ``params``) in a fresh temporary folder; skips the test where Fashion-MNIST is absent."""
    from involution.datasets.fashion_mnist import find_fashion_mnist
    from involution.datasets.scenes import build_scenes

    try:
        fashion_mnist = find_fashion_mnist(download=False)
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST not available: {err}")
    root = tmp_path_factory.mktemp("scenes") / "fm"
    return build_scenes(root, fashion_mnist_root=fashion_mnist, **params)


# Skip reasons grouped under one name each in the end-of-run line (first pattern found in the
# reason, case-insensitive, wins); any other reason is named as it is.
SKIP_GROUPS: tuple[tuple[str, str], ...] = (
    ("conformance data not found", "official conformance data not found at ../shared/conformance/"),
    ("fashion-mnist", "Fashion-MNIST not available"),
    ("cuda gpu", "needs a CUDA GPU"),
)


def skip_group(reason: str) -> str:
    """The end-of-run name of a skip ``reason`` (pytest's "Skipped: " prefix removed)."""
    reason = reason.removeprefix("Skipped: ")
    return next((name for pattern, name in SKIP_GROUPS if pattern in reason.lower()), reason)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """End the run with one line naming what was skipped and why, grouped by reason.

    Under xdist the workers' reports come back to the controller, each skip with
    ``longrepr = (path, line, reason)``.
    """
    reports = terminalreporter.stats.get("skipped", [])
    reasons = [r.longrepr[2] for r in reports if isinstance(r.longrepr, tuple)]
    if reasons:
        counts = Counter(skip_group(reason) for reason in reasons)
        groups = "; ".join(f"{n}: {name}" for name, n in counts.most_common())
        terminalreporter.write_line(f"skipped {len(reasons)} -- {groups}")
