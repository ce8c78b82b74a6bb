"""Involution2d's training path that regenerates the kernels in backward (ops/regenerate.py)."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from conftest import gradcheck_module, training_step
from involution.bench.memory import saved_storages
from involution.ops import Involution2d
from involution.ops.modules import set_kernel_regeneration
from involution.ops.regenerate import RegeneratedInvolution2d

# Gradients of the regenerated path against the kept one in float32: the cpu backend's fused
# backward (involution_regen_cpu) sums in another order, which BatchNorm's backward amplifies.
GRAD_TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}

# (channels, stride, dilation, group_channels, height, width)
GEOMETRIES = [
    (16, 1, 1, 4, 7, 5),
    (16, 2, 1, 8, 9, 7),
    (8, 2, 2, 2, 7, 6),
    (12, 1, 2, 12, 6, 7),
]


def _layer(
    channels: int, stride: int, dilation: int, group_channels: int, **kwargs
) -> Involution2d:
    torch.manual_seed(0)
    layer = Involution2d(
        channels,
        3,
        stride=stride,
        dilation=dilation,
        group_channels=group_channels,
        reduction_ratio=2,
        **kwargs,
    )
    with torch.no_grad():  # statistics and affine weights away from their initial values
        if isinstance(layer.norm, nn.BatchNorm2d):
            layer.norm.weight.uniform_(0.5, 1.5)
            layer.norm.bias.uniform_(-0.5, 0.5)
        if getattr(layer.norm, "running_mean", None) is not None:
            layer.norm.running_mean.uniform_(-0.2, 0.2)
            layer.norm.running_var.uniform_(0.5, 2.0)
    return layer.train()


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_float64_batch_statistics(geometry, channels_last: bool) -> None:
    channels, stride, dilation, group_channels, height, width = geometry
    layer = _layer(channels, stride, dilation, group_channels).double()
    x = torch.randn(2, channels, height, width, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert gradcheck_module(layer, x.requires_grad_())


@pytest.mark.parametrize("geometry", GEOMETRIES[:2])
@pytest.mark.parametrize(
    "norm", ["train", "eval", "identity", "cumulative", "no_stats"], ids=lambda n: n
)
def test_equals_the_kept_kernel_path(geometry, norm: str) -> None:
    channels, stride, dilation, group_channels, height, width = geometry
    kwargs = {}
    if norm == "identity":
        kwargs["norm_layer"] = lambda c: nn.Identity()
    elif norm == "cumulative":
        kwargs["norm_layer"] = lambda c: nn.BatchNorm2d(c, momentum=None)
    elif norm == "no_stats":
        kwargs["norm_layer"] = lambda c: nn.BatchNorm2d(c, track_running_stats=False)
    layer = _layer(channels, stride, dilation, group_channels, **kwargs)
    if norm == "eval":  # the detection backbones' norm_eval
        layer.norm.eval()
    kept = set_kernel_regeneration(copy.deepcopy(layer), False)
    x = torch.randn(3, channels, height, width)
    grad = torch.randn_like(kept(x))
    kept.load_state_dict(layer.state_dict())  # that call updated the running statistics
    for _ in range(2):  # twice: the cumulative average's second step
        out, grad_x, grads = training_step(layer, x, grad)
        out_kept, grad_x_kept, grads_kept = training_step(kept, x, grad)
    torch.testing.assert_close(out, out_kept)
    torch.testing.assert_close(grad_x, grad_x_kept, **GRAD_TOLERANCE)
    for g, g_kept in zip(grads, grads_kept, strict=True):
        torch.testing.assert_close(g, g_kept, **GRAD_TOLERANCE)
    for (name, b), b_kept in zip(layer.named_buffers(), kept.buffers(), strict=True):
        torch.testing.assert_close(b, b_kept, msg=name)
    if norm == "train":
        assert layer.norm.num_batches_tracked.item() == 2  # once per forward


def test_running_statistics_updated_once_as_batchnorm_does() -> None:
    layer = _layer(16, 2, 1, 4)
    x = torch.randn(4, 16, 9, 9)
    norm = copy.deepcopy(layer.norm)
    with torch.no_grad():
        norm(layer.reduce(layer.pool(x)))
    layer(x).sum().backward()
    assert layer.norm.num_batches_tracked.item() == 1
    torch.testing.assert_close(layer.norm.running_mean, norm.running_mean)
    torch.testing.assert_close(layer.norm.running_var, norm.running_var)


@pytest.mark.parametrize("branch", ["regenerated", "checkpointed"])
def test_no_tensor_of_the_kernels_size_is_kept(branch: str) -> None:
    act = nn.ReLU if branch == "regenerated" else nn.GELU  # GELU: the checkpointed fallback
    layer = Involution2d(16, 7, group_channels=4, act_layer=act).train()
    x = torch.randn(2, 16, 10, 10, requires_grad=True)
    kernel_numel = 2 * 4 * 49 * 10 * 10
    kernel_bytes = kernel_numel * x.element_size()
    storages, output = saved_storages(lambda: layer(x))
    assert storages and max(storages.values()) < kernel_bytes
    output.sum().backward()
    kept = set_kernel_regeneration(copy.deepcopy(layer), False)
    storages, _ = saved_storages(lambda: kept(x))
    assert max(storages.values()) >= kernel_bytes  # the measure sees the kept path's kernels


def test_checkpointed_fallback_equals_the_kept_path_and_updates_once() -> None:
    layer = _layer(16, 2, 1, 4, act_layer=nn.GELU)
    kept = set_kernel_regeneration(copy.deepcopy(layer), False)
    x, grad = torch.randn(2, 16, 9, 9), torch.randn(2, 16, 5, 5)
    out, grad_x, grads = training_step(layer, x, grad)
    out_kept, grad_x_kept, grads_kept = training_step(kept, x, grad)
    torch.testing.assert_close(out, out_kept)
    torch.testing.assert_close(grad_x, grad_x_kept)
    for g, g_kept in zip(grads, grads_kept, strict=True):
        torch.testing.assert_close(g, g_kept)
    assert layer.norm.num_batches_tracked.item() == 1
    torch.testing.assert_close(layer.norm.running_var, kept.norm.running_var)


def test_switch_hooks_and_eval_keep_the_plain_paths(monkeypatch) -> None:
    calls = []
    original = RegeneratedInvolution2d.apply
    monkeypatch.setattr(
        RegeneratedInvolution2d, "apply", lambda *a: calls.append(1) or original(*a)
    )
    layer = _layer(16, 1, 1, 4)
    x = torch.randn(2, 16, 6, 6)
    layer(x)
    assert calls == [1]
    layer.regenerate_kernels = False
    layer(x)
    layer.regenerate_kernels = True
    seen = []
    handle = layer.span.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    layer(x)  # a hook on the span conv sees the kernels once: the kept path
    handle.remove()
    layer.eval()
    layer(x)
    assert calls == [1] and len(seen) == 1


def test_gradient_accumulation_and_bfloat16_autocast() -> None:
    layer = _layer(16, 2, 1, 4)
    kept = set_kernel_regeneration(copy.deepcopy(layer), False)
    x = torch.randn(4, 16, 9, 9)
    for model in (layer, kept):
        for half in x.chunk(2):  # two micro-batches, one optimizer step
            model(half).square().sum().backward()
    for p, p_kept in zip(layer.parameters(), kept.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_kept.grad, **GRAD_TOLERANCE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        out_kept = kept(x)
    assert out.dtype == out_kept.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), out_kept.float(), atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert all(p.grad.isfinite().all() for p in layer.parameters())


def test_compiled_training_fullgraph() -> None:
    layer = _layer(16, 2, 1, 4).to(memory_format=torch.channels_last)
    kept = set_kernel_regeneration(copy.deepcopy(layer), False)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 16, 9, 9).to(memory_format=torch.channels_last)
    grad = torch.randn(2, 16, 5, 5)
    out, grad_x, grads = training_step(compiled, x, grad)
    out_kept, grad_x_kept, grads_kept = training_step(kept, x, grad)
    torch.testing.assert_close(out, out_kept)
    torch.testing.assert_close(grad_x, grad_x_kept)
    for g, g_kept in zip(grads, grads_kept, strict=True):
        torch.testing.assert_close(g, g_kept)
    assert layer.norm.num_batches_tracked.item() == 1
    torch.testing.assert_close(layer.norm.running_mean, kept.norm.running_mean)


def _ddp_worker(rank: int, port: int, folder: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = nn.Sequential(_layer(16, 2, 1, 4), nn.Conv2d(16, 4, 1))
        ddp = nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(1)
        x = torch.randn(4, 16, 9, 9)
        ddp(x.chunk(2)[rank]).square().mean().backward()
        torch.save([p.grad for p in model.parameters()], folder / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_process_step(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The ranks are forked from a fresh interpreter: a process that has already run autograd
    # (a test worker, after other tests) cannot fork ("autograd's threading").
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch.multiprocessing as mp
        from test_regenerate import _ddp_worker
        mp.start_processes(
            _ddp_worker, ({port}, Path({str(tmp_path)!r})), nprocs=2, start_method="fork"
        )
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    grads = [torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)]
    torch.manual_seed(1)
    x = torch.randn(4, 16, 9, 9)
    model = nn.Sequential(set_kernel_regeneration(_layer(16, 2, 1, 4), False), nn.Conv2d(16, 4, 1))
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for half in x.chunk(2):  # DDP averages the ranks' gradients
        model.zero_grad()
        model(half).square().mean().backward()
        for e, p in zip(expected, model.parameters(), strict=True):
            e += p.grad / 2
    for rank in (0, 1):
        for g, e in zip(grads[rank], expected, strict=True):
            torch.testing.assert_close(g, e)


def test_bench_memory_counts_each_storage_once_without_the_weights() -> None:
    from involution.bench.memory import MemoryResult, baseline_of, saved_bytes, with_ratios

    conv = nn.Conv2d(4, 4, 1, bias=False)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)

    def run() -> Tensor:  # conv keeps x and its weight; relu its output y; y * y keeps y twice
        y = torch.relu(conv(x))
        return y * y

    size, _ = saved_bytes(run, list(conv.parameters()))
    assert size == x.nbytes * 2
    assert (baseline_of("rednet26"), baseline_of("rednet50")) == (
        "resnet26",
        "torchvision.resnet50",
    )
    assert baseline_of("retinanet_rednet50_fpn_inv_neck") == "retinanet_resnet50_fpn"
    rows = [
        MemoryResult("torchvision.resnet50", "-", 8, "float32", "nchw", 100.0, None, None, 80, 1),
        MemoryResult("rednet50", "regen", 8, "float32", "nchw", 90.0, None, None, 60, 1),
    ]
    assert [(r.ratio, r.time_ratio) for r in with_ratios(rows)] == [(None, None), (0.9, 0.75)]


def test_bench_memory_steps_every_model_each_round_in_a_shuffled_order() -> None:
    from involution.bench.memory import MemoryResult, Prepared, timed_in_turn

    calls: list[int] = []
    prepared = [
        Prepared(
            MemoryResult(f"model{k}", "-", 8, "float32", "nchw", 1.0, None, None, 0.0, 0.0),
            lambda k=k: calls.append(k),
        )
        for k in range(3)
    ]
    results = timed_in_turn(prepared, steps=8)
    rounds = [tuple(calls[i : i + 3]) for i in range(0, len(calls), 3)]
    assert len(rounds) == 8 and all(sorted(r) == [0, 1, 2] for r in rounds)
    assert len(set(rounds)) > 1  # not one fixed order
    assert [r.model for r in results] == ["model0", "model1", "model2"]
    assert all(r.step_ms >= 0 and r.step_cpu_ms >= 0 for r in results)
