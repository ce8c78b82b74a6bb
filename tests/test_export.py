"""Every path out of eager PyTorch against eager outputs: FX, TorchScript, ONNX (onnxruntime).

The ONNX formulations of :mod:`involution.ops.lowering` against the reference backend, the
standard ``torch.onnx.export(..., dynamo=True)`` call on involution layers of every geometry and
on a RedNet (run in onnxruntime at sizes other than the exported one), and ``involution export``.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import involution
from involution.cli import main
from involution.export.onnx import check_onnx, export_onnx, relative_difference
from involution.models.rednet import Bottleneck
from involution.ops import (
    Involution2d,
    involution2d,
    involution2d_fused,
    lowering,
    set_kernel_regeneration,
)
from involution.ops.backends import get_backend

CPU = torch.device("cpu")
GPU = torch.device("cuda") if torch.cuda.is_available() else None


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: as fast on these small inputs, and two pytest workers on two cores
    do not oversubscribe them (spinning OpenMP threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _script_cases() -> list:
    """(backend, device) pairs a scripted layer runs natively here: "auto" and "reference"
    everywhere, "cpu" on CPU, "triton" on a GPU (not Triton's slow CPU interpreter)."""
    cases = []
    for device, native in ((CPU, "cpu"), (GPU, "triton")):
        if device is None:
            continue
        for backend in ("auto", "reference", native):
            if backend == "auto" or get_backend(backend).unavailable_reason(device) is None:
                cases.append(pytest.param(backend, device, id=f"{backend}-{device.type}"))
    return cases


def _ops_run(module: torch.nn.Module, *inputs: torch.Tensor) -> tuple[torch.Tensor, set[str]]:
    """``module(*inputs)`` and the names of the operators it ran (from the profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        output = module(*inputs)
    return output, {event.name for event in prof.events()}


#: (kernel, stride, dilation, group_channels, fused) of the layers exported together.
GEOMETRIES = [(7, 1, 1, 16, False), (3, 2, 1, 8, False), (3, 1, 2, 4, False), (5, 3, 1, 16, True)]


def _randomise(layers: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics for bare involution layers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in layers.modules():
            if isinstance(module, nn.Conv2d | nn.BatchNorm2d):
                for tensor in (module.weight, module.bias):
                    if tensor is not None:
                        tensor.copy_(torch.rand(tensor.shape, generator=generator) - 0.5)
            if isinstance(module, nn.BatchNorm2d):
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))
    return layers


def _calibrated(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """A randomly initialised network whose outputs depend on its input: random BatchNorm
    affines and running statistics measured on random batches, as training would (without them
    deep random nets collapse to a constant). Each residual branch ends small (RedNet
    zero-initialises it; at full scale the activations, and with them float32 rounding, grow
    tenfold per stage: float32 eager RedNet-26 itself is then 4e-5 off float64)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.0)
                module.bias.uniform_(-0.2, 0.2)
                module.momentum = None  # cumulative average over the calibration batches
                module.reset_running_stats()
            if isinstance(module, Bottleneck):
                module.bn3.weight.uniform_(0.1, 0.2)
        model.train()
        model(torch.randn(8, *input_shape[1:]))
    return model.eval()


