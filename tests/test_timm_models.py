"""The model checks timm runs on its own models, for every registered RedNet.

Forward (and with gradient checkpointing), backward, default configuration, ``features_only``
(hook, getter and FX feature classes), ``forward_intermediates``, FX tracing (forward, backward,
then TorchScript), TorchScript with timm's ``scriptable`` flag, and the ``exportable`` flag, at
small inputs (64 px, 28 px for the compact models). Plus the error a wrong checkpoint gives.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from timm.layers import set_layer_config
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import involution  # noqa: F401  (registers the models with timm)
from involution.cli import main
from involution.models.convert import CheckpointMismatchError, rednet_from_checkpoint
from involution.ops import Involution2d

MODELS = timm.list_models("rednet*")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: as fast on these small inputs, and two pytest workers on two cores
    do not oversubscribe them (spinning OpenMP threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_variant_is_covered() -> None:
    assert {"rednet26", "rednet152", "rednet_compact", "rednet_compact_conv"} <= set(MODELS)


def _input(name: str, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A small input: 32 px (a 1 x 1 last stage), 28 px (the default) for the compact models."""
    channels, height, _ = timm.models.get_pretrained_cfg_value(name, "input_size")
    side = min(height, 32)
    return torch.randn(batch, channels, side, side, generator=torch.Generator().manual_seed(seed))


def _create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs)


def _ops_run(module: torch.nn.Module, *inputs: torch.Tensor) -> tuple[torch.Tensor, set[str]]:
    """``module(*inputs)`` and the names of the operators it ran (from the profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        output = module(*inputs)
    return output, {event.name for event in prof.events()}


@pytest.mark.parametrize("name", MODELS)
def test_forward_and_grad_checkpointing(name: str) -> None:
    model = _create(name).eval()
    x = _input(name)
    with torch.no_grad():
        out = model(x)
        model.set_grad_checkpointing()
        again = model(x)
    assert out.shape == (1, model.num_classes)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(again, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = _create(name, num_classes=42).train()
    out = model(_input(name, batch=2))
    out.mean().backward()
    assert out.shape == (2, 42)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg_matches_the_model(name: str) -> None:
    # Shapes at the default input size, on the meta device (the op's fake implementation)
    with torch.device("meta"):
        model = _create(name).eval()
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert f"{cfg['classifier']}.weight" in state
    assert f"{cfg['first_conv']}.weight" in state
    x = torch.randn(1, *cfg["input_size"], device="meta")
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert tuple(features.shape[-2:]) == tuple(cfg["pool_size"])
        assert features.shape[1] == model.num_features
        assert pre_logits.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)
        model.reset_classifier(0, "")
        assert tuple(model(x).shape[-2:]) == tuple(cfg["pool_size"])
        with torch.device("meta"):
            headless = _create(name, num_classes=0, global_pool="").eval()
        assert headless(x).shape == features.shape


@pytest.mark.parametrize("feature_cls", ["hook", "getter", "fx"])
@pytest.mark.parametrize("name", MODELS)
def test_features_only(name: str, feature_cls: str) -> None:
    kwargs = {} if feature_cls == "hook" else {"feature_cls": feature_cls}
    model = _create(name, features_only=True, **kwargs).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 3
    x = _input(name)
    with torch.no_grad():
        outputs = model(x)
    assert [o.shape[1] for o in outputs] == channels
    for output, reduction in zip(outputs, reductions, strict=True):
        assert output.shape[-1] <= math.ceil(x.shape[-1] / reduction) + 1
        assert torch.isfinite(output).all()


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates(name: str) -> None:
    model = _create(name).eval()
    x = _input(name)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        model.set_grad_checkpointing()
        checkpointed, _ = model.forward_intermediates(x)
    assert [t.shape[1] for t in intermediates] == [f["num_chs"] for f in model.feature_info]
    torch.testing.assert_close(checkpointed, final, rtol=1e-4, atol=1e-5)


def _fx_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model traced by torchvision's FX feature extractor with timm's tracer settings,
    returning its last node (as timm's own FX model tests do)."""
    tracer_kwargs = {
        "leaf_modules": get_notrace_modules(),
        "autowrap_functions": get_notrace_functions(),
    }
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model,
        train_return_nodes=[train_nodes[-1]],
        eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=tracer_kwargs,
    )


