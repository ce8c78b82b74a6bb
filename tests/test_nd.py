"""1-D and 3-D involution: front doors, backends against the reference, layers, tracers."""

from __future__ import annotations

import random

import pytest
import torch

from involution import Involution1d, Involution3d, involution1d, involution2d, involution3d
from involution.ops.backends import get_backend
from involution.ops.checks import output_size

FAST_BACKENDS = [
    name
    for name in ("cpu",)
    if hasattr(get_backend(name), "forward3d")
    and get_backend(name).unavailable_reason(torch.device("cpu")) is None
]


def random_case(rng: random.Random, dims: int) -> dict:
    """Odd sizes, strides 1-3, dilations 1-2, 1-3 groups, anisotropic and even kernels (these
    with an explicit padding)."""
    kernel = [rng.choice([1, 2, 3, 4, 5] if dims == 1 else [1, 2, 3]) for _ in range(dims)]
    stride = [rng.randint(1, 3) for _ in range(dims)]
    dilation = [rng.randint(1, 2) for _ in range(dims)]
    if all(k % 2 for k in kernel) and rng.random() < 0.5:
        padding = None
        pads = [d * (k - 1) // 2 for d, k in zip(dilation, kernel, strict=True)]
    else:
        padding = pads = [rng.randint(0, 2) for _ in range(dims)]
    size = [
        rng.randint(max(1, d * (k - 1) + 1 - 2 * p), d * (k - 1) + (8 if dims == 1 else 3))
        for k, d, p in zip(kernel, dilation, pads, strict=True)
    ]
    groups = rng.randint(1, 3)
    channels = groups * rng.randint(1, 3)
    out = [output_size(*a) for a in zip(size, kernel, stride, pads, dilation, strict=True)]
    return {
        "shapes": ((2, channels, *size), (2, groups, *kernel, *out)),
        "args": (stride, padding, dilation),
    }


def call(dims: int, x, w, stride, padding, dilation, backend):
    if dims == 1:
        p = None if padding is None else padding[0]
        return involution1d(x, w, stride[0], p, dilation[0], backend=backend)
    return involution3d(x, w, tuple(stride), padding and tuple(padding), tuple(dilation), backend)


@pytest.mark.parametrize("dims", [1, 3])
def test_reference_matches_2d_op(dims):
    """The N-d reference on a volume of depth 1 (or a sequence) is the 2-D operator."""
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    w = torch.randn(2, 3, 3, 5, 4, 5, dtype=torch.float64)
    expected = involution2d(x, w, (2, 2), (1, 2), (1, 1), backend="reference")
    if dims == 3:
        got = involution3d(
            x[:, :, None], w[:, :, None, :, :, None], (1, 2, 2), (0, 1, 2), 1, "reference"
        )[:, :, 0]
        assert torch.allclose(got, expected)
    else:
        got = involution1d(x[:, :, 0], w[:, :, 1, :, 0], 2, 2, 1, "reference")
        line = involution2d(x[:, :, :1], w[:, :, 1:2, :, :1], 2, (0, 2), 1, backend="reference")
        assert torch.allclose(got, line[:, :, 0])


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_gradcheck_random_cases(dims, backend):
    rng = random.Random(dims * 7 + len(backend))
    for _ in range(4 if backend == "reference" else 8):
        case = random_case(rng, dims)
        x, w = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in case["shapes"])
        assert torch.autograd.gradcheck(
            lambda x, w, case=case: call(dims, x, w, *case["args"], backend), (x, w), fast_mode=True
        ), case


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("group_channels", [16, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backend_matches_reference(dims, backend, group_channels, dtype):
    """Also 16 channels per group, the C++ kernels' register-blocked path."""
    rng = random.Random(group_channels + dims)
    for _ in range(6):
        case = random_case(rng, dims)
        (b, _, *size), (_, g, *rest) = case["shapes"]
        x = torch.randn(b, g * group_channels, *size, dtype=dtype, requires_grad=True)
        w = torch.randn(b, g, *rest, dtype=dtype, requires_grad=True)
        grad = torch.randn(b, g * group_channels, *rest[dims:], dtype=dtype)
        results = []
        for name in ("reference", backend):
            y = call(dims, x, w, *case["args"], name)
            results.append((y, *torch.autograd.grad(y, (x, w), grad)))
        for ref, got in zip(*results, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(
    ("length", "kernel", "stride", "padding", "dilation"),
    [(1037, 7, 1, None, 1), (601, 4, 2, 2, 2), (530, 5, 3, 1, 1), (300, 1, 1, 0, 2)],
)
def test_long_sequences_match_reference(backend, length, kernel, stride, padding, dilation):
    """Lengths over several of the C++ kernels' tiles of positions, 16 and 3 channels per
    group, in the (B, C, L) layout and channels-last (B, L, C) strides."""
    for group_channels, layout in ((16, "contiguous"), (3, "contiguous"), (16, "channels-last")):
        pad = dilation * (kernel - 1) // 2 if padding is None else padding
        out = output_size(length, kernel, stride, pad, dilation)
        x = torch.randn(2, 2 * group_channels, length, dtype=torch.float64)
        if layout == "channels-last":
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        x.requires_grad_(True)
        w = torch.randn(2, 2, kernel, out, dtype=torch.float64, requires_grad=True)
        grad = torch.randn(2, 2 * group_channels, out, dtype=torch.float64)
        results = []
        for name in ("reference", backend):
            y = involution1d(x, w, stride, padding, dilation, backend=name)
            results.append((y, *torch.autograd.grad(y, (x, w), grad)))
        for ref, got in zip(*results, strict=True):
            torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(
    ("length", "kernel", "stride", "padding", "dilation"),
    [
        (53, 7, 1, None, 1),  # register blocks, taps by lane shifts
        (61, 5, 1, None, 2),  # register blocks, taps loaded (dilation 2)
        (70, 11, 1, None, 1),  # two blocks of taps (8 + 3)
        (67, 4, 1, 2, 1),  # even kernel: one output more than inputs
        (45, 6, 1, 1, 2),  # even kernel, dilated: fewer outputs than inputs
        (5, 7, 1, None, 1),  # shorter than the kernel
        (59, 3, 2, 1, 1),
        (83, 5, 3, 2, 2),
    ],
)
def test_sequence_gradcheck_each_gradient(backend, length, kernel, stride, padding, dilation):
    """float64 gradcheck of the sequence kernels (16 channels per group, batch 1) with respect
    to both operands and to each alone (the backward's three variants)."""
    pad = dilation * (kernel - 1) // 2 if padding is None else padding
    out = output_size(length, kernel, stride, pad, dilation)
    x = torch.randn(1, 32, length, dtype=torch.float64)
    w = torch.randn(1, 2, kernel, out, dtype=torch.float64)

    def op(x, w):
        return involution1d(x, w, stride, padding, dilation, backend=backend)

    assert torch.autograd.gradcheck(op, (x.requires_grad_(), w.requires_grad_()), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: op(x, w.detach()), (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda w: op(x.detach(), w), (w,), fast_mode=True)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(
    ("length", "kernel", "padding", "dilation", "needs"),
    [
        (1100, 11, None, 2, (True, True)),
        (2085, 8, 3, 1, (True, True)),  # even kernel: the last tile's inputs and outputs differ
        (1024, 2, 1, 1, (True, True)),  # one output past the last input tile
        (1050, 7, None, 1, (True, False)),
        (1050, 7, None, 1, (False, True)),
    ],
)
def test_long_sequence_gradients_non_contiguous(backend, length, kernel, padding, dilation, needs):
    """Stride 1 over several tiles, operands and grad_output not contiguous (every other
    position of longer rows), the gradients asked for alone and together."""
    pad = dilation * (kernel - 1) // 2 if padding is None else padding
    out = output_size(length, kernel, 1, pad, dilation)
    x = torch.randn(1, 48, 2 * length, dtype=torch.float64)[:, :, ::2]
    w = torch.randn(1, 3, kernel, 2 * out, dtype=torch.float64)[..., ::2]
    grad = torch.randn(1, 48, 2 * out, dtype=torch.float64)[:, :, ::2]
    x.requires_grad_(needs[0])
    w.requires_grad_(needs[1])
    wrt = [t for t, need in zip((x, w), needs, strict=True) if need]
    results = []
    for name in ("reference", backend):
        y = involution1d(x, w, 1, padding, dilation, backend=name)
        results.append((y, *torch.autograd.grad(y, wrt, grad)))
    for ref, got in zip(*results, strict=True):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_sequence_half_and_gradcheck_without_input_gradient(backend):
    x = torch.randn(2, 32, 300)
    w = torch.randn(2, 2, 5, 300)
    y16 = involution1d(x.bfloat16(), w.bfloat16(), backend=backend)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(
        y16.float(), involution1d(x, w, backend="reference"), rtol=0.05, atol=0.1
    )
    x, w = x[:1, :16, :20].double(), w[:1, :1, :, :20].double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: involution1d(x, w, backend=backend), (w,))


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_channels_last_3d_and_half(backend):
    x = torch.randn(2, 32, 5, 6, 7).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(2, 2, 3, 3, 3, 5, 6, 7)
    y = involution3d(x, w, backend=backend)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y, involution3d(x.contiguous(), w, backend="reference"))
    y16 = involution3d(x.bfloat16(), w.bfloat16(), backend=backend)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y, rtol=0.05, atol=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert involution3d(x, w, backend=backend).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("call_args", "message"),
    [
        ((torch.randn(2, 4, 5, 5), torch.randn(2, 1, 3, 3, 3, 5, 5, 5)), "input must be 5-D"),
        ((torch.randn(2, 4, 5, 5, 5), torch.randn(2, 1, 3, 3, 5, 5, 5)), "weight must be 8-D"),
        ((torch.randn(2, 5, 5, 5, 5), torch.randn(2, 2, 3, 3, 3, 5, 5, 5)), "must divide"),
        ((torch.randn(2, 4, 5, 5, 5), torch.randn(2, 2, 3, 3, 3, 5, 4, 5)), r"\(5, 4, 5\)"),
        ((torch.randn(2, 4, 5, 5, 5), torch.randn(1, 2, 3, 3, 3, 5, 5, 5)), "batch"),
    ],
)
def test_bad_input_3d(call_args, message):
    with pytest.raises(ValueError, match=message):
        involution3d(*call_args)


def test_bad_input_1d():
    with pytest.raises(ValueError, match=r"weight must be 4-D \(B, G, K, L_out\)"):
        involution1d(torch.randn(2, 4, 9), torch.randn(2, 1, 3, 9, 1))
    with pytest.raises(ValueError, match=r"weight output size \(8,\).*\(9,\)"):
        involution1d(torch.randn(2, 4, 9), torch.randn(2, 1, 3, 8))
    with pytest.raises(TypeError, match="stride must be an int or 3 ints"):
        involution3d(torch.randn(1, 4, 5, 5, 5), torch.randn(1, 1, 3, 3, 3, 5, 5, 5), (1, 1))


@pytest.mark.parametrize(
    ("layer", "size", "expected"),
    [
        (Involution3d(32, (3, 7, 7), stride=(1, 2, 2)), (5, 9, 11), (5, 5, 6)),
        (Involution3d(16, 3, stride=2, reduction_ratio=2), (3, 4, 5), (2, 2, 3)),
        (Involution1d(32, 5, stride=3), (10,), (4,)),
    ],
)
def test_layers_shape_and_parameters(layer, size, expected):
    x = torch.randn(2, layer.channels, *size)
    assert layer(x).shape == (2, layer.channels, *expected)
    taps = 1
    for k in layer.kernel_size:
        taps *= k
    assert layer.span.out_channels == layer.groups * taps
    with pytest.raises(ValueError, match="odd"):
        type(layer)(32, 4)


@pytest.mark.parametrize("cls", [Involution1d, Involution3d])
def test_layers_script_fx_compile(cls):
    layer = cls(16, 3, stride=2).eval()
    x = torch.randn(2, 16, *([6, 7, 5] if cls is Involution3d else [11]))
    expected = layer(x)
    torch.testing.assert_close(torch.jit.script(layer)(x), expected)
    torch.testing.assert_close(torch.fx.symbolic_trace(layer)(x), expected)
    if cls is Involution3d:  # the same op either way
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), expected)


