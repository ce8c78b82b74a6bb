"""Every fast backend against the reference, plus the front door's argument checks.

Each fast backend is tested on the device it runs on natively: the C++ ``"cpu"`` backend (when
it is built) on CPU tensors, and ``"triton"`` on the GPU where there is one, else on CPU tensors
under Triton's interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py`` on machines without
CUDA). The interpreter is slow, so an interpreted backend gets smaller and fewer random examples
and a fast gradcheck. The reference runs on the same device as the backend it checks.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from involution import cli, involution2d
from involution.bench import op as op_bench
from involution.ops import backends, involution2d_fused, registration
from involution.ops.backends import cpu as cpu_backend
from involution.ops.checks import output_size
from involution.ops.layout import is_pixel_major, kernels_like

CPU = torch.device("cpu")
GPU = torch.device("cuda") if torch.cuda.is_available() else None


def backend_devices() -> dict[str, torch.device]:
    """Each fast backend (not the reference) that runs here, and the device to test it on."""
    found = {}
    for name in backends.BACKENDS:
        if name in ("auto", "reference"):
            continue
        for device in (GPU, CPU):
            if device is not None and backends.get_backend(name).unavailable_reason(device) is None:
                found[name] = device
                break
    return found


DEVICE_OF = backend_devices()
BACKENDS = list(DEVICE_OF)
if not BACKENDS:
    pytest.skip("no fast involution backend can run here", allow_module_level=True)


def interpreted(backend: str) -> bool:
    """Whether ``backend`` runs in an interpreter on CPU tensors (slow: test it more lightly)."""
    return backend == "triton" and DEVICE_OF[backend] == CPU


#: Random problems per backend other than "cpu": few and tiny when the only one is interpreted.
OTHER_INTERPRETED = all(interpreted(name) for name in BACKENDS if name != "cpu")

needs_cpu = pytest.mark.skipif(
    "cpu" not in BACKENDS, reason=f"cpu backend unavailable: {cpu_backend.unavailable_reason(CPU)}"
)

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

#: (rtol, atol) of a backend against the reference on the same inputs. Both accumulate in
#: float32 (float64), in different orders; half results may differ by one rounding of the output.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-2),
    torch.bfloat16: (1.6e-2, 6e-2),
}

LAYOUTS = ("contiguous", "channels_last", "strided")


def make_input(
    shape: tuple[int, int, int, int], dtype: torch.dtype, layout: str, device: torch.device = CPU
) -> torch.Tensor:
    """A random (B, C, H, W) leaf tensor in the given memory layout."""
    batch, channels, height, width = shape
    if layout == "strided":  # every other row of a transposed tensor: no layout at all
        base = torch.randn(batch, channels, width, 2 * height, dtype=dtype, device=device)
        input = base.transpose(2, 3)[:, :, ::2]
    else:
        memory_format = (
            torch.channels_last if layout == "channels_last" else torch.contiguous_format
        )
        input = torch.randn(shape, dtype=dtype, device=device)
        input = input.contiguous(memory_format=memory_format)
    return input.requires_grad_()


def make_weight(
    shape: tuple[int, ...], dtype: torch.dtype, layout: str, device: torch.device = CPU
) -> torch.Tensor:
    """A random (B, G, Kh, Kw, H_out, W_out) leaf tensor, non-contiguous for ``"strided"``."""
    if layout == "strided":  # the kernel dimensions last in memory, as a (B, G*K*K, H, W) view
        batch, groups, kernel_h, kernel_w, out_h, out_w = shape
        base = torch.randn(
            batch, out_h, out_w, groups, kernel_h, kernel_w, dtype=dtype, device=device
        )
        return base.permute(0, 3, 4, 5, 1, 2).requires_grad_()
    return torch.randn(shape, dtype=dtype, device=device, requires_grad=True)


def output_hw(spatial, kernel, stride, padding, dilation) -> tuple[int, int]:
    """(H_out, W_out); ``padding=None`` is the front door's default ``d*(K-1)//2``."""
    if padding is None:
        padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
    return tuple(
        output_size(*args) for args in zip(spatial, kernel, stride, padding, dilation, strict=True)
    )