@pytest.mark.parametrize("name", MODELS)
def test_fx_forward_backward_and_torchscript(name: str) -> None:
    model = _create(name).eval()
    x = _input(name)
    with torch.inference_mode():
        expected = model(x)
        traced = _fx_model(model)
        (output,) = traced(x).values()
    assert torch.equal(output, expected)  # timm's leaf Involution2d: the very eager layer

    with torch.no_grad(), torch.jit.optimized_execution(False):
        (scripted,) = torch.jit.script(traced)(x).values()
    torch.testing.assert_close(scripted, expected, rtol=1e-5, atol=1e-5)

    model = _create(name, num_classes=7).train()
    traced = _fx_model(model)
    (output,) = traced(_input(name, batch=2)).values()
    output.mean().backward()
    assert output.shape == (2, 7)
    assert all(p.grad is not None for p in traced.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_torchscript_with_timm_scriptable(name: str) -> None:
    with set_layer_config(scriptable=True):
        model = _create(name).eval()
    x = _input(name)
    scripted = torch.jit.script(model)
    with torch.no_grad(), torch.jit.optimized_execution(False):
        output, ops = _ops_run(scripted, x)
        torch.testing.assert_close(output, model(x), rtol=1e-5, atol=1e-5)
    assert "involution::involution2d" in ops


def test_torchscript_of_fx_features() -> None:
    # timm's test_model_forward_torchscript_with_features_fx, on the smallest RedNet
    with set_layer_config(scriptable=True):
        model = _create("rednet_compact", features_only=True, feature_cls="fx").eval()
    x = _input("rednet_compact")
    with torch.no_grad(), torch.jit.optimized_execution(False):
        outputs = torch.jit.script(model)(x)
        expected = model(x)
    assert isinstance(outputs, list) and len(outputs) == len(expected)
    for output, reference in zip(outputs, expected, strict=True):
        torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_exportable_flag_uses_standard_operators(name: str) -> None:
    with set_layer_config(exportable=True):
        exportable = _create(name).eval()
    model = _create(name).eval()
    involutions = [m for m in exportable.modules() if isinstance(m, Involution2d)]
    assert involutions and all(m.exportable for m in involutions)
    assert not any(m.exportable for m in model.modules() if isinstance(m, Involution2d))
    x = _input(name)
    with torch.no_grad():
        torch.testing.assert_close(exportable(x), model(x), rtol=1e-5, atol=1e-5)


def test_exportable_model_exports_without_the_custom_op() -> None:
    with set_layer_config(exportable=True):
        model = _create("rednet_compact").eval()
    x = _input("rednet_compact")
    program = torch.export.export(model, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "involution" in t]
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-6, atol=1e-6)


def test_a_wrong_checkpoint_names_its_missing_and_unexpected_keys(tmp_path: Path, capsys) -> None:
    resnet = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet.items()}, path)
    with pytest.raises(CheckpointMismatchError) as caught:
        rednet_from_checkpoint(path)
    error = caught.value
    assert "stem.inv.span.weight" in error.missing and "conv1.weight" in error.unexpected
    assert "not a RedNet checkpoint" in str(error) and "unexpected keys" in str(error)

    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"encoder.weight": torch.ones(3)}, unrelated)
    assert main(["convert", str(unrelated), str(tmp_path / "out.safetensors")]) == 2
    message = capsys.readouterr().err
    assert "no consecutive layer1..layerN blocks (found: none)" in message
    assert "missing keys" in message and "unexpected keys" in message
    assert "encoder.weight" in message and "stem.conv1.weight" in message
