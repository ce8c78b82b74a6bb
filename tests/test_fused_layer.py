"""The fused inference layer (``involution2d_layer``, Involution2d's eval path, Involution2dAffine)
against the unfused layer on the reference backend.

Every case builds an Involution2d with random weights and random BatchNorm statistics and
compares the fused C++ path (``"cpu"`` backend, eval mode, no gradients) with the same module on
the ``"reference"`` backend, which never takes the fused path: float64 to 1e-12, float32 to
float32 rounding, over odd sizes, strides 1-3, dilations 1-2, 4-32 channels per group, both
memory layouts, with and without the BatchNorm + ReLU epilogue.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from involution.ops import (
    Involution2d,
    Involution2dAffine,
    functional,
    involution2d_layer,
    registration,
)
from involution.ops.backends import cpu as cpu_backend

pytestmark = pytest.mark.skipif(
    cpu_backend.unavailable_reason(torch.device("cpu")) is not None,
    reason=f"cpu backend unavailable: {cpu_backend.unavailable_reason(torch.device('cpu'))}",
)

#: (rtol, atol) of the fused path against the unfused reference.
TOLERANCES = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-5)}

#: (channels, group_channels, kernel_size, stride, dilation, height, width)
CASES = [
    (32, 16, 7, 1, 1, 13, 11),  # RedNet's group width, odd sizes
    (32, 16, 7, 2, 1, 13, 11),  # stride 2 with odd sizes: ceil-mode pooled kernel branch
    (64, 16, 7, 1, 1, 7, 7),  # the map is smaller than the kernel's reach
    (32, 16, 3, 1, 2, 9, 10),  # dilation
    (24, 8, 5, 2, 1, 10, 7),  # 8 channels per group: the generic aggregation
    (20, 4, 3, 3, 1, 5, 6),  # stride 3, G*K*K not a multiple of 16
    (64, 32, 7, 1, 1, 20, 19),  # 32 channels per group, more than one block of pixels per row
]


def randomize(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Random weights and BatchNorm statistics, eval mode."""
    torch.manual_seed(0)
    module = module.to(dtype).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.5)
        for norm in module.modules():
            if isinstance(norm, nn.BatchNorm2d):
                norm.running_mean.normal_(0, 0.5)
                norm.running_var.uniform_(0.5, 2.0)
    return module


