"""Involution -> BatchNorm2d -> ReLU in one training op (ops/regenerate_norm_act.py)."""

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
from involution.bench.memory import saved_storages
from involution.models.rednet import RedNet, RedNetArch
from involution.ops import Involution2d, regenerate_norm_act
from involution.ops.modules import set_kernel_regeneration
from involution.ops.regenerate_norm_act import (
    RegeneratedInvolutionNormAct,
    involution_norm_act,
)

#: float32 tolerances against the modules: the fused op aggregates the involution's output
#: again inside the span backward and applies the BatchNorm's backward there, so the gradients
#: are summed in another order than by ATen's BatchNorm backward on the kept output.
FLOAT32 = {"rtol": 1e-4, "atol": 1e-4}

# (channels, stride, dilation, group_channels, height, width)
GEOMETRIES = [
    (16, 1, 1, 4, 7, 5),
    (16, 2, 1, 8, 9, 7),
    (8, 2, 2, 2, 7, 6),
]


class Block(nn.Module):
    """An involution, a BatchNorm and a ReLU, called as RedNet calls its ``conv2``/``bn2``/
    ``act2``."""

    def __init__(
        self,
        channels: int,
        stride: int,
        dilation: int,
        group_channels: int,
        norm: nn.Module | None = None,
        act: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.inv = Involution2d(
            channels,
            3,
            stride=stride,
            dilation=dilation,
            group_channels=group_channels,
            reduction_ratio=2,
        )
        self.bn = nn.BatchNorm2d(channels) if norm is None else norm
        self.act = nn.ReLU(inplace=True) if act is None else act

    def forward(self, x: Tensor) -> Tensor:
        return involution_norm_act(self.inv, self.bn, self.act, x)


def _block(geometry=GEOMETRIES[1], **kwargs) -> Block:
    channels, stride, dilation, group_channels, _, _ = geometry
    torch.manual_seed(0)
    block = Block(channels, stride, dilation, group_channels, **kwargs)
    with torch.no_grad():  # affine weights and statistics away from their initial values
        for norm in (block.inv.norm, block.bn):
            if getattr(norm, "weight", None) is not None:
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)
            if getattr(norm, "running_mean", None) is not None:
                norm.running_mean.uniform_(-0.2, 0.2)
                norm.running_var.uniform_(0.5, 2.0)
    return block.train()


def _unfused(block: nn.Module) -> nn.Module:
    """A copy running the modules one by one (the kernels still regenerated)."""
    return set_kernel_regeneration(copy.deepcopy(block), True, fuse_norm_act=False)


def _input(geometry=GEOMETRIES[1], batch: int = 3) -> Tensor:
    channels, _, _, _, height, width = geometry
    return torch.randn(batch, channels, height, width)


def _assert_same_step(model: nn.Module, reference: nn.Module, x: Tensor, **tolerances) -> None:
    grad = torch.randn_like(reference(x.clone()))
    reference.load_state_dict(model.state_dict())  # that call updated the running statistics
    assert_same_training_step(model, reference, x, grad, **tolerances)


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = RegeneratedInvolutionNormAct.apply
    monkeypatch.setattr(
        RegeneratedInvolutionNormAct, "apply", lambda *a: calls.append(1) or original(*a)
    )
    return calls


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_float64_batch_statistics(geometry, channels_last: bool, monkeypatch) -> None:
    calls = _counting(monkeypatch)
    block = _block(geometry).double()
    x = _input(geometry, batch=2).double()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert gradcheck_module(block, x.requires_grad_())
    assert calls


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize(
    "variant", ["train", "branch_eval", "branch_identity", "cumulative", "no_stats", "no_affine"]
)
def test_equals_the_unfused_modules(geometry, variant: str, monkeypatch) -> None:
    calls = _counting(monkeypatch)
    norm = {
        "cumulative": nn.BatchNorm2d(geometry[0], momentum=None),
        "no_stats": nn.BatchNorm2d(geometry[0], track_running_stats=False),
        "no_affine": nn.BatchNorm2d(geometry[0], affine=False),
    }.get(variant)
    block = _block(geometry, norm=norm)
    if variant == "branch_eval":  # the kernel branch's norm frozen, the outer one training
        block.inv.norm.eval()
    elif variant == "branch_identity":
        block.inv.norm = nn.Identity()
    reference = _unfused(block)
    x = _input(geometry)
    for _ in range(2):  # twice: the cumulative average's second step
        _assert_same_step(block, reference, x, **FLOAT32)
    assert len(calls) == 2
    if variant == "train":
        assert block.bn.num_batches_tracked.item() == 2  # once per forward
        assert block.inv.norm.num_batches_tracked.item() == 2


