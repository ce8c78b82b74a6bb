"""The deep stem's max pool (StemMaxPool2d): nn.MaxPool2d's values, indices and gradients;
BatchNorm + ReLU + max pool in one training op (norm_relu_max_pool): the modules' values,
gradients and running statistics; the cpu backend's kernel-branch average pool: ATen's, bitwise."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck

from conftest import assert_same_training_step
from involution.models.pooling import StemMaxPool2d, norm_relu_max_pool, norm_relu_max_pool_applies
from involution.ops.modules import set_kernel_regeneration

#: (B, C, H, W): odd and even sizes, a single row and column, one channel (NCHW and
#: channels_last at once, which the channels_last path leaves to nn.MaxPool2d).
SHAPES = [(2, 3, 8, 8), (3, 5, 7, 9), (1, 4, 1, 6), (2, 1, 5, 5), (2, 16, 13, 11)]


def _inputs(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Distinct values, ReLU-like zeros, and small integers (ties inside most windows)."""
    generator = torch.Generator().manual_seed(sum(shape))
    values = torch.randn(shape, generator=generator, dtype=dtype)
    integers = torch.randint(-2, 3, shape, generator=generator).to(dtype)
    return [values, values.relu(), integers]


def _forward_backward(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    y = module(x)
    grad = torch.arange(y.numel(), dtype=y.dtype).view_as(y)  # tells the indices apart
    y.backward(grad)
    return y, x.grad


@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradients_equal_nn_max_pool(shape: tuple[int, ...]) -> None:
    for x in _inputs(shape):
        y, grad = _forward_backward(StemMaxPool2d(), x)
        expected_y, expected_grad = _forward_backward(nn.MaxPool2d(3, stride=2, padding=1), x)
        assert torch.equal(y, expected_y)
        assert torch.equal(grad, expected_grad)  # the same index for every tie
        assert y.is_contiguous() and grad.is_contiguous()
    pooled = StemMaxPool2d()(_inputs(shape)[0].requires_grad_())
    channels_last_path = shape[1] > 1  # one channel is channels_last too: nn.MaxPool2d's
    assert (type(pooled.grad_fn).__name__ == "_ChannelsLastMaxPool2dBackward") is (
        channels_last_path
    )


def test_channels_last_input_keeps_its_layout() -> None:
    x = _inputs((2, 8, 9, 10))[0].contiguous(memory_format=torch.channels_last)
    y, grad = _forward_backward(StemMaxPool2d(), x)
    expected_y, expected_grad = _forward_backward(nn.MaxPool2d(3, stride=2, padding=1), x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, expected_y) and torch.equal(grad, expected_grad)


def test_gradcheck_float64() -> None:
    x = _inputs((2, 3, 7, 6), torch.float64)[0].requires_grad_()
    assert gradcheck(StemMaxPool2d(), (x,))


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda m, x: torch.jit.script(m), id="script"),
        pytest.param(lambda m, x: torch.jit.trace(m, x), id="trace"),
        pytest.param(lambda m, x: torch.fx.symbolic_trace(m), id="fx"),
        pytest.param(lambda m, x: torch.compile(m, fullgraph=True, backend="eager"), id="compile"),
    ],
)
def test_scripted_traced_and_compiled_modules_give_the_same_output(convert) -> None:
    x = _inputs((2, 4, 9, 8))[2]
    module = StemMaxPool2d()
    converted = convert(module, x)
    torch.testing.assert_close(converted(x), module(x), rtol=0, atol=0)
    if isinstance(converted, torch.fx.GraphModule):
        targets = [node.target for node in converted.graph.nodes]
        assert torch.nn.functional.max_pool2d in targets


class Tail(nn.Module):
    """BatchNorm -> ReLU -> max pool, through norm_relu_max_pool where it applies (``fused``)."""

    def __init__(self, channels: int, pool: nn.Module, fused: bool = True, **norm_args) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, **norm_args)
        self.act = nn.ReLU(inplace=True)
        self.pool = pool
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and norm_relu_max_pool_applies(self.norm, self.act, self.pool, x):
            return norm_relu_max_pool(self.norm, self.pool, x)
        return self.pool(self.act(self.norm(x)))


