"""The cpu backend's fused regenerating backward (span_backward) against ATen's composition."""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
from torch import Tensor, nn

from involution.ops import Involution2d, involution2d
from involution.ops.backends import cpu
from involution.ops.modules import set_kernel_regeneration
from involution.ops.regenerate import KernelBranch, SavedLayer, layer_gradients

pytestmark = pytest.mark.skipif(
    cpu.unavailable_reason(torch.device("cpu")) is not None, reason="the C++ extension is not built"
)

# (batch, channels, group_channels, reduced, kernel, stride, dilation, height, width)
CASES = [
    (2, 16, 4, 8, 3, 1, 1, 7, 5),
    (1, 32, 16, 8, 7, 1, 1, 9, 11),  # RedNet's groups; one image: bands with halos
    (3, 16, 16, 4, 7, 2, 1, 9, 8),
    (2, 12, 3, 6, 3, 2, 2, 11, 7),
    (1, 8, 8, 4, 5, 1, 2, 13, 6),
    (2, 48, 16, 16, 3, 2, 1, 5, 5),
    # The register-tiled paths (16 channels per group, unit dilation): several column blocks
    # beside the border columns, rows past the image, and a map narrower than the kernel.
    (2, 32, 16, 8, 3, 1, 1, 6, 13),
    (2, 16, 16, 4, 7, 1, 1, 5, 23),
    (1, 16, 16, 4, 7, 2, 1, 8, 21),
    (2, 16, 16, 4, 7, 1, 1, 4, 5),
]
NORMS = ["train", "eval", "none"]


