"""Involution2d's regenerating training path on the Triton backend (ops/backends/triton/
regeneration.py): the fused forward from the activated features, and the backward that never
materialises the kernels, against the same layer's ATen composition (``layer_gradients`` with
the reference aggregation).

On CPU tensors these run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``conftest.py``), which is slow, hence the tiny shapes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from involution.ops import Involution2d
from involution.ops.backends import triton as triton_backend
from involution.ops.modules import set_kernel_regeneration

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.skipif(
    triton_backend.unavailable_reason(DEVICE) is not None,
    reason=f"triton backend unavailable: {triton_backend.unavailable_reason(DEVICE)}",
)

#: (channels, kernel, stride, dilation, group_channels, height, width, channels_last)
GEOMETRIES = {
    "odd_sizes_groups3": (12, 3, 1, 1, 4, 7, 5, False),
    "stride2_groups2": (8, 3, 2, 1, 4, 9, 7, False),
    "dilation2_groups1_channels_last": (6, 3, 1, 2, 6, 7, 6, True),
    "k5_stride2_channels_last": (12, 5, 2, 1, 4, 6, 7, True),
}

#: (rtol, atol): both sides accumulate in float64 (float32) and round the kernels alike.
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)}


def _layer(geometry: tuple, norm: str, span_bias: bool) -> Involution2d:
    channels, kernel, stride, dilation, group_channels = geometry[:5]
    kwargs = {"norm_layer": lambda c: nn.Identity()} if norm == "identity" else {}
    torch.manual_seed(0)
    layer = Involution2d(
        channels,
        kernel,
        stride=stride,
        dilation=dilation,
        group_channels=group_channels,
        reduction_ratio=2,
        backend="triton",
        **kwargs,
    )
    if not span_bias:
        layer.span.bias = None
    if norm != "identity":
        with torch.no_grad():  # affine weights and running statistics away from their defaults
            layer.norm.weight.uniform_(0.5, 1.5)
            layer.norm.bias.uniform_(-0.5, 0.5)
            layer.norm.running_mean.uniform_(-0.2, 0.2)
            layer.norm.running_var.uniform_(0.5, 2.0)
    layer.train()
    if norm == "eval":  # the detection backbones' norm_eval
        layer.norm.eval()
    return layer.to(DEVICE)


def _inputs(geometry: tuple, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    channels, _, stride, _, _, height, width, channels_last = geometry
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, channels, height, width, generator=generator, dtype=dtype)
    out_size = [-(-n // stride) for n in (height, width)]
    grad = torch.randn(2, channels, *out_size, generator=generator, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.to(DEVICE), grad.to(DEVICE)


def _step(layer: nn.Module, x: Tensor, grad: Tensor) -> list[Tensor]:
    """[output, grad_x, every parameter's gradient], after one forward and backward."""
    x = x.detach().clone().requires_grad_()
    output = layer(x)
    output.backward(grad)
    return [output.detach(), x.grad, *(p.grad for p in layer.parameters())]


@pytest.fixture(autouse=True)
def _full_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    # cuDNN may otherwise run the ATen side's span conv in TF32 on a GPU, while the Triton
    # kernels compute their products in full float32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture
def fused_backward_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the Triton backend's fused backward calls (so a silent fallback fails)."""
    calls: list[int] = []
    original = triton_backend.fused_backward

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(triton_backend, "fused_backward", counted)
    return calls


def _check_equals_aten(
    layer: Involution2d, geometry: tuple, dtype: torch.dtype, calls: list[int]
) -> None:
    layer = layer.to(dtype)
    aten = copy.deepcopy(layer)
    aten.backend = "reference"  # the same regenerating layer through layer_gradients' ATen ops
    x, grad = _inputs(geometry, dtype)
    ours, expected = _step(layer, x, grad), _step(aten, x, grad)
    assert calls, "the Triton fused backward did not run"
    rtol, atol = TOLERANCES[dtype]
    assert len(ours) == len(expected)
    for index, (actual, wanted) in enumerate(zip(ours, expected, strict=True)):
        torch.testing.assert_close(actual, wanted, rtol=rtol, atol=atol, msg=f"result {index}")
    if geometry[-1]:
        assert ours[1].is_contiguous(memory_format=torch.channels_last)
    for buffer, wanted in zip(layer.buffers(), aten.buffers(), strict=True):
        torch.testing.assert_close(buffer, wanted)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_equals_the_aten_composition(geometry, dtype, fused_backward_calls) -> None:
    _check_equals_aten(_layer(geometry, "train", True), geometry, dtype, fused_backward_calls)


@pytest.mark.parametrize(
    ("norm", "span_bias"), [("eval", True), ("identity", True), ("train", False)]
)
def test_equals_the_aten_composition_per_branch(norm, span_bias, fused_backward_calls) -> None:
    geometry = GEOMETRIES["stride2_groups2"]
    layer = _layer(geometry, norm, span_bias)
    _check_equals_aten(layer, geometry, torch.float32, fused_backward_calls)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_accumulates_in_float32(dtype, tolerance, fused_backward_calls) -> None:
    """float16/bfloat16 layers (products accumulated in float32, the kernels and dW rounded to
    the dtype as the unfused path stores them) against the float32 ATen composition: every
    result within ``tolerance`` of its largest magnitude."""
    geometry = GEOMETRIES["odd_sizes_groups3"]
    layer = _layer(geometry, "train", True)
    aten = copy.deepcopy(layer)
    aten.backend = "reference"
    x, grad = _inputs(geometry, torch.float32)
    ours = _step(layer.to(dtype), x.to(dtype), grad.to(dtype))
    expected = _step(aten, x, grad)
    assert fused_backward_calls
    for index, (actual, wanted) in enumerate(zip(ours, expected, strict=True)):
        assert actual.dtype == dtype
        error = (actual.float() - wanted).abs().max() / wanted.abs().max()
        assert error < tolerance, f"result {index}: {error:.2e}"


def test_deterministic_mode_sums_partials_alike(fused_backward_calls) -> None:
    """Under ``torch.use_deterministic_algorithms`` the span gradients are summed from
    per-program partials instead of atomics (here 2 programs of 2 pixel blocks each): the
    same values up to the summation order, and the same bits from run to run."""
    geometry = GEOMETRIES["stride2_groups2"]
    layer = _layer(geometry, "train", True)
    x, grad = _inputs(geometry, torch.float32)
    atomics = _step(copy.deepcopy(layer), x, grad)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        partials = _step(copy.deepcopy(layer), x, grad)
        again = _step(copy.deepcopy(layer), x, grad)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(fused_backward_calls) == 3
    for a, b, c in zip(atomics, partials, again, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert torch.equal(b, c)


def _largest_allocation(run) -> int:
    """The largest CPU allocation (bytes) that ``run()`` makes, by the profiler's memory
    events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return max(event.cpu_memory_usage for event in prof.events())


@pytest.mark.skipif(DEVICE.type != "cpu", reason="counts CPU allocations (the interpreter)")
def test_no_allocation_of_the_kernels_size(fused_backward_calls) -> None:
    """Neither the training forward nor the backward allocates a tensor as large as the
    kernels (B, G*K*K, H_out, W_out); the kept-kernel path, measured alike, does."""
    layer = Involution2d(8, 5, group_channels=2, backend="triton").train()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    kernel_bytes = 2 * 4 * 25 * 5 * 5 * x.element_size()
    result: list[Tensor] = []
    assert _largest_allocation(lambda: result.append(layer(x))) < kernel_bytes
    assert _largest_allocation(lambda: result[0].sum().backward()) < kernel_bytes
    assert fused_backward_calls
    kept = set_kernel_regeneration(copy.deepcopy(layer), False)
    assert _largest_allocation(lambda: kept(x).sum().backward()) >= kernel_bytes
