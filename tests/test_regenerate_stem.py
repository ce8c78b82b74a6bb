"""RedNet's stem in one training op keeping its input only (ops/regenerate_stem.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from conftest import (
    assert_same_accumulated_and_autocast_gradients,
    assert_same_training_step,
    gradcheck_module,
    training_step,
)
from involution.models.rednet import RedNetStem
from involution.ops import Involution2d
from involution.ops.modules import set_kernel_regeneration
from involution.ops.regenerate_stem import RegeneratedStem, StemModules, involution_stem

#: float32 tolerances: the gradients reach the first conv summed in another order than through
#: the modules, and the fused op's output comes from the CPU layer kernel (another rounding);
#: the losses' gradients are O(100) (within 5e-6 of the largest).
FLOAT32 = {"rtol": 1e-5, "atol": 1e-4}


class Stem(nn.Module):
    """A RedNet stem without its last BatchNorm and ReLU: the part the op computes."""

    def __init__(self, stride: int = 2, inv_stride: int = 1) -> None:
        super().__init__()
        self.stem = RedNetStem(
            3, 16, lambda c, stride: Involution2d(c, 3, stride=inv_stride, group_channels=4)
        )
        self.stem.conv1.stride = (stride, stride)

    def forward(self, x: Tensor) -> Tensor:
        s = self.stem
        return involution_stem(
            StemModules(s.conv1, s.bn1, s.act1, s.inv, s.bn2, s.act2, s.conv2), x
        )


def _stem(**kwargs) -> Stem:
    torch.manual_seed(0)
    stem = Stem(**kwargs)
    with torch.no_grad():  # affine weights and statistics away from their initial values
        for norm in stem.modules():
            if isinstance(norm, nn.BatchNorm2d):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)
                norm.running_mean.uniform_(-0.2, 0.2)
                norm.running_var.uniform_(0.5, 2.0)
    return stem.train()


def _modules(stem: nn.Module) -> nn.Module:
    """A copy running the modules one by one, keeping the kernels."""
    return set_kernel_regeneration(copy.deepcopy(stem), False, fuse_norm_act=False)


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = RegeneratedStem.apply
    monkeypatch.setattr(RegeneratedStem, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


def _assert_same_steps(model: nn.Module, reference: nn.Module, x: Tensor, **tolerances) -> None:
    grad = torch.randn_like(copy.deepcopy(reference)(x))
    for _ in range(2):  # twice: the running statistics after each step
        assert_same_training_step(model, reference, x, grad, **tolerances)
        model.zero_grad()
        reference.zero_grad()


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_float64(channels_last: bool, monkeypatch) -> None:
    calls = _counting(monkeypatch)
    stem = _stem(inv_stride=2).double()
    x = torch.randn(2, 3, 10, 9, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert gradcheck_module(stem, x.requires_grad_())
    assert calls


@pytest.mark.parametrize("geometry", [(2, 1), (1, 2)])
def test_equals_the_modules_running_statistics_once(geometry, monkeypatch) -> None:
    calls = _counting(monkeypatch)
    stride, inv_stride = geometry
    stem = _stem(stride=stride, inv_stride=inv_stride)
    _assert_same_steps(stem, _modules(stem), torch.randn(3, 3, 15, 14), **FLOAT32)
    assert len(calls) == 2
    for norm in (stem.stem.bn1, stem.stem.inv.norm, stem.stem.bn2):
        assert norm.num_batches_tracked.item() == 2  # once per forward


def _saved_maps(model: nn.Module, x: Tensor) -> set[int]:
    """The storages of the activations autograd keeps during ``model(x)``: a map of the
    involution's width or larger, not a parameter."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: set[int] = set()

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() >= x.shape[0] * 8 * 8 * 8 and storage not in weights:
            storages.add(storage)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x)
    return storages


def test_only_the_input_is_kept() -> None:
    stem = _stem()
    x = torch.randn(2, 3, 16, 16)
    assert _saved_maps(stem, x) == {x.untyped_storage().data_ptr()}
    # The modules keep conv1's output, the ReLU's, the kernels, y...: what the measure sees.
    assert len(_saved_maps(_modules(stem), x)) >= 4


def test_compiled_training_step_fullgraph_channels_last(monkeypatch) -> None:
    stem = _stem().to(memory_format=torch.channels_last)
    reference = _modules(stem)
    compiled = torch.compile(stem, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    grad = torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last)
    out, grad_x, grads = training_step(compiled, x, grad)
    out_ref, grad_x_ref, grads_ref = training_step(reference, x, grad)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(grad_x, grad_x_ref, **FLOAT32)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, **FLOAT32)
    assert stem.stem.bn1.num_batches_tracked.item() == 1
    torch.testing.assert_close(stem.stem.bn2.running_var, reference.stem.bn2.running_var)


def test_gradient_accumulation_and_bfloat16_autocast(monkeypatch) -> None:
    calls = _counting(monkeypatch)
    stem = _stem()
    reference = _modules(stem)
    x = torch.randn(4, 3, 16, 16)
    assert_same_accumulated_and_autocast_gradients(stem, reference, x, **FLOAT32)
    assert len(calls) == 3


@pytest.mark.parametrize("case", ["switched_off", "unfused", "eval", "hook", "gelu", "bias"])
def test_other_modules_and_modes_keep_the_modules(case: str, monkeypatch) -> None:
    calls = _counting(monkeypatch)
    stem = _stem()
    s = stem.stem
    if case == "switched_off":
        set_kernel_regeneration(stem, False)
    elif case == "unfused":
        s.inv.fuse_norm_act = False
    elif case == "eval":
        stem.eval()
    elif case == "hook":
        s.conv1.register_forward_hook(lambda *_: None)
    elif case == "gelu":
        s.act1 = nn.GELU()
    elif case == "bias":
        s.conv2.bias = nn.Parameter(torch.randn(16))
    reference = copy.deepcopy(stem)
    r = reference.stem
    x = torch.randn(2, 3, 16, 16)
    out = stem(x)
    torch.testing.assert_close(out, r.conv2(r.act2(r.bn2(r.inv(r.act1(r.bn1(r.conv1(x))))))))
    assert calls == []