@pytest.mark.parametrize("name", sorted(lowering.LOWERINGS))
@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "size"),
    [(3, 1, 1, (9, 7)), (7, 2, 1, (15, 12)), (3, 2, 2, (11, 10)), (5, 3, 1, (10, 13))],
)
def test_lowerings_match_the_reference(name, kernel, stride, dilation, size) -> None:
    padding = dilation * (kernel - 1) // 2
    out = [(n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1 for n in size]
    x = torch.randn(2, 16, *size, dtype=torch.float64)
    w = torch.randn(2, 4, kernel, kernel, *out, dtype=torch.float64)
    expected = involution2d(x, w, stride=stride, dilation=dilation, backend="reference")
    with lowering.use_lowering(name):
        actual = lowering.involution2d_lowered(
            x, w, (stride, stride), (padding, padding), (dilation, dilation)
        )
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_unknown_lowering_is_named() -> None:
    with (
        pytest.raises(ValueError, match="unknown lowering 'im2col'"),
        lowering.use_lowering("im2col"),
    ):
        pass


# ----------------------------------------------------------------------------- FX


def test_fx_records_each_involution_as_one_call() -> None:
    model = _calibrated(timm.create_model("rednet26"), (1, 3, 64, 64)).train()
    traced = torch.fx.symbolic_trace(model)
    calls = [n for n in traced.graph.nodes if n.target is involution.involution2d]
    assert len(calls) == sum(isinstance(m, Involution2d) for m in model.modules()) == 9
    x = torch.randn(2, 3, 64, 64)
    output = traced(x)
    # training mode: the regenerating layers' output comes from the fused layer kernel, equal
    # within float rounding ...
    assert relative_difference(output, model(x)) < 1e-4
    set_kernel_regeneration(model, False)
    assert torch.equal(output, model(x))  # ... and exactly equal with the kernels kept
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        output = traced(x)
        # eager inference runs the fused layer op: equal within float rounding ...
        assert relative_difference(output, model(x)) < 1e-4
        for module in model.modules():
            if isinstance(module, Involution2d):
                module.fuse_inference = False
        assert torch.equal(output, model(x))  # ... and exactly equal to the unfused layers


def test_fx_fused_layer_is_one_call_too() -> None:
    layer = _randomise(Involution2d(32, stride=2, fused=True)).eval()
    traced = torch.fx.symbolic_trace(layer)
    assert [n.target for n in traced.graph.nodes if n.op == "call_function"] == [involution2d_fused]
    x = torch.randn(1, 32, 15, 15)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), layer(x), rtol=1e-5, atol=1e-6)


def test_torchvision_feature_extractor_on_a_rednet() -> None:
    model = _calibrated(timm.create_model("rednet26"), (1, 3, 64, 64))
    extractor = create_feature_extractor(model, {"stem": "stem", "layer2": "c3", "layer4": "c5"})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = extractor(x)
        _, expected = model.forward_intermediates(x, indices=[0, 2, 4])
    for actual, reference in zip(features.values(), expected, strict=True):
        assert actual.shape == reference.shape
        assert relative_difference(actual, reference) < 1e-4