def _randomised(layer: torch.nn.Module) -> torch.nn.Module:
    """Eval mode with non-trivial BatchNorm statistics."""
    norm = layer.norm
    norm.running_mean.uniform_(-0.5, 0.5)
    norm.running_var.uniform_(0.5, 2.0)
    return layer.eval()


@pytest.mark.parametrize(
    ("layer", "size"),
    [(Involution3d(16, (3, 1, 5), stride=(1, 2, 2)), (4, 9, 10)), (Involution1d(16, 5), (13,))],
)
def test_onnx_export_standard_operators_and_onnxruntime(layer, size, tmp_path):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    layer = _randomised(layer)
    x = torch.randn(2, 16, *size)
    path = tmp_path / "layer.onnx"
    with torch.no_grad():
        torch.onnx.export(layer, (x,), path, dynamo=True)
        expected = layer(x)
    assert {n.domain for n in onnx.load(path).graph.node} <= {"", "ai.onnx"}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=1e-4, atol=1e-5)


def test_triton_matches_reference():
    """The Triton kernels (on the GPU, or CPU tensors under TRITON_INTERPRET=1)."""
    from involution.ops.backends import triton as triton_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if triton_backend.unavailable_reason(device) is not None:
        pytest.skip(triton_backend.unavailable_reason(device))
    rng = random.Random(5)
    for dims in (1, 3, 3):
        case = random_case(rng, dims)
        x, w = (
            torch.randn(s, dtype=torch.float64, device=device, requires_grad=True)
            for s in case["shapes"]
        )
        grad = torch.randn(case["shapes"][0][:2] + case["shapes"][1][2 + dims :], device=device)
        results = []
        for name in ("reference", "triton"):
            y = call(dims, x, w, *case["args"], name)
            results.append((y, *torch.autograd.grad(y, (x, w), grad.double())))
        for ref, got in zip(*results, strict=True):
            torch.testing.assert_close(got, ref)


