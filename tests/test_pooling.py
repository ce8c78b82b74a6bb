"""The deep stem's max pool (StemMaxPool2d): nn.MaxPool2d's values, indices and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

from involution.models.pooling import StemMaxPool2d

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