def _rebuilds(monkeypatch) -> list[int]:
    """Counts the backward's rebuilds of the involution's output before the BatchNorm's
    backward (the path where the span backward does not aggregate it itself)."""
    calls: list[int] = []
    original = regenerate_norm_act.features_output
    monkeypatch.setattr(
        regenerate_norm_act, "features_output", lambda *a: calls.append(1) or original(*a)
    )
    return calls


def test_zero_batchnorm_weight_is_exact(monkeypatch) -> None:
    rebuilds = _rebuilds(monkeypatch)
    block = _block()
    with torch.no_grad():  # a zero and a tiny weight beside a large bias: y holds no x_hat
        block.bn.weight[:4] = 0.0
        block.bn.weight[4:8] = 1e-9
        block.bn.bias[:8] = 3.0
    reference = _unfused(block)
    _assert_same_step(block, reference, _input())
    assert reference.bn.weight.grad[:8].abs().min() > 0  # gradients that y alone cannot give
    assert rebuilds == [1]  # the output rebuilt: y cannot give x_hat with these weights


@pytest.mark.parametrize("affine", [True, False])
def test_cpu_backward_aggregates_the_output_in_the_span_backward(affine: bool, monkeypatch):
    rebuilds = _rebuilds(monkeypatch)
    block = _block(norm=None if affine else nn.BatchNorm2d(16, affine=False))
    with torch.no_grad():  # negative and small weights recover x_hat from y too
        if affine:
            block.bn.weight[:4] = -block.bn.weight[:4]
            block.bn.weight[4:8] = 0.02
    reference = _unfused(block)
    _assert_same_step(block, reference, _input(), **FLOAT32)
    assert rebuilds == []


def test_running_statistics_updated_once_as_batchnorm_does() -> None:
    block = _block()
    x = _input()
    norm = copy.deepcopy(block.bn)
    with torch.no_grad():
        reference_output = set_kernel_regeneration(copy.deepcopy(block.inv), False)(x)
        norm(reference_output)
    block(x).sum().backward()
    assert block.bn.num_batches_tracked.item() == 1
    torch.testing.assert_close(block.bn.running_mean, norm.running_mean)
    torch.testing.assert_close(block.bn.running_var, norm.running_var)