def test_bench_shift_and_accumulate_is_the_op():
    from involution.bench.op_nd import shift_and_accumulate

    x = torch.randn(2, 8, 3, 5, 6, dtype=torch.float64)
    w = torch.randn(2, 2, 3, 1, 3, 3, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(shift_and_accumulate(x, w), involution3d(x, w, backend="reference"))


def test_bench_roofline_bytes_of_each_pass():
    from involution.bench.op_nd import pass_bytes

    x, w = torch.empty(2, 16, 10), torch.empty(2, 1, 3, 10)  # 1280 and 240 bytes
    assert pass_bytes(x, w) == {"forward": 2800, "forward+backward": 7120}


def test_moving_clips_keep_the_item_inside_and_label_item_and_direction():
    import numpy as np

    from involution.datasets.clips import CLIP_CLASSES, DIRECTIONS, make_clips

    images = np.random.default_rng(0).integers(1, 256, (5, 28, 28), dtype=np.uint8)
    clips, labels = make_clips(images, np.arange(5), 40, frames=6, canvas=26, speed=2)
    assert clips.shape == (40, 1, 6, 26, 26) and labels.max() < len(CLIP_CLASSES)
    mass = clips.sum(axis=(1, 3, 4))
    assert np.allclose(mass, mass[:, :1])  # the whole item on every frame
    for clip, label in zip(clips[:8], labels[:8], strict=True):
        dy, dx = DIRECTIONS[label % len(DIRECTIONS)][1]
        ys, xs = np.nonzero(clip[0, 0]), np.nonzero(clip[0, -1])
        assert (xs[1].min() - ys[1].min(), xs[0].min() - ys[0].min()) == (10 * dx, 10 * dy)


@pytest.mark.parametrize("dims", [1, 3])
def test_twin_nets_differ_only_in_their_mixers(dims):
    from involution.models.twins_nd import MIXERS, mixer, twin_net

    kernel, size = (5, (40,)) if dims == 1 else ((3, 3, 3), (4, 8, 8))
    stem = (3, 2) if dims == 1 else ((1, 3, 3), (1, 2, 2))
    nets = {
        kind: twin_net(dims, 2, (32, 64), stem, lambda c, k=kind: mixer(k, dims, c, kernel), 7)
        for kind in MIXERS
    }
    x = torch.randn(3, 2, *size)
    shared = None
    for kind, net in nets.items():
        assert net(x).shape == (3, 7)
        mixers = [m for m in net.modules() if m.__class__.__name__.startswith(("Conv", "Inv"))]
        names = {n for n, _ in net.named_parameters() if ".mix.0." not in n}
        shared = names if shared is None else shared
        assert names == shared, kind  # every other layer is the same
        assert any(type(m).__name__.startswith("Involution") for m in mixers) == (
            kind == "involution"
        )
    depthwise = next(m for m in nets["depthwise"].modules() if getattr(m, "groups", 1) > 1)
    assert depthwise.groups == depthwise.in_channels == 16
    assert mixer("involution", dims, 32, kernel, group_channels=8).groups == 4
    with pytest.raises(ValueError, match="mixer must be one of"):
        mixer("attention", dims, 16, kernel)


def test_compare_trains_each_network_on_the_same_data():
    """A separable task: both networks learn it; the table has their rows."""
    from involution.models.twins_nd import mixer, twin_net
    from involution.train.compare import Data, compare, example_parser, markdown_table

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(192, 1, 32, generator=generator)
    y = (x.mean(dim=(1, 2)) > 0).long()
    x = x + 2.0 * (2 * y - 1).float()[:, None, None]
    data = Data(x[:128], y[:128], x[128:], y[128:])
    args = example_parser("Test.", train=128, test=64, epochs=3, batch=16).parse_args([])
    builders = {
        kind: lambda kind=kind: twin_net(1, 1, (32,), (3, 1), lambda c: mixer(kind, 1, c, 3), 2)
        for kind in ("involution", "conv")
    }
    results = compare(builders, data, args)
    assert [r.name for r in results] == ["involution", "conv"]
    assert all(r.accuracy > 0.9 and r.macs > 0 and r.seconds > 0 for r in results)
    assert results[0].params < results[1].params
    table = markdown_table(results, "sequence")
    assert "MACs/sequence" in table and f"| conv | {results[1].params:,} |" in table
