"""``fold_batchnorm``: the folded RedNet computes the unfolded eval-mode RedNet's function.

The folded model runs its fused CPU paths (``"cpu"`` backend); the original runs unfolded on the
``"reference"`` backend, so each comparison checks the folding and the fused kernels together.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from involution.models import RedNet
from involution.models.fold import ConvAct, fold_batchnorm
from involution.ops import Involution2d, Involution2dAffine
from involution.ops.backends import cpu as cpu_backend

pytestmark = pytest.mark.skipif(
    cpu_backend.unavailable_reason(torch.device("cpu")) is not None,
    reason=f"cpu backend unavailable: {cpu_backend.unavailable_reason(torch.device('cpu'))}",
)

TINY = dict(layers=(1, 2, 1, 1), stage_widths=(16, 32, 32, 64), stem_width=32, num_classes=10)
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4)}


def randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affines (zero_init_last would hide bn3), eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, nn.BatchNorm2d):
                norm.running_mean.normal_(0, 0.2)
                norm.running_var.uniform_(0.5, 2.0)
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0, 0.2)
    return model.eval()


def set_backend(model: nn.Module, backend: str) -> None:
    for module in model.modules():
        if isinstance(module, Involution2d):
            module.backend = backend


def compare(model: nn.Module, x: torch.Tensor) -> None:
    """fold_batchnorm(model) on the cpu backend == model on the reference backend in float64.

    float64 is the truth a float32 run rounds from: two float32 paths (different summation
    orders) can differ by twice that rounding."""
    folded = fold_batchnorm(model)
    set_backend(folded, "cpu")
    reference = copy.deepcopy(model).double()
    set_backend(reference, "reference")
    with torch.no_grad():
        want, got = reference(x.double()), folded(x)
    want = [w.to(x.dtype) for w in want] if isinstance(want, list) else want.to(x.dtype)
    rtol, atol = TOLERANCES[x.dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)  # a tensor or a list of them


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_rednet_matches_unfolded(dtype, channels_last):
    torch.manual_seed(0)  # the same weights whatever ran before in this process
    model = randomize_norms(RedNet.from_kwargs(TINY).to(dtype))
    x = torch.randn(2, 3, 27, 25, dtype=dtype)  # odd sizes: ceil-mode strides everywhere
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    compare(model, x)


def test_every_batchnorm_is_folded_and_the_original_is_untouched():
    model = randomize_norms(RedNet.from_kwargs(TINY))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert not folded.training
    affines = [m for m in folded.modules() if isinstance(m, Involution2dAffine)]
    assert len(affines) == 1 + sum(TINY["layers"])  # the stem's and every bottleneck's
    assert all(isinstance(m.act, nn.ReLU) for m in affines)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_conv_twin_and_features_only_backbone_fold():
    twin = randomize_norms(RedNet.from_kwargs({**TINY, "mixer": "conv"}).double())
    compare(twin, torch.randn(1, 3, 25, 27, dtype=torch.float64))
    backbone = timm.create_model(
        "rednet26", features_only=True, stage_widths=(16, 32, 32, 64), stem_width=32
    )
    compare(randomize_norms(backbone.double()), torch.randn(1, 3, 32, 36, dtype=torch.float64))


def test_folded_model_differentiates_like_the_original():
    # With gradients enabled the folded model takes the differentiable (unfused) path.
    model = randomize_norms(RedNet.from_kwargs(TINY).double())
    folded = fold_batchnorm(model)
    affine = folded.layer1[0].conv2
    assert isinstance(affine, Involution2dAffine)
    features = torch.randn(1, 16, 5, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(affine, (features,), fast_mode=True)
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad(model(x).sum(), x)
    (got,) = torch.autograd.grad(folded(x).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_conv_act_matches_conv_add_relu(relu, residual):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1).eval()
    module = ConvAct(conv, relu)
    x = torch.randn(2, 16, 11, 9).contiguous(memory_format=torch.channels_last)
    other = torch.randn(2, 24, 6, 5) if residual else None
    with torch.no_grad():  # float32 on CPU: oneDNN's fused convolution where available
        got = module(x, other)
        want = conv(x) + (other if residual else 0)
        want = torch.relu(want) if relu else want
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="padding"):
        ConvAct(nn.Conv2d(4, 4, 3, padding="same"), relu)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_conv_act_reorders_its_weight_once_per_input_shape_and_thread_count_and_still_copies():
    conv = nn.Conv2d(8, 8, 1).eval()
    module = ConvAct(conv, relu=True)
    shapes = [(1, 8, 5, 5), (2, 8, 9, 7), (1, 8, 3, 3), (1, 8, 4, 4), (1, 8, 6, 6)]
    x, other = (torch.randn(shape) for shape in shapes[:2])
    threads = torch.get_num_threads()

    def keys(*shapes: tuple[int, ...]) -> list:
        return [(tuple(shape), threads) for shape in shapes]

    with torch.no_grad():
        module(x)
        first = module._packed[keys(x.shape)[0]]
        module(other)
        module(x)
        assert module._packed[keys(x.shape)[0]] is first and keys(other.shape)[0] in module._packed
        for shape in shapes[2:]:  # one shape too many: the least recently used goes
            module(torch.randn(shape))
        assert list(module._packed) == keys(x.shape, *shapes[2:])
        conv.weight.mul_(-1.0)  # a changed weight is reordered again
        torch.testing.assert_close(module(x), torch.relu(conv(x)), rtol=1e-5, atol=1e-5)
        assert list(module._packed) == keys(x.shape)
        # oneDNN's layout depends on the thread count too (a layer3 block of ResNet-50 ran 10x
        # slower on 1 thread with the layout of 2)
        torch.set_num_threads(threads + 1)
        try:
            torch.testing.assert_close(module(x), torch.relu(conv(x)), rtol=1e-5, atol=1e-5)
        finally:
            torch.set_num_threads(threads)
        assert list(module._packed) == [*keys(x.shape), (tuple(x.shape), threads + 1)]
    copied = copy.deepcopy(module)
    assert copied._packed == {}
    with torch.no_grad():
        torch.testing.assert_close(copied(x), module(x))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_conv_act_takes_inference_tensor_weights():
    # Made under inference_mode, the weight has no version counter: reordered on every call
    # (it used to raise "Inference tensors do not track version counter").
    with torch.inference_mode():
        conv = nn.Conv2d(8, 8, 3, padding=1).eval()
        module = ConvAct(conv, relu=False)
        x = torch.randn(1, 8, 6, 6)
        torch.testing.assert_close(module(x), conv(x), rtol=1e-5, atol=1e-5)
        conv.weight.mul_(2.0)
        torch.testing.assert_close(module(x), conv(x), rtol=1e-5, atol=1e-5)
    assert module._packed == {}


def test_folded_rednet_compiles_without_graph_breaks():
    # A graph break inside ConvAct made Dynamo recompile the rest of its forward for every conv
    # shape, past its recompile limit: the compiled folded RedNet-50 ran 1.3x slower than eager.
    model = fold_batchnorm(randomize_norms(RedNet.from_kwargs(TINY)))
    x = torch.randn(2, 3, 27, 25)
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), want, rtol=1e-3, atol=1e-3)  # float32 rounding
