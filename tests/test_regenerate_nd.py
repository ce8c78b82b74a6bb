"""Involution1d/Involution3d in training keep only their input for backward (the layer is
recomputed there) and give the kept path's outputs, gradients and running statistics."""

from __future__ import annotations

import copy

import pytest
import torch

from involution import Involution1d, Involution3d
from involution.bench.memory import saved_storages
from involution.ops.modules import set_kernel_regeneration

# (a builder of the layer, the input shape)
CASES = [
    pytest.param(lambda: Involution1d(16, 5, stride=2, group_channels=4), (3, 16, 19), id="1d"),
    pytest.param(
        lambda: Involution3d(8, (3, 5, 3), stride=(1, 2, 2), dilation=(1, 1, 2), group_channels=4),
        (2, 8, 3, 9, 7),
        id="3d",
    ),
]


@pytest.mark.parametrize(("build", "shape"), CASES)
def test_recomputed_training_equals_kept(build, shape):
    torch.manual_seed(0)
    layer = build().double().train()
    kept = set_kernel_regeneration(copy.deepcopy(layer), False)
    x = torch.randn(shape, dtype=torch.float64)
    results = []
    for module in (layer, kept):
        xi = x.clone().requires_grad_()
        output = module(xi)
        output.backward(torch.cos(output.detach()))
        results.append((output, xi.grad, [p.grad for p in module.parameters()]))
    (out_r, gx_r, gp_r), (out_k, gx_k, gp_k) = results
    torch.testing.assert_close(out_r, out_k, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx_r, gx_k, rtol=1e-10, atol=1e-10)
    for grad_r, grad_k in zip(gp_r, gp_k, strict=True):
        torch.testing.assert_close(grad_r, grad_k, rtol=1e-10, atol=1e-10)
    # The running statistics moved once, as the kept path's did.
    assert layer.norm.num_batches_tracked.item() == 1
    torch.testing.assert_close(layer.norm.running_mean, kept.norm.running_mean)
    torch.testing.assert_close(layer.norm.running_var, kept.norm.running_var)


@pytest.mark.parametrize(("build", "shape"), CASES)
def test_recomputed_training_keeps_no_kernel_tensor(build, shape):
    torch.manual_seed(0)
    layer = build().train()
    x = torch.randn(shape, requires_grad=True)
    with torch.no_grad():
        kernel_numel = layer.generate_kernels(x).numel()
    storages, _ = saved_storages(lambda: layer(x))
    assert list(storages.values()) == [x.numel() * x.element_size()]  # the input only
    # The check sees the kernels where the layer keeps them.
    set_kernel_regeneration(layer, False)
    storages, _ = saved_storages(lambda: layer(x))
    assert kernel_numel * x.element_size() in storages.values()


def test_recompute_only_in_training_with_gradients():
    layer = Involution1d(16, 3).train()
    assert layer.training_recomputes()
    with torch.no_grad():
        assert not layer.training_recomputes()
    assert not layer.eval().training_recomputes()
    layer.train().regenerate_kernels = False
    assert not layer.training_recomputes()