def make_input(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    x = torch.randn(shape, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def fused_and_reference(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the module on the cpu backend, on the reference backend), under no_grad."""
    involutions = [m for m in module.modules() if isinstance(m, Involution2d)]
    with torch.no_grad():
        for inv in involutions:
            inv.backend = "cpu"
        fused = module(x)
        for inv in involutions:
            inv.backend = "reference"
        reference = module(x)
    return fused, reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_eval_layer_matches_unfused_reference(case, channels_last, dtype):
    channels, group_channels, k, stride, dilation, height, width = case
    module = Involution2d(
        channels, k, stride=stride, dilation=dilation, group_channels=group_channels
    )
    module = randomize(module, dtype)
    x = make_input((2, channels, height, width), dtype, channels_last)
    backend = "cpu"
    with torch.no_grad():
        assert module.layer_inference_applies(x, backend)
    fused, reference = fused_and_reference(module, x)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(fused, reference, rtol=rtol, atol=atol)
    assert fused.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", [nn.ReLU, nn.Identity])
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[6]])
def test_affine_epilogue_matches_unfused_reference(case, act, dtype):
    channels, group_channels, k, stride, dilation, height, width = case
    involution = Involution2d(
        channels, k, stride=stride, dilation=dilation, group_channels=group_channels
    )
    norm = nn.BatchNorm2d(channels)
    randomize(nn.Sequential(involution, norm), dtype)
    module = Involution2dAffine.from_batchnorm(involution, norm, act())
    x = make_input((3, channels, height, width), dtype, channels_last=True)
    fused, reference = fused_and_reference(module, x)
    with torch.no_grad():
        unfused = act()(norm(involution(x)))  # involution on the reference backend here
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(fused, reference, rtol=rtol, atol=atol)
    torch.testing.assert_close(fused, unfused, rtol=rtol, atol=atol)


def test_functional_layer_matches_composed_steps_on_both_backends():
    torch.manual_seed(1)
    c, m, g, k = 32, 8, 2, 5
    x = torch.randn(2, c, 9, 11, dtype=torch.float64)
    args = dict(
        reduce_weight=torch.randn(m, c, 1, 1, dtype=torch.float64),
        reduce_bias=None,  # no bias: the kernel reads zeros
        span_weight=torch.randn(g * k * k, m, dtype=torch.float64),
        span_bias=torch.randn(g * k * k, dtype=torch.float64),
        kernel_size=k,
        groups=g,
        stride=2,
        out_scale=torch.rand(c, dtype=torch.float64),
        out_shift=torch.randn(c, dtype=torch.float64),
        out_relu=True,
    )
    fused = involution2d_layer(x, backend="cpu", **args)
    reference = involution2d_layer(x, backend="reference", **args)
    assert fused.shape == (2, c, 5, 6)
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)


def test_half_precision_falls_back_to_the_composed_steps():
    module = randomize(Involution2d(32, 3), torch.float32)
    x = torch.randn(1, 32, 6, 6)
    with torch.no_grad():
        fused = involution2d_layer(
            x.bfloat16(),
            *(t.bfloat16() for t in module.folded_reduce()),
            module.span.weight.bfloat16(),
            module.span.bias.bfloat16(),
            3,
            module.groups,
            backend="cpu",
        )
        module.backend = "reference"
        reference = module(x)
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), reference, rtol=2e-2, atol=5e-2)


def test_training_mode_and_enabled_gradients_keep_the_differentiable_path():
    module = randomize(Involution2d(32, 3), torch.float64)
    x = torch.randn(1, 32, 6, 6, dtype=torch.float64, requires_grad=True)
    assert not module.layer_inference_applies(x, "cpu")  # gradients enabled
    y = module(x)
    assert y.requires_grad
    y.sum().backward()
    assert x.grad is not None and module.reduce.weight.grad is not None
    module.train()
    with torch.no_grad():
        assert not module.layer_inference_applies(x, "cpu")
    module.eval()
    module.fuse_inference = False
    with torch.no_grad():
        assert not module.layer_inference_applies(x, "cpu")


def test_eval_path_takes_the_layer_op(monkeypatch):
    preparations, runs = [], []
    original = registration.prepare_layer

    def counting(*args):
        preparations.append(args)
        run = original(*args)
        return lambda *inputs: runs.append(inputs) or run(*inputs)

    monkeypatch.setattr(registration, "prepare_layer", counting)
    module = randomize(Involution2d(16, 3, backend="cpu"), torch.float32)
    with torch.inference_mode():
        module(torch.randn(1, 16, 5, 5))
        module(torch.randn(1, 16, 5, 5))
    assert (len(preparations), len(runs)) == (1, 2)


def test_layer_op_refuses_gradients_and_bad_arguments():
    x = torch.randn(1, 16, 5, 5)
    weights = (torch.randn(4, 16), None, torch.randn(9, 4), None)
    with pytest.raises(RuntimeError, match="inference-only"):
        involution2d_layer(x.requires_grad_(), *weights, 3, 1)
    x = x.detach()
    with pytest.raises(ValueError, match="odd"):
        involution2d_layer(x, *weights, 2, 1)
    with pytest.raises(ValueError, match="span_weight"):
        involution2d_layer(x, *weights, 3, 2)  # 2 groups need 18 kernel channels
    with pytest.raises(ValueError, match="reduce_weight"):
        involution2d_layer(x, torch.randn(4, 8), *weights[1:], 3, 1)
    with pytest.raises(ValueError, match="together"):
        involution2d_layer(x, *weights, 3, 1, out_scale=torch.ones(16))
    with pytest.raises(ValueError, match="out_shift"):
        involution2d_layer(x, *weights, 3, 1, out_scale=torch.ones(16), out_shift=torch.ones(3))
    with pytest.raises(ValueError, match="scale"):
        Involution2dAffine(Involution2d(16, 3), torch.ones(8), torch.zeros(16))
    with pytest.raises(ValueError, match="need proj_weight"):
        involution2d_layer(x, *weights, 3, 1, residual=torch.ones(1, 16, 5, 5))
    with pytest.raises(ValueError, match="proj_weight"):
        involution2d_layer(x, *weights, 3, 1, proj_weight=torch.ones(32, 8))
    with pytest.raises(ValueError, match="residual must have shape"):
        involution2d_layer(
            x, *weights, 3, 1, proj_weight=torch.ones(32, 16), residual=torch.ones(1, 16, 5, 5)
        )
    affine = Involution2dAffine(Involution2d(16, 3), torch.ones(16), torch.zeros(16))
    with pytest.raises(ValueError, match="plain 1x1 conv"):
        affine.forward_projected(x, nn.Conv2d(16, 32, 1, stride=2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("out_channels", "residual"), [(48, True), (32, False), (20, True)])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]])
def test_projection_epilogue_matches_unfused_reference(
    case, out_channels, residual, channels_last, dtype
):
    # A bottleneck's tail after its spatial layer: 1x1 conv (BN folded), + shortcut, ReLU. 20
    # output channels (not a multiple of 16) take the composed steps on the cpu backend too.
    # Built in float64, where the reference backend gives the truth a float32 run rounds from
    # (two float32 paths, summing in different orders, can differ by twice that rounding).
    channels, group_channels, kernel, stride, dilation, height, width = case
    torch.manual_seed(0)
    inv = Involution2d(channels, kernel, stride, dilation, group_channels=group_channels)
    scale, shift = torch.rand(channels) + 0.5, torch.randn(channels)
    truth_affine = randomize(Involution2dAffine(inv, scale, shift, nn.ReLU()), torch.float64)
    truth_projection = randomize(nn.Conv2d(channels, out_channels, 1), torch.float64)
    x = make_input((2, channels, height, width), torch.float64, channels_last)
    out_size = (-(-height // stride), -(-width // stride))
    shortcut = (
        make_input((2, out_channels, *out_size), torch.float64, channels_last) if residual else None
    )
    affine = copy.deepcopy(truth_affine).to(dtype)
    projection = copy.deepcopy(truth_projection).to(dtype)
    with torch.no_grad():
        inv.backend = "reference"
        truth = truth_affine.forward_projected(x, truth_projection, shortcut, True)
        unfused = truth_projection(truth_affine(x)) + (0 if shortcut is None else shortcut)
        affine.involution.backend = "cpu"
        args = (x.to(dtype), projection, None if shortcut is None else shortcut.to(dtype), True)
        fused = affine.forward_projected(*args)
    assert fused.shape == (2, out_channels, *out_size)
    assert fused.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(truth, torch.relu(unfused), rtol=1e-12, atol=1e-12)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(fused, truth.to(dtype), rtol=rtol, atol=atol)


def test_layer_op_passes_opcheck_and_compiles_without_graph_breaks():
    module = randomize(Involution2d(32, 7, stride=2), torch.float32)
    affine = Involution2dAffine(module, torch.rand(32) + 0.5, torch.randn(32), nn.ReLU())
    x = torch.randn(2, 32, 9, 9).contiguous(memory_format=torch.channels_last)
    reduce_weight, reduce_bias = module.folded_reduce()
    args = (x, reduce_weight.detach(), reduce_bias.detach(), module.span.weight.detach())
    args += (module.span.bias.detach(), [7, 7], [2, 2], [3, 3], [1, 1], 2)
    args += (affine.scale, affine.shift, True)
    projection = (torch.randn(48, 32, 1, 1), torch.randn(48), torch.randn(2, 48, 5, 5), True)
    for extra in ((None, None, None, False), projection):
        torch.library.opcheck(registration.involution2d_layer_op, (*args, *extra, "cpu"))
    with torch.no_grad():
        eager = affine(x)
        compiled = torch.compile(affine, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_packed_weights_are_reused_until_the_weights_change(monkeypatch):
    packs = []
    original = cpu_backend._C.layer_pack

    def counting(*args):
        packs.append(args)
        return original(*args)

    monkeypatch.setattr(cpu_backend._C, "layer_pack", counting)
    module = randomize(Involution2d(32, 3), torch.float64)
    module.reduce = nn.utils.fuse_conv_bn_eval(module.reduce, module.norm)
    module.norm = nn.Identity()  # as fold_batchnorm leaves it: the weights are parameters
    x = torch.randn(1, 32, 7, 7, dtype=torch.float64)
    with torch.inference_mode():
        module(x)
        module(x)
    assert len(packs) == 1
    with torch.no_grad():
        module.span.weight.mul_(2.0)
    fused, reference = fused_and_reference(module, x)
    assert len(packs) == 2
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)


def test_module_checks_and_prepares_the_layer_op_once_per_input_shape(monkeypatch):
    checks = []
    original = functional.layer_spec

    def counting(*args):
        checks.append(args)
        return original(*args)

    monkeypatch.setattr(functional, "layer_spec", counting)
    # With its BatchNorm (not folded): the preparation folds it, once.
    module = randomize(Involution2d(32, 7, stride=2), torch.float64)
    x = torch.randn(2, 32, 9, 9, dtype=torch.float64)
    with torch.inference_mode():
        first = module(x)
        again = module(x)
        assert len(checks) == 1
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        module(x[:1, :, :7])
        assert len(checks) == 2
    # Parameters and buffers changed in place, or replaced, are seen: each output is checked
    # against the reference backend.
    changes = {
        "span weight": lambda: module.span.weight.mul_(2.0),
        "norm statistics": lambda: module.norm.running_var.add_(1.0),
        "reduce weight": lambda: module.reduce.weight.neg_(),
        "replaced span": lambda: setattr(
            module, "span", randomize(nn.Conv2d(8, 2 * 49, 1), torch.float64)
        ),
    }
    for name, change in changes.items():
        with torch.no_grad():
            change()
        fused, reference = fused_and_reference(module, x)
        torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12, msg=name)


def test_prepared_layer_op_is_neither_copied_nor_pickled():
    module = randomize(Involution2d(16, 3), torch.float32)
    x = torch.randn(1, 16, 6, 6)
    with torch.inference_mode():
        expected = module(x)
    assert module._prepared_layer is not None
    assert copy.deepcopy(module)._prepared_layer is None
    restored = pickle.loads(pickle.dumps(module))
    assert restored._prepared_layer is None
    with torch.inference_mode():
        torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)


def test_prepared_layer_op_matches_the_front_door():
    torch.manual_seed(2)
    c, m, g, k, p = 32, 8, 2, 5, 48
    x = torch.randn(2, c, 9, 11, dtype=torch.float64)
    weights = (torch.randn(m, c), torch.randn(m), torch.randn(g * k * k, m), None)
    kwargs = dict(
        stride=2,
        out_scale=torch.rand(c, dtype=torch.float64),
        out_shift=torch.randn(c, dtype=torch.float64),
        out_relu=True,
        proj_weight=torch.randn(p, c, 1, 1, dtype=torch.float64),
        proj_bias=torch.randn(p, dtype=torch.float64),
        residual=torch.randn(2, p, 5, 6, dtype=torch.float64),
        proj_relu=True,
    )
    weights = tuple(None if w is None else w.double() for w in weights)
    with torch.inference_mode():
        run = functional.prepare_involution2d_layer(x, *weights, k, g, backend="cpu", **kwargs)
        expected = involution2d_layer(x, *weights, k, g, backend="reference", **kwargs)
        torch.testing.assert_close(run(x, kwargs["residual"]), expected, rtol=1e-12, atol=1e-12)
        other = torch.randn_like(x)
        torch.testing.assert_close(
            run(other, kwargs["residual"]),
            involution2d_layer(other, *weights, k, g, backend="reference", **kwargs),
            rtol=1e-12,
            atol=1e-12,
        )
        with pytest.raises(ValueError, match="odd"):
            functional.prepare_involution2d_layer(x, *weights, 4, g, **kwargs)
        # Under autocast the input would be cast on each call: no prepared op.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert functional.prepare_involution2d_layer(x, *weights, k, g, **kwargs) is None


def test_layer_front_doors_declare_their_parameters():
    """help() and the API reference show input + LayerArguments' fields, with their defaults."""
    import dataclasses
    import inspect

    from involution.ops.functional import involution2d_layer, prepare_involution2d_layer
    from involution.ops.layer import LayerArguments

    fields = [field.name for field in dataclasses.fields(LayerArguments)]
    for front_door in (involution2d_layer, prepare_involution2d_layer):
        parameters = inspect.signature(front_door).parameters
        assert list(parameters) == ["input", *fields]
        assert parameters["backend"].default == "auto"
        assert parameters["groups"].default is inspect.Parameter.empty