def _tail_pair(
    channels: int, pool: nn.Module, dtype: torch.dtype = torch.float64, **norm_args
) -> tuple[Tail, Tail]:
    torch.manual_seed(channels)
    tail = Tail(channels, pool, **norm_args).to(dtype)
    if tail.norm.weight is not None:
        with torch.no_grad():  # both signs: a negative weight makes the window's minimum win
            tail.norm.weight.uniform_(-1.5, 1.5)
            tail.norm.bias.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(tail)
    reference.fused = False
    return tail, reference


def _assert_fused_steps(tail: Tail, reference: Tail, x: torch.Tensor, **tolerances) -> None:
    grad = torch.randn_like(copy.deepcopy(reference)(x.clone()))
    for _ in range(2):  # twice: the running statistics after each step
        assert_same_training_step(tail, reference, x, grad, **tolerances)
        tail.zero_grad()
        reference.zero_grad()
    pooled = tail(x.clone().requires_grad_())
    assert type(pooled.grad_fn).__name__ == "_NormReLUMaxPoolBackward"


#: (kernel, stride, padding) of the pool: the stem's, and others the op takes.
WINDOWS = [(3, 2, 1), (2, 2, 0), (3, 1, 1), (5, 3, 2), (1, 1, 0)]


@pytest.mark.parametrize(
    ("shape", "window"),
    # Every pair with an output (a window fits in the padded map).
    [(s, w) for s in SHAPES for w in WINDOWS if min(s[2:]) + 2 * w[2] >= w[0]],
)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_norm_relu_max_pool_equals_the_modules_float64(shape, window, layout) -> None:
    pool = StemMaxPool2d() if window == (3, 2, 1) else nn.MaxPool2d(*window)
    tail, reference = _tail_pair(shape[1], pool)
    x = (_inputs(shape, torch.float64)[0] * 2 + 0.3).contiguous(memory_format=layout)
    _assert_fused_steps(tail, reference, x, rtol=1e-10, atol=1e-12)
    assert tail(x).is_contiguous(memory_format=layout)


def test_norm_relu_max_pool_channels_last_input_nchw_output() -> None:
    tail, reference = _tail_pair(6, StemMaxPool2d())
    x = _inputs((3, 6, 11, 10), torch.float64)[0].requires_grad_()
    grad = torch.randn(3, 6, 6, 5, dtype=torch.float64)
    pooled = norm_relu_max_pool(
        tail.norm, tail.pool, x.contiguous(memory_format=torch.channels_last), False
    )
    assert pooled.is_contiguous()
    pooled.backward(grad)
    expected = reference(x.detach().requires_grad_())
    torch.testing.assert_close(pooled, expected, rtol=1e-10, atol=1e-12)
    (grad_x,) = torch.autograd.grad(reference(x), x, grad)
    torch.testing.assert_close(x.grad, grad_x, rtol=1e-10, atol=1e-12)


def test_norm_relu_max_pool_ties_float32() -> None:
    """Small integers: ties inside most windows, in the ReLU's zeros and above them; the
    gradient goes to the first maximum, as nn.MaxPool2d's does."""
    tail, reference = _tail_pair(6, StemMaxPool2d(), torch.float32)
    _assert_fused_steps(tail, reference, _inputs((3, 6, 11, 10))[2])


@pytest.mark.parametrize(
    "norm_args",
    [{"affine": False}, {"momentum": None}, {"track_running_stats": False}],
    ids=["no-affine", "cumulative", "no-running-stats"],
)
def test_norm_relu_max_pool_norm_variants(norm_args) -> None:
    tail, reference = _tail_pair(5, StemMaxPool2d(), **norm_args)
    _assert_fused_steps(
        tail, reference, _inputs((2, 5, 9, 7), torch.float64)[0], rtol=1e-10, atol=1e-12
    )


def test_norm_relu_max_pool_gradcheck_float64() -> None:
    tail, _ = _tail_pair(3, StemMaxPool2d())
    x = _inputs((2, 3, 7, 6), torch.float64)[0].requires_grad_()
    weight = tail.norm.weight.detach().double().requires_grad_()
    bias = tail.norm.bias.detach().double().requires_grad_()

    def pooled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        norm = nn.BatchNorm2d(3, track_running_stats=False).double()
        del norm.weight, norm.bias
        norm.weight, norm.bias = weight, bias
        return norm_relu_max_pool(norm, tail.pool, x)

    assert gradcheck(pooled, (x, weight, bias))