def run(input, weight, grad_output, backend, **conv_args):
    """(output, grad_input, grad_weight) of one backend."""
    output = involution2d(input, weight, backend=backend, **conv_args)
    grad_input, grad_weight = torch.autograd.grad(output, (input, weight), grad_output)
    return output, grad_input, grad_weight


@st.composite
def problems(draw, tiny: bool = False):
    """Random small problems: every kernel shape, stride, padding and dilation combination.

    ``tiny`` keeps channels and sizes smaller, for backends that run in an interpreter.
    """
    kernel = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    # None ("same"-style) is only symmetric for odd kernels; even kernels get explicit padding.
    odd = kernel[0] % 2 == 1 and kernel[1] % 2 == 1
    padding = None
    if not odd or draw(st.booleans()):
        padding = (draw(st.integers(0, 4)), draw(st.integers(0, 4)))
    pad = padding or tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
    # The smallest size with one output pixel, plus a few more (odd and even sizes).
    spatial = tuple(
        max(1, d * (k - 1) + 1 - 2 * p) + draw(st.integers(0, 2 if tiny else 6))
        for k, d, p in zip(kernel, dilation, pad, strict=True)
    )
    groups = draw(st.integers(1, 3))
    # 16 is RedNet's group width, which the cpu kernels specialise.
    group_channels = draw(st.sampled_from((1, 2) if tiny else (1, 2, 3, 16)))
    return {
        "batch": draw(st.integers(1, 2 if tiny else 3)),
        "channels": groups * group_channels,
        "groups": groups,
        "spatial": spatial,
        "kernel": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "dtype": draw(st.sampled_from(DTYPES)),
        "layout": draw(st.sampled_from(LAYOUTS)),
    }