@pytest.mark.parametrize("fused", [True, False])
def test_the_involution_output_is_not_kept(fused: bool) -> None:
    block = _block(GEOMETRIES[0])  # stride 1: the output has the input's size
    if not fused:
        block = _unfused(block)
    x = _input(GEOMETRIES[0]).requires_grad_()
    storages, y = saved_storages(lambda: block(x))
    large = {ptr for ptr, nbytes in storages.items() if nbytes >= y.numel() * y.element_size()}
    others = large - {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    # Fused: the input and the output only. The modules keep the BatchNorm's input too, the
    # involution's output: that the measure sees it is what makes the fused case a test.
    assert len(others) == (0 if fused else 1)


def test_compiled_training_step_fullgraph_channels_last() -> None:
    block = _block().to(memory_format=torch.channels_last)
    reference = _unfused(block)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = _input().to(memory_format=torch.channels_last)
    grad = torch.randn_like(reference(x)).to(memory_format=torch.channels_last)
    reference.load_state_dict(block.state_dict())
    out, grad_x, grads = training_step(compiled, x, grad)
    out_ref, grad_x_ref, grads_ref = training_step(reference, x, grad)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(grad_x, grad_x_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref)
    assert block.bn.num_batches_tracked.item() == 1
    torch.testing.assert_close(block.bn.running_var, reference.bn.running_var)


def test_gradient_accumulation_and_bfloat16_autocast(monkeypatch) -> None:
    calls = _counting(monkeypatch)
    block = _block()
    reference = _unfused(block)
    x = _input(batch=4)
    assert_same_accumulated_and_autocast_gradients(block, reference, x, **FLOAT32)
    assert len(calls) == 3


@pytest.mark.parametrize(
    "case", ["switched_off", "regeneration_off", "eval_norm", "sync_norm", "gelu", "hook", "eval"]
)
def test_other_modules_and_modes_keep_the_modules(case: str, monkeypatch) -> None:
    calls = _counting(monkeypatch)
    block = _block(
        norm=nn.SyncBatchNorm(16) if case == "sync_norm" else None,
        act=nn.GELU() if case == "gelu" else None,
    )
    if case == "switched_off":
        block.inv.fuse_norm_act = False
    elif case == "regeneration_off":
        block.inv.regenerate_kernels = False
    elif case == "eval_norm":  # running statistics (a detection backbone's norm_eval)
        block.bn.eval()
    elif case == "hook":
        block.bn.register_forward_hook(lambda *_: None)
    elif case == "eval":
        block.eval()
    x = _input()
    if case == "sync_norm":  # SyncBatchNorm trains only in a process group: its eval twin
        block.bn.eval()
    reference = copy.deepcopy(block)
    out = block(x)
    torch.testing.assert_close(out, reference.act(reference.bn(reference.inv(x))))
    assert calls == []


def _rednet() -> RedNet:
    torch.manual_seed(0)
    model = RedNet(RedNetArch((1, 1), stage_widths=(16, 32), stem_width=32), num_classes=5)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
    return model.train()


def test_rednet_bottlenecks_and_stem_use_the_op_and_match(monkeypatch) -> None:
    from involution.ops.regenerate_stem import RegeneratedStem

    calls = _counting(monkeypatch)
    stem_calls: list[int] = []
    original = RegeneratedStem.apply
    monkeypatch.setattr(RegeneratedStem, "apply", lambda *a: stem_calls.append(1) or original(*a))
    model = _rednet()
    reference = _unfused(model)
    x = torch.randn(2, 3, 32, 32)
    grad = torch.randn(2, 5)
    out, grad_x, grads = training_step(model, x, grad)
    assert len(calls) == 2  # two bottlenecks
    assert len(stem_calls) == 1  # the stem, its involution's BatchNorm and ReLU included
    out_ref, grad_x_ref, grads_ref = training_step(reference, x, grad)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(grad_x, grad_x_ref)
    names = [name for name, _ in model.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, msg=lambda m, n=name: f"{n}: {m}")
    state, state_ref = model.state_dict(), reference.state_dict()
    assert state.keys() == state_ref.keys()  # the modules' names (bn2, act2, ...) unchanged
    for name, b in state.items():
        torch.testing.assert_close(b, state_ref[name], msg=lambda m, n=name: f"{n}: {m}")


def test_frozen_batchnorm_kernel_branch_regenerates_as_kept(monkeypatch) -> None:
    from torchvision.ops import FrozenBatchNorm2d

    from involution.ops.regenerate import RegeneratedInvolution2d

    calls: list[int] = []
    original = RegeneratedInvolution2d.apply
    monkeypatch.setattr(
        RegeneratedInvolution2d, "apply", lambda *a: calls.append(1) or original(*a)
    )
    torch.manual_seed(0)
    layer = Involution2d(16, 3, stride=2, group_channels=4, norm_layer=FrozenBatchNorm2d)
    with torch.no_grad():
        for buffer in layer.norm.buffers():
            buffer.uniform_(0.5, 1.5)
    kept = set_kernel_regeneration(copy.deepcopy(layer), False)
    x, grad = torch.randn(2, 16, 9, 9), torch.randn(2, 16, 5, 5)
    out, grad_x, grads = training_step(layer.train(), x, grad)
    out_kept, grad_x_kept, grads_kept = training_step(kept.train(), x, grad)
    assert calls == [1]
    # FrozenBatchNorm2d folds its statistics into a scale and a shift: another rounding.
    torch.testing.assert_close(out, out_kept, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_x, grad_x_kept, rtol=1e-4, atol=1e-5)
    for g, g_kept in zip(grads, grads_kept, strict=True):
        torch.testing.assert_close(g, g_kept, rtol=1e-4, atol=1e-4)


def test_bench_memory_cases_name_each_variant_and_pairing() -> None:
    import argparse

    from involution.bench.memory import Case, add_arguments, cases, settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--models",
            "rednet26",
            "--batch-sizes",
            "8",
            "--dtypes",
            "float32",
            "--layouts",
            "nchw",
            "--detectors",
            "retinanet",
            "--regenerate",
            "all",
        ]
    )
    detector = "retinanet_rednet50_fpn_inv_neck"
    assert cases(args) == [
        Case("resnet26", 8, "float32", "nchw", None),
        *(Case("rednet26", 8, "float32", "nchw", v) for v in ("regen", "unfused", "kept")),
        Case("retinanet_resnet50_fpn", 2, "float32", "nchw", None, "frozen"),
        *(
            Case(detector, 2, "float32", "nchw", v, norm)
            for norm in ("frozen", "norm_eval")
            for v in ("regen", "unfused", "kept")
        ),
    ]
    # Timed in turn: each baseline with its RedNets.
    groups = settings(cases(args))
    assert [len(group) for group in groups] == [4, 7]
    assert [group[0].variant for group in groups] == [None, None]