def test_norm_relu_max_pool_keeps_no_normalised_map() -> None:
    """Autograd keeps the input, the pooled map, a byte per window and per-channel vectors."""
    tail, _ = _tail_pair(8, StemMaxPool2d(), torch.float32)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        pooled = tail(x)
    big = sorted((t.numel(), str(t.dtype)) for t in saved if t.numel() > 8)
    assert big == [
        (pooled.numel(), "torch.float32"),
        (pooled.numel(), "torch.uint8"),
        (x.numel(), "torch.float32"),
    ]


def test_norm_relu_max_pool_applies_only_where_it_computes_the_modules() -> None:
    tail, _ = _tail_pair(4, StemMaxPool2d(), torch.float32)
    x = torch.randn(2, 4, 8, 8)
    applies = norm_relu_max_pool_applies
    assert applies(tail.norm, tail.act, tail.pool, x)
    assert applies(tail.norm, tail.act, tail.pool, x.double())
    assert applies(tail.norm, tail.act, tail.pool, x.to(memory_format=torch.channels_last))
    assert not applies(tail.norm, tail.act, tail.pool, x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the modules' autocast dtypes
        assert not applies(tail.norm, tail.act, tail.pool, x)
    assert not applies(tail.norm, tail.act, tail.pool, x[..., ::2])
    assert not applies(tail.norm, nn.GELU(), tail.pool, x)
    assert not applies(tail.norm, tail.act, nn.MaxPool2d(3, 2, 1, ceil_mode=True), x)
    assert not applies(tail.norm, tail.act, nn.MaxPool2d(3, 2, 1, dilation=2), x)
    assert not applies(tail.norm, tail.act, nn.MaxPool2d((3, 2), 2, 1), x)
    assert not applies(tail.norm, tail.act, nn.AvgPool2d(3, 2, 1), x)
    assert not applies(nn.SyncBatchNorm(4), tail.act, tail.pool, x)
    tail.norm.eval()  # running statistics: nothing to fuse for training
    assert not applies(tail.norm, tail.act, tail.pool, x)
    tail.norm.train()
    handle = tail.act.register_forward_hook(lambda *args: None)
    assert not applies(tail.norm, tail.act, tail.pool, x)
    handle.remove()
    traced = torch.jit.trace(tail, x, check_trace=False)
    assert "involution_pool_cpu" not in str(traced.graph)


def test_norm_relu_max_pool_op_rejects_bad_input() -> None:
    op = torch.ops.involution_pool_cpu.norm_relu_max_pool
    x, ones = torch.randn(2, 3, 8, 8), torch.ones(3)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(x[..., ::2], ones, ones, 1e-5, 3, 2, 1)
    with pytest.raises(RuntimeError, match="channels_last output needs a channels_last input"):
        op(x, ones, ones, 1e-5, 3, 2, 1, True)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(x.half(), ones.half(), ones.half(), 1e-5, 3, 2, 1)
    with pytest.raises(RuntimeError, match="padding"):
        op(x, ones, ones, 1e-5, 3, 2, 2)
    with pytest.raises(RuntimeError, match="more than one value"):
        op(torch.randn(1, 3, 1, 1), ones, ones, 1e-5, 1, 1, 0)
    with pytest.raises(RuntimeError, match="weight"):
        op(x, torch.ones(4), ones, 1e-5, 3, 2, 1)


def test_rednet_trains_its_stem_tail_in_the_fused_op(monkeypatch) -> None:
    """RedNet's bn3 -> act3 -> maxpool through norm_relu_max_pool in training: the same step
    as the modules; forward_intermediates (which returns the stem's output), hooks on the stem,
    the stem involution's fuse_norm_act switch and eval mode run the modules."""
    import involution.models.rednet as rednet

    torch.manual_seed(0)
    arch = rednet.RedNetArch((1, 1), stage_widths=(16, 32), stem_width=32)
    model = rednet.RedNet(arch, num_classes=5).double().train()
    with torch.no_grad():
        model.stem.bn3.weight.uniform_(-1.5, 1.5)
    reference = copy.deepcopy(model)
    calls: list[bool] = []
    original = rednet.norm_relu_max_pool

    def fused_unless_reference(norm: nn.BatchNorm2d, pool: nn.Module, x: torch.Tensor, *args):
        calls.append(norm is model.stem.bn3)
        if norm is reference.stem.bn3:
            return pool(nn.functional.relu(norm(x))).contiguous()
        return original(norm, pool, x, *args)

    monkeypatch.setattr(rednet, "norm_relu_max_pool", fused_unless_reference)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    grad = torch.randn(2, 5, dtype=torch.float64)
    assert_same_training_step(model, reference, x, grad, rtol=1e-10, atol=1e-12)
    assert calls == [True, False]
    # The stem runs in channels_last; the stages get the image's layout.
    assert model.stem.forward_pooled(x, model.maxpool).is_contiguous()
    x_last = x.contiguous(memory_format=torch.channels_last)
    assert model.stem.forward_pooled(x_last, model.maxpool).is_contiguous(
        memory_format=torch.channels_last
    )
    del calls[2:]
    model.forward_intermediates(x)
    hooked: list[int] = []
    handle = model.stem.register_forward_hook(lambda *args: hooked.append(1))
    model(x)  # a hook on the stem sees the stem's output
    handle.remove()
    set_kernel_regeneration(model, True, fuse_norm_act=False)(x)  # the stem's switches
    set_kernel_regeneration(model, True, fuse_norm_act=True).eval()(x)
    assert calls == [True, False] and hooked == [1]


#: (B, C, H, W) for the kernel branch's average pool: odd and even sizes (clipped last windows).
AVERAGE_SHAPES = [(2, 3, 8, 8), (3, 5, 7, 9), (1, 4, 1, 6), (2, 16, 13, 11)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("shape", AVERAGE_SHAPES)
def test_average_pool_is_atens_bitwise(shape, stride, layout, dtype) -> None:
    from involution.ops.backends import cpu

    x = _inputs(shape, dtype)[0].contiguous(memory_format=layout)
    pooled = cpu.average_pool(x, stride)
    expected = F.avg_pool2d(x, stride, stride, ceil_mode=True)
    assert torch.equal(pooled, expected)
    assert pooled.is_contiguous(memory_format=layout)
    grad = torch.randn_like(expected)
    grad_x = torch.randn_like(x)
    expected_grad_x = grad_x + torch.ops.aten.avg_pool2d_backward(
        grad, x, [stride] * 2, [stride] * 2, [0, 0], True, True, None
    )
    cpu.average_pool_backward_add_(grad_x, grad, stride)
    assert torch.equal(grad_x, expected_grad_x)


def test_average_pool_rejects_bad_input() -> None:
    from involution.ops.backends import cpu

    with pytest.raises(RuntimeError, match="contiguous"):
        cpu.average_pool(torch.randn(2, 3, 8, 8)[..., ::2], 2)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        cpu.average_pool(torch.randn(2, 3, 8, 8).half(), 2)
    with pytest.raises(RuntimeError, match="grad_output must be of shape"):
        cpu.average_pool_backward_add_(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 3, 4), 2)


def test_strided_involution_trains_through_the_average_pool_op(monkeypatch) -> None:
    """A stride-2 layer's regenerating path pools its kernel branch with the op, forward and
    in backward (regenerated), and adds the pool's gradient with it: the kept path's step."""
    from involution.ops import Involution2d
    from involution.ops.backends import cpu

    calls: list[str] = []
    for name in ("average_pool", "average_pool_backward_add_"):
        original = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, n=name, f=original: calls.append(n) or f(*a))
    torch.manual_seed(0)
    layer = Involution2d(16, 3, stride=2, group_channels=4).double().train()
    kept = set_kernel_regeneration(copy.deepcopy(layer), False)
    x = torch.randn(2, 16, 9, 11, dtype=torch.float64)
    grad = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    assert_same_training_step(layer, kept, x, grad, rtol=1e-10, atol=1e-12)
    assert calls == ["average_pool", "average_pool", "average_pool_backward_add_"]