def check_against_reference(backend: str, problem: dict) -> None:
    dtype, layout = problem["dtype"], problem["layout"]
    out_size = output_hw(
        problem["spatial"],
        problem["kernel"],
        problem["stride"],
        problem["padding"],
        problem["dilation"],
    )
    batch, channels, device = problem["batch"], problem["channels"], DEVICE_OF[backend]
    input = make_input((batch, channels, *problem["spatial"]), dtype, layout, device)
    weight = make_weight(
        (batch, problem["groups"], *problem["kernel"], *out_size), dtype, layout, device
    )
    grad_output = torch.randn(batch, channels, *out_size, dtype=dtype, device=device)
    conv_args = {k: problem[k] for k in ("stride", "padding", "dilation")}

    expected = run(input, weight, grad_output, "reference", **conv_args)
    actual = run(input, weight, grad_output, backend, **conv_args)
    rtol, atol = TOLERANCES[dtype]
    for name, got, want in zip(
        ("output", "grad_input", "grad_weight"), actual, expected, strict=True
    ):
        assert got.dtype == dtype and got.shape == want.shape, name
        torch.testing.assert_close(
            got, want, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


@needs_cpu
@settings(max_examples=150, deadline=None, derandomize=True)
@given(problem=problems())
def test_cpu_matches_reference(problem):
    check_against_reference("cpu", problem)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpu"])
@settings(max_examples=6 if OTHER_INTERPRETED else 60, deadline=None, derandomize=True)
@given(problem=problems(tiny=OTHER_INTERPRETED))
def test_other_backends_match_reference(backend, problem):
    check_against_reference(backend, problem)


#: Output widths that cover every register block of the 16-channel cpu kernels: the forward's
#: near-equal blocks of up to 8 columns and grad_weight's blocks of 16, 8, 4, 2 and 1.
WIDE_ROW_WIDTHS = (1, 3, 7, 8, 9, 15, 16, 17, 23, 33)


@needs_cpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize(("stride", "dilation"), [(1, 1), (2, 1), (1, 2), (3, 2)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_sixteen_channel_rows_match_reference(dtype, stride, dilation, layout):
    kernel, padding = (3, 7), (1, 3 * dilation)
    for out_w in WIDE_ROW_WIDTHS:
        width = (out_w - 1) * stride + dilation * (kernel[1] - 1) + 1 - 2 * padding[1]
        width = max(width, 1)
        problem = {
            "batch": 2,
            "channels": 32,
            "groups": 2,
            "spatial": (3, width),
            "kernel": kernel,
            "stride": (1, stride),
            "padding": padding,
            "dilation": (1, dilation),
            "dtype": dtype,
            "layout": layout,
        }
        check_against_reference("cpu", problem)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_path_matches_custom_op(backend):
    # Plain eager calls skip torch.library's dispatch (registration.EagerInvolution2d); the custom
    # op must give the same output and gradients.
    device = DEVICE_OF[backend]
    input = torch.randn(2, 32, 7, 9, device=device, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 2, 3, 3, 4, 5, device=device, dtype=torch.float64, requires_grad=True)
    grad_output = torch.randn(2, 32, 4, 5, device=device, dtype=torch.float64)
    args = ((2, 2), (1, 1), (1, 1), backend)
    assert registration.use_eager_path(input, weight)
    results = []
    for function in (registration.EagerInvolution2d.apply, torch.ops.involution.involution2d):
        output = function(input, weight, *args)
        results.append((output, *torch.autograd.grad(output, (input, weight), grad_output)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_eager_path_is_not_taken_where_ops_must_be_seen():
    input, weight = torch.randn(1, 4, 5, 5), torch.randn(1, 2, 3, 3, 5, 5)
    assert registration.use_eager_path(input, weight)
    with FlopCounterMode(display=False):  # a dispatch mode: counts ops by their formulas
        assert not registration.use_eager_path(input, weight)
    assert not registration.use_eager_path(input.to("meta"), weight.to("meta"))
    assert not registration.use_eager_path(torch.nn.Parameter(input), weight)


#: (B, C, G, H, W, kernel, stride, padding, dilation) for gradcheck; None = default padding.
GRADCHECK_CASES = {
    "stride2": (2, 4, 2, 7, 6, (3, 3), (2, 2), None, (1, 1)),
    "dilation2": (1, 4, 1, 7, 7, (3, 3), (1, 1), None, (2, 2)),
    "odd_sizes_rect": (1, 6, 3, 5, 7, (3, 1), (1, 2), None, (1, 3)),
    "even_kernel_padding": (1, 4, 2, 6, 5, (2, 4), (1, 1), (1, 2), (1, 1)),
    "sixteen_channel_groups": (1, 16, 1, 3, 4, (3, 3), (1, 1), None, (1, 1)),
}


@pytest.mark.parametrize("weight_layout", ("contiguous", "strided"))
@pytest.mark.parametrize("case", GRADCHECK_CASES.values(), ids=GRADCHECK_CASES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend, case, weight_layout):
    batch, channels, groups, height, width, kernel, stride, padding, dilation = case
    out_size = output_hw((height, width), kernel, stride, padding, dilation)
    device = DEVICE_OF[backend]
    options = {"dtype": torch.float64, "device": device, "requires_grad": True}
    input = torch.randn(batch, channels, height, width, **options)
    weight_shape = (batch, groups, *kernel, *out_size)
    weight = make_weight(weight_shape, torch.float64, weight_layout, device)

    def function(x, w):
        return involution2d(x, w, stride, padding, dilation, backend=backend)

    assert torch.autograd.gradcheck(function, (input, weight), fast_mode=interpreted(backend))


@pytest.mark.parametrize("weight_layout", ("contiguous", "strided"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, weight_layout):
    # Also checks that the fake implementations give the real outputs' strides.
    device = DEVICE_OF[backend]
    input = torch.randn(2, 4, 6, 5, device=device, requires_grad=True)
    weight = make_weight((2, 2, 3, 3, 3, 3), torch.float32, weight_layout, device)
    args = (input, weight, (2, 2), (1, 1), (1, 1), backend)
    torch.library.opcheck(torch.ops.involution.involution2d.default, args)
    grad_output = torch.randn(2, 4, 3, 3, device=device)
    for op in (
        torch.ops.involution.involution2d_backward_input.default,
        torch.ops.involution.involution2d_backward_weight.default,
        torch.ops.involution.involution2d_backward.default,
    ):
        torch.library.opcheck(op, (grad_output, input.detach(), weight.detach(), *args[2:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_forward_backward_matches_eager(backend):
    # aot_eager traces exactly what inductor would (Dynamo without graph breaks, fake tensors,
    # AOT autograd through the custom op and its backward ops) without compiling C++ for seconds.
    torch._dynamo.reset()
    device = DEVICE_OF[backend]
    input = torch.randn(2, 8, 7, 6, device=device, requires_grad=True)
    weight = torch.randn(2, 2, 3, 3, 4, 3, device=device, requires_grad=True)

    def loss(x, w):
        return involution2d(x, w, stride=2, dilation=(1, 2), padding=(1, 2), backend=backend)

    def step(function):
        output = function(input, weight)
        grads = torch.autograd.grad(output.square().sum(), (input, weight))
        return output, *grads

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for got, want in zip(step(compiled), step(loss), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_upstream_gradient(backend, layout):
    # ``.sum()`` hands the backward an expanded (stride-0) gradient.
    input = make_input((2, 32, 6, 5), torch.float32, layout, DEVICE_OF[backend])
    weight = make_weight((2, 2, 3, 3, 6, 5), torch.float32, layout, DEVICE_OF[backend])
    grads = [
        torch.autograd.grad(involution2d(input, weight, backend=name).sum(), (input, weight))
        for name in (backend, "reference")
    ]
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weight_layout", ("contiguous", "strided"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_gradient_comes_in_the_kernels_layout(backend, weight_layout):
    # In eager mode the span conv's channels_last output viewed as kernels ("strided":
    # pixel-major) gets its gradient in that layout, so its backward needs no layout copy; other
    # kernels, contiguous. The custom ops (torch.compile) always give contiguous gradients.
    device = DEVICE_OF[backend]
    input = make_input((2, 32, 6, 5), torch.float32, "channels_last", device)
    weight = make_weight((2, 2, 3, 3, 6, 5), torch.float32, weight_layout, device)
    grad_output = torch.randn(2, 32, 6, 5, device=device)
    args = ((1, 1), (1, 1), (1, 1), backend)
    output = registration.EagerInvolution2d.apply(input, weight, *args)
    (grad_weight,) = torch.autograd.grad(output, weight, grad_output)
    assert grad_weight.stride() == weight.stride()
    output = torch.ops.involution.involution2d(input, weight, *args)
    (grad_weight,) = torch.autograd.grad(output, weight, grad_output)
    assert grad_weight.is_contiguous()
    assert is_pixel_major(weight) == (weight_layout == "strided")
    assert kernels_like(weight.detach().contiguous(), weight).stride() == weight.stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    input = torch.randn(0, 4, 5, 5, device=DEVICE_OF[backend], requires_grad=True)
    weight = torch.randn(0, 2, 3, 3, 5, 5, device=DEVICE_OF[backend], requires_grad=True)
    output = involution2d(input, weight, backend=backend)
    assert output.shape == (0, 4, 5, 5)
    grad_input, grad_weight = torch.autograd.grad(output.sum(), (input, weight))
    assert grad_input.shape == input.shape and grad_weight.shape == weight.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_in_channels_last_out(backend):
    input = make_input((2, 8, 6, 7), torch.float32, "channels_last", DEVICE_OF[backend])
    weight = make_weight((2, 2, 3, 3, 6, 7), torch.float32, "contiguous", DEVICE_OF[backend])
    output = involution2d(input, weight, backend=backend)
    grad_input, _ = torch.autograd.grad(output, (input, weight), torch.randn_like(output))
    assert output.is_contiguous(memory_format=torch.channels_last)
    assert grad_input.is_contiguous(memory_format=torch.channels_last)
    plain = involution2d(input.detach().contiguous(), weight, backend=backend)
    assert plain.is_contiguous()
    torch.testing.assert_close(output, plain)


def test_auto_picks_cpu_backend_on_cpu():
    expected = "cpu" if "cpu" in BACKENDS else "reference"
    assert backends.resolve_backend("auto", CPU) == expected


@pytest.mark.skipif(GPU is None, reason="needs a CUDA GPU")
def test_auto_picks_triton_on_cuda():
    assert backends.resolve_backend("auto", GPU) == "triton"


@needs_cpu
def test_cpu_backend_is_deterministic():
    input = make_input((2, 32, 12, 11), torch.float32, "contiguous")
    weight = make_weight((2, 2, 5, 5, 12, 11), torch.float32, "contiguous")
    grad_output = torch.randn(2, 32, 12, 11)
    first = run(input, weight, grad_output, "cpu")
    second = run(input, weight, grad_output, "cpu")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# The front door's argument checks: each error names the offending values.


def _valid_args():
    return torch.randn(2, 4, 6, 6), torch.randn(2, 2, 3, 3, 6, 6)


def test_front_door_wrong_rank():
    input, weight = _valid_args()
    with pytest.raises(ValueError, match=r"input must be 4-D .*\(4, 6, 6\)"):
        involution2d(input[0], weight)
    with pytest.raises(ValueError, match=r"weight must be 6-D .*\(2, 18, 6, 6\)"):
        involution2d(input, weight.flatten(1, 3))


@pytest.mark.parametrize(
    ("weight_shape", "message"),
    [
        ((2, 3, 3, 3, 6, 6), "G=3 must divide input channels C=4"),
        ((2, 2, 3, 3, 5, 6), r"weight spatial size \(5, 6\) does not match .*\(6, 6\)"),
        ((3, 2, 3, 3, 6, 6), "weight batch 3 does not match input batch 2"),
    ],
    ids=["groups_must_divide_channels", "weight_spatial_mismatch", "batch_mismatch"],
)
def test_front_door_weight_shape_mismatch(weight_shape, message):
    input, _ = _valid_args()
    with pytest.raises(ValueError, match=message):
        involution2d(input, torch.randn(*weight_shape))


def test_front_door_dtype_mismatch():
    input, weight = _valid_args()
    with pytest.raises(TypeError, match=r"torch\.float32 but weight is torch\.float64"):
        involution2d(input, weight.double())
    with pytest.raises(TypeError, match=r"torch\.int64"):
        involution2d(input.long(), weight.long())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stride": 0}, r"stride must be positive, got \(0, 0\)"),
        ({"stride": (1, -2)}, r"stride must be positive, got \(1, -2\)"),
        ({"dilation": (0, 1)}, r"dilation must be positive, got \(0, 1\)"),
        ({"padding": (-1, 1)}, r"padding must be non-negative, got \(-1, 1\)"),
    ],
)
def test_front_door_bad_conv_args(kwargs, message):
    input, weight = _valid_args()
    with pytest.raises(ValueError, match=message):
        involution2d(input, weight, **kwargs)


def test_front_door_bad_arg_types():
    input, weight = _valid_args()
    with pytest.raises(TypeError, match=r"stride must be an int or a pair of ints, got 1\.5"):
        involution2d(input, weight, stride=1.5)
    with pytest.raises(TypeError, match="input and weight must be tensors, got list"):
        involution2d([1.0], weight)


def test_front_door_unknown_backend():
    input, weight = _valid_args()
    with pytest.raises(ValueError, match="unknown involution backend 'gpu'"):
        involution2d(input, weight, backend="gpu")


def test_front_doors_on_meta_tensors():
    """Both front doors share the checks, which skip autocast on meta tensors (shape-only runs)."""
    input, weight = (t.to("meta") for t in _valid_args())
    assert involution2d(input, weight).shape == (2, 4, 6, 6)
    reduced, span_weight = torch.empty(2, 3, 6, 6, device="meta"), torch.empty(18, 3, device="meta")
    output = involution2d_fused(input, reduced, span_weight, None, 3, 2)
    assert output.device.type == "meta" and output.shape == (2, 4, 6, 6)


def test_front_door_cpu_backend_on_meta_tensor():
    input, weight = (t.to("meta") for t in _valid_args())
    with pytest.raises(RuntimeError, match="backend 'cpu' is unavailable on meta"):
        involution2d(input, weight, backend="cpu")


def test_ops_import_without_timm():
    """The op needs only PyTorch: with timm blocked, ``involution.ops`` imports and runs."""
    code = (
        "import sys\n"
        "sys.modules['timm'] = None\n"
        "import torch\n"
        "from involution.ops import Involution2d, involution2d, involution2d_fused\n"
        "from involution import functional\n"
        "assert functional.involution2d is involution2d\n"
        "assert 'involution.models' not in sys.modules\n"
        "x = torch.randn(1, 8, 5, 5, requires_grad=True)\n"
        "Involution2d(8, 3, group_channels=4)(x).sum().backward()\n"
        "assert x.grad.shape == (1, 8, 5, 5)\n"
        "y = involution2d(x, torch.randn(1, 2, 3, 3, 5, 5))\n"
        "z = involution2d_fused(x, torch.randn(1, 2, 5, 5), torch.randn(18, 2), None, 3, 2)\n"
        "assert y.shape == z.shape == (1, 8, 5, 5)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_front_door_cpu_backend_not_built(monkeypatch):
    monkeypatch.setattr(cpu_backend, "_C", None)
    monkeypatch.setattr(cpu_backend, "_IMPORT_ERROR", "No module named 'involution._C'")
    input, weight = _valid_args()
    with pytest.raises(RuntimeError, match=r"backend 'cpu' is unavailable on cpu: .*not built"):
        involution2d(input, weight, backend="cpu")
    # "auto" falls back to the reference instead of failing.
    torch.testing.assert_close(
        involution2d(input, weight), involution2d(input, weight, backend="reference")
    )


@needs_cpu
def test_cpu_extension_checks_shapes():
    """Direct calls into the extension cannot read out of bounds."""
    extension = importlib.import_module("involution._C")
    input, weight = _valid_args()
    with pytest.raises(RuntimeError, match="does not match input"):
        extension.forward(input, weight[..., :5], (1, 1), (1, 1), (1, 1))
    with pytest.raises(RuntimeError, match="grad_output"):
        extension.backward_input(input[:, :, :5], input, weight, (1, 1), (1, 1), (1, 1))


# ``involution bench op``.


def test_bench_op_peak_bytes_counts_temporaries():
    def two_temporaries():
        first = torch.ones(2**18)  # 1 MiB
        second = first * 2  # another MiB while the first is alive
        return second.sum()

    assert op_bench.peak_bytes(two_temporaries, CPU) >= 2 * 2**20
    assert op_bench.peak_bytes(lambda: None, CPU) == 0


def test_bench_op_runs_and_prints_a_table(tmp_path, capsys):
    path = tmp_path / "op.json"
    argv = ["bench", "op", "--shapes", "tiny", "--batch", "2", "--repeats", "1", "--warmup", "0"]
    assert cli.main([*argv, "--json", str(path)]) == 0
    table = capsys.readouterr().out
    methods = [*op_bench.default_backends(CPU), op_bench.DEPTHWISE, op_bench.DENSE]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "method" not in line]
    passes = len(op_bench.PASSES)
    assert len(rows) == len(op_bench.SHAPE_SETS["tiny"]) * len(methods) * passes
    for method in methods:
        assert f"| {method} |" in table
    results = json.loads(path.read_text())["results"]
    assert len(results) == len(rows)
    assert all(r["median_ms"] > 0 and r["peak_bytes"] > 0 for r in results)


def test_cli_help_imports_neither_the_ops_nor_the_compiler():
    """``involution --help`` builds every command's parser without importing the op
    registration or torch._dynamo (slow imports: the help stays within about import torch)."""
    code = (
        "import sys\n"
        "from involution.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "slow = {'involution.ops.registration', 'torch._dynamo'} & set(sys.modules)\n"
        "assert not slow, slow\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