# ----------------------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(("backend", "device"), _script_cases())
def test_scripted_layer_calls_the_registered_op(backend: str, device, fused: bool) -> None:
    layer = Involution2d(32, stride=2, backend=backend, fused=fused)
    layer = _randomise(layer).eval().to(device)
    scripted = torch.jit.script(layer)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)  # no Python left in it
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(2, 32, 13, 10, device=device, requires_grad=True)
    with torch.jit.optimized_execution(False):
        actual, ops = _ops_run(loaded, x)
    assert ("involution::involution2d_fused" if fused else "involution::involution2d") in ops
    expected = layer(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    # autograd through the op from TorchScript
    (grad,) = torch.autograd.grad(actual.square().sum(), x)
    (reference,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-5)


def test_layer_with_its_switches_set_on_the_instance_scripts() -> None:
    # The switches are class attributes; set on an instance, TorchScript infers their type.
    layer = set_kernel_regeneration(_randomise(Involution2d(16, 3, group_channels=8)), False)
    layer.fuse_inference = False
    layer.exportable = True
    scripted = torch.jit.script(layer.eval())
    x = torch.randn(1, 16, 9, 9)
    torch.testing.assert_close(scripted(x), layer(x))


def test_scripted_functional_front_doors() -> None:
    @torch.jit.script
    def both(x: torch.Tensor, w: torch.Tensor, reduced: torch.Tensor, span: torch.Tensor):
        plain = involution2d(x, w, stride=(1, 2), dilation=2)
        fused = involution2d_fused(x, reduced, span, None, 3, 2, stride=(1, 2), dilation=2)
        return plain, fused

    x, reduced = torch.randn(1, 8, 9, 10), torch.randn(1, 4, 9, 5)
    span = torch.randn(18, 4, 1, 1)
    w = torch.nn.functional.conv2d(reduced, span).view(1, 2, 3, 3, 9, 5)
    plain, fused = both(x, w, reduced, span)
    expected = involution2d(x, w, stride=(1, 2), dilation=2)
    torch.testing.assert_close(plain, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- ONNX


class _Layers(nn.Module):
    """Involution layers of several geometries side by side: one output each."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            Involution2d(32, k, stride=s, dilation=d, group_channels=g, fused=f)
            for k, s, d, g, f in GEOMETRIES
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(layer(x) for layer in self.layers)


def _onnxruntime(path: Path | bytes, *inputs: torch.Tensor) -> list[torch.Tensor]:
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feed)]


def test_plain_onnx_export_of_layers_with_dynamic_sizes(tmp_path: Path) -> None:
    model = _randomise(_Layers()).eval()
    x = torch.randn(2, 32, 24, 24)
    dims = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    path = tmp_path / "layers.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=(dims,))
    for shape in [(2, 32, 24, 24), (1, 32, 17, 29), (3, 32, 40, 33)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = model(x)
        actual = _onnxruntime(path, x)
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert a.shape == e.shape
            assert relative_difference(a, e) < 1e-4


def test_onnx_export_out_of_the_box(tmp_path: Path) -> None:
    layer = _randomise(Involution2d(16, 3)).eval()
    x = torch.randn(1, 16, 12, 12)
    path = tmp_path / "layer.onnx"
    torch.onnx.export(layer, (x,), path, dynamo=True)
    with torch.no_grad():
        expected = layer(x)
    assert relative_difference(_onnxruntime(path, x)[0], expected) < 1e-5


def test_export_keeps_the_op_and_onnx_translates_it(tmp_path: Path) -> None:
    layer = _randomise(Involution2d(16, 3)).eval()
    x = torch.randn(1, 16, 12, 12)
    program = torch.export.export(layer, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert "involution.involution2d.default" in targets
    path = tmp_path / "layer.onnx"
    torch.onnx.export(layer, (x,), path, dynamo=True)
    nodes = onnx.load(path).graph.node
    assert {n.domain for n in nodes} <= {"", "ai.onnx"}  # standard operators only
    assert sum(n.op_type == "Slice" for n in nodes) == 3 + 9  # the shifts: rows, then taps


@pytest.mark.parametrize("name", sorted(lowering.LOWERINGS))
def test_exportable_layers_in_onnxruntime(name: str, tmp_path: Path) -> None:
    # Involution2d(exportable=True): the ATen formulation, traced by the exporter
    layer = Involution2d(16, 3, stride=2, dilation=2, group_channels=8)
    layer.exportable = True
    layer = _randomise(layer).eval()
    dims = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    path = tmp_path / f"{name}.onnx"
    with torch.no_grad(), lowering.use_lowering(name):
        torch.onnx.export(layer, (torch.randn(1, 16, 12, 12),), path, dynamic_shapes=(dims,))
        x = torch.randn(2, 16, 15, 9)
        expected = layer(x)
    assert relative_difference(_onnxruntime(path, x)[0], expected) < 1e-5


def test_rednet_onnx_matches_eager_at_other_sizes(tmp_path: Path) -> None:
    # The feature map, not pooled logits: its every pixel depends on the input. Float32
    # through 26 layers in another summation order: over random initialisations the largest
    # relative difference was 2e-5 to 1.2e-4 (seeds 0-5), so a seeded model and 3e-4.
    torch.manual_seed(0)
    model = timm.create_model("rednet26", num_classes=0, global_pool="")
    model = _calibrated(model, (1, 3, 64, 64))
    path = export_onnx(model, tmp_path / "rednet26.onnx", (64, 64))
    parities = check_onnx(path, model, [(1, 3, 64, 64), (2, 3, 96, 80), (1, 3, 65, 49)], 1)
    for parity in parities:
        assert parity.max_relative_diff < 3e-4, parity


def test_export_cli_checks_parity(tmp_path: Path, capsys) -> None:
    source = _calibrated(timm.create_model("rednet_compact", num_classes=5), (1, 1, 28, 28))
    weights = tmp_path / "compact.safetensors"
    save_file(source.state_dict(), weights)
    out = tmp_path / "compact.onnx"
    args = ["--model", "rednet_compact", "--weights", str(weights), "--out", str(out)]
    assert main(["export", *args]) == 0
    printed = capsys.readouterr().out
    assert "1x1x28x28" in printed and "2x1x36x26" in printed
    assert float(re.search(r"max relative difference: (\S+)", printed).group(1)) < 1e-4
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        expected = source.eval()(x)
    assert relative_difference(_onnxruntime(out, x)[0], expected) < 1e-4


def test_export_cli_errors(tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "x.onnx")
    assert main(["export", "--model", "no_such_model", "--out", out]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
    assert main(["export", "--run", str(tmp_path), "--weights", "w", "--out", out]) == 2
    assert "--weights goes with --model" in capsys.readouterr().err