def _saved(case: tuple, norm: str, bias: bool, channels_last: bool, dtype) -> tuple:
    batch, channels, group_channels, reduced, k, stride, dilation, height, width = case
    g = torch.Generator().manual_seed(zlib.crc32(repr((case, norm, bias)).encode()))

    def rand(*shape: int, low: float = -1.0, high: float = 1.0) -> Tensor:
        return (torch.rand(*shape, generator=g, dtype=dtype) * (high - low) + low).contiguous()

    x = rand(batch, channels, height, width)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    kernels = channels // group_channels * k * k
    empty = x.new_empty(0)
    saved = SavedLayer(
        x=x,
        reduce_weight=rand(reduced, channels, 1, 1),
        norm_weight=None if norm == "none" else rand(reduced, low=0.5, high=1.5),
        norm_bias=None if norm == "none" else rand(reduced, low=-0.5, high=0.5),
        running=rand(2, reduced, low=0.5, high=1.5) if norm == "eval" else None,
        span_weight=rand(kernels, reduced, 1, 1),
        span_bias=rand(kernels) if bias else None,
        mean=rand(reduced, low=-0.3, high=0.3) if norm == "train" else empty,
        invstd=rand(reduced, low=0.5, high=2.0) if norm == "train" else empty,
    )
    branch = KernelBranch(
        kernel_size=k,
        groups=channels // group_channels,
        stride=stride,
        dilation=dilation,
        eps=None if norm == "none" else 1e-5,
        backend="cpu",
    )
    out_h, out_w = -(-height // stride), -(-width // stride)
    grad = rand(batch, channels, out_h, out_w)
    if channels_last:
        grad = grad.to(memory_format=torch.channels_last)
    return grad, saved, branch


def _both(grad: Tensor, saved: SavedLayer, branch: KernelBranch, needs, monkeypatch) -> tuple:
    calls = []
    fused_op = cpu.span_backward
    monkeypatch.setattr(cpu, "span_backward", lambda *a: calls.append(1) or fused_op(*a))
    fused = layer_gradients(grad, saved, branch, needs)
    assert calls == [1]
    monkeypatch.delattr(cpu, "span_backward")  # forces ATen's composition
    return fused, layer_gradients(grad, saved, branch, needs)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("norm", NORMS)
def test_equals_the_composition_float64(case, norm: str, monkeypatch) -> None:
    bias, channels_last = hash(case) % 2 == 0, norm == "eval"
    grad, saved, branch = _saved(case, norm, bias, channels_last, torch.float64)
    fused, composed = _both(grad, saved, branch, [True] * 7, monkeypatch)
    assert fused[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    for name, f, c in zip(SavedLayer._fields, fused, composed, strict=False):
        assert (f is None) == (c is None), name
        if f is not None:
            torch.testing.assert_close(f, c, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("case", CASES[1:4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_equals_the_composition_float32(case, channels_last: bool, monkeypatch) -> None:
    grad, saved, branch = _saved(case, "train", True, channels_last, torch.float32)
    fused, composed = _both(grad, saved, branch, [True] * 7, monkeypatch)
    for name, f, c in zip(SavedLayer._fields, fused, composed, strict=False):
        if f is not None:
            torch.testing.assert_close(f, c, rtol=1e-4, atol=1e-4, msg=name)


def test_only_the_gradients_asked_for_and_deterministic(monkeypatch) -> None:
    grad, saved, branch = _saved(CASES[1], "train", False, False, torch.float64)
    needs = [False, True, False, True, False, True, False]
    fused, composed = _both(grad, saved, branch, needs, monkeypatch)
    assert [f is None for f in fused] == [c is None for c in composed]
    assert [f is None for f in fused] == [True, False, True, False, True, False, True]
    for f, c in zip(fused, composed, strict=True):
        if f is not None:
            torch.testing.assert_close(f, c, rtol=1e-10, atol=1e-10)
    monkeypatch.undo()
    grad, saved, _ = _saved(CASES[1], "train", True, False, torch.float32)
    activated = saved.x[:, :8].relu()  # any (B, M, H_out, W_out)
    args = (grad, saved.x, activated, saved.span_weight, saved.span_bias, 7, 1, 1, (True,) * 3)
    first = cpu.span_backward(*args)
    for _ in range(3):  # tasks go to whichever thread asks first: the sums must not depend on it
        again = cpu.span_backward(*args)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_affine_rebuilds_the_output_float64(case, channels_last: bool) -> None:
    # span_backward(g, ..., output_affine=(A, B, D)) == span_backward(A*g + B + D*y, ...), y the
    # layer's output from the reference (unfold) aggregation.
    batch, channels, _, reduced, k, stride, dilation, _, _ = case
    grad, saved, branch = _saved(case, "train", True, channels_last, torch.float64)
    activated = torch.rand(batch, reduced, *grad.shape[2:], dtype=torch.float64)
    kernels = nn.functional.conv2d(activated, saved.span_weight, saved.span_bias)
    output = involution2d(
        saved.x,
        kernels.unflatten(1, (branch.groups, k, k)),
        stride,
        dilation * (k - 1) // 2,
        dilation,
        backend="reference",
    )
    coefficients = torch.rand(3, channels, dtype=torch.float64) - 0.5
    a, b, d = (c[:, None, None] for c in coefficients)
    for needs_input in (True, False):
        args = (saved.x, activated, saved.span_weight, saved.span_bias, k, stride, dilation)
        needs = (needs_input, True, True)
        fused = cpu.span_backward(grad, *args, needs, coefficients)
        expected = cpu.span_backward(a * grad + b + d * output, *args, needs)
        for f, e in zip(fused, expected, strict=True):
            assert (f is None) == (e is None)
            if f is not None:
                torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-10)


def _layer(stride: int, dilation: int, **kwargs) -> Involution2d:
    torch.manual_seed(0)
    layer = Involution2d(
        16,
        3,
        stride=stride,
        dilation=dilation,
        group_channels=4,
        reduction_ratio=2,
        backend="cpu",
        **kwargs,
    )
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.norm.bias.uniform_(-0.5, 0.5)
    return layer.train()


@pytest.mark.parametrize(("stride", "dilation"), [(1, 1), (2, 2)])
def test_gradcheck_float64_through_the_layer(stride: int, dilation: int, monkeypatch) -> None:
    calls = []
    fused_op = cpu.span_backward
    monkeypatch.setattr(cpu, "span_backward", lambda *a: calls.append(1) or fused_op(*a))
    layer = _layer(stride, dilation).double()
    x = torch.randn(2, 16, 7, 6, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())

    def run(x: Tensor, *_: Tensor) -> Tensor:
        return layer(x)

    assert torch.autograd.gradcheck(run, (x, *params), fast_mode=True)
    assert calls  # the fused backward ran


def test_compiled_training_fullgraph_equals_the_kept_path() -> None:
    layer = _layer(2, 1).to(memory_format=torch.channels_last)
    kept = set_kernel_regeneration(copy.deepcopy(layer), False)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 16, 9, 9).to(memory_format=torch.channels_last)
    grad = torch.randn(2, 16, 5, 5)
    results = []
    for model in (compiled, kept):
        x_grad = x.clone().requires_grad_()
        model(x_grad).backward(grad)
        results.append([x_grad.grad, *(p.grad for p in model.parameters())])
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected)


def test_half_precision_keeps_the_composition(monkeypatch) -> None:
    monkeypatch.setattr(cpu, "span_backward", lambda *a: pytest.fail("fused for bfloat16"))
    layer = _layer(1, 1, norm_layer=lambda c: nn.BatchNorm2d(c)).bfloat16()
    layer(torch.randn(2, 16, 6, 6, dtype=torch.bfloat16)).float().sum().backward()
    assert all(p.grad.isfinite().all() for p in layer.parameters())
