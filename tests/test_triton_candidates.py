"""Every Triton variant ("gather", "tiled", "inductor") against the reference, and the winner table.

On a machine with CUDA these run on the GPU (``involution bench gpu`` runs this file there
first); otherwise on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``conftest.py``), where the ``"inductor"`` variant runs its PyTorch passes eagerly. The shapes
are tiny but cover what the kernels special-case: odd sizes, stride 2, dilation 2, several
groups per program, groups wider than a program's channel block (16 channels, RedNet's width)
and narrower non-power-of-two ones (3 channels), NCHW and channels_last features, contiguous
and pixel-major kernels (the channels_last span conv's output layout).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from involution import Involution2d, involution2d
from involution.ops import involution2d_fused
from involution.ops.backends import inductor
from involution.ops.backends import triton as triton_backend
from involution.ops.backends.triton import winners
from involution.ops.checks import output_size

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.skipif(
    triton_backend.unavailable_reason(DEVICE) is not None,
    reason=f"triton backend unavailable: {triton_backend.unavailable_reason(DEVICE)}",
)

#: (rtol, atol) against the reference run on the same inputs; both accumulate in float32, in
#: different orders, and half results may differ by one rounding of the output.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 2e-2)}

#: (B, C, G, H, W, K, stride, dilation): C/G = 4, 4, 3 and 16 channels per group.
CASES = {
    "odd_sizes": (2, 12, 3, 5, 7, 3, 1, 1),
    "stride2": (1, 8, 2, 9, 8, 3, 2, 1),
    "dilation2": (1, 6, 2, 9, 7, 3, 1, 2),
    "wide_groups": (1, 32, 2, 6, 5, 3, 1, 1),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: (case, dtype, layout): every dtype and layout on odd sizes, two mixes for the other cases.
MATRIX = [("odd_sizes", dtype, layout) for dtype in DTYPES for layout in ("nchw", "channels_last")]
MATRIX += [
    (case, dtype, layout)
    for case in ("stride2", "dilation2", "wide_groups")
    for dtype, layout in (("fp32", "channels_last"), ("bf16", "nchw"))
]


def _inputs(case: str, dtype: torch.dtype, channels_last: bool):
    """x (B, C, H, W), kernels (B, G, K, K, Ho, Wo), grad_output and the conv arguments.

    channels_last: x in channels_last and the kernels as the pixel-major view a channels_last
    span conv produces, both read in place by the tiled kernels.
    """
    batch, channels, groups, height, width, kernel, stride, dilation = CASES[case]
    padding = dilation * (kernel - 1) // 2
    out_h, out_w = (output_size(n, kernel, stride, padding, dilation) for n in (height, width))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, height, width, generator=generator)
    kernels = torch.randn(batch, out_h, out_w, groups, kernel, kernel, generator=generator) / 2
    grad = torch.randn(batch, channels, out_h, out_w, generator=generator)
    x, kernels, grad = (t.to(DEVICE, dtype) for t in (x, kernels, grad))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        kernels = kernels.permute(0, 3, 4, 5, 1, 2)
    else:
        kernels = kernels.permute(0, 3, 4, 5, 1, 2).contiguous()
    conv = {"stride": stride, "padding": padding, "dilation": dilation}
    return x, kernels, grad, conv


def _run(backend: str, x, kernels, grad, conv):
    """(output, grad_input, grad_weight) through the front door and autograd."""
    x = x.detach().requires_grad_()
    kernels = kernels.detach().requires_grad_()
    out = involution2d(x, kernels, backend=backend, **conv)
    grad_x, grad_w = torch.autograd.grad(out, (x, kernels), grad)
    return out, grad_x, grad_w


def check_variant(variant: str, case: str, dtype: str, layout: str) -> None:
    """Output and both gradients of ``variant`` through the front door vs the reference."""
    channels_last = layout == "channels_last"
    x, kernels, grad, conv = _inputs(case, DTYPES[dtype], channels_last)
    with triton_backend.use_variant(variant):
        results = _run("triton", x, kernels, grad, conv)
    expected = _run("reference", x, kernels, grad, conv)
    rtol, atol = TOLERANCES[DTYPES[dtype]]
    names = ("output", "grad_input", "grad_weight")
    for name, actual, wanted in zip(names, results, expected, strict=True):
        assert actual.dtype == wanted.dtype and actual.shape == wanted.shape, name
        torch.testing.assert_close(actual, wanted, rtol=rtol, atol=atol, msg=name)
    out, grad_x = results[:2]
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert grad_x.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize(("case", "dtype", "layout"), MATRIX)
@pytest.mark.parametrize("variant", ["gather", "tiled"])
def test_variant_matches_reference(variant, case, dtype, layout):
    check_variant(variant, case, dtype, layout)


def test_tiled_is_deterministic():
    x, kernels, grad, conv = _inputs("stride2", torch.float32, True)
    with triton_backend.use_variant("tiled"):
        first = _run("triton", x, kernels, grad, conv)
        second = _run("triton", x, kernels, grad, conv)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_grad_input_skips_unread_pixels():
    # Stride 3 with a 1x1 kernel reads one input pixel in nine: the others get zero gradient.
    x = torch.randn(1, 4, 7, 7, device=DEVICE, requires_grad=True)
    weight = torch.randn(1, 2, 1, 1, 3, 3, device=DEVICE)
    with triton_backend.use_variant("tiled"):
        involution2d(x, weight, stride=3, backend="triton").sum().backward()
    expected = torch.zeros(1, 4, 7, 7, device=DEVICE)
    expected[..., ::3, ::3] = weight.repeat_interleave(2, dim=1).flatten(1, 3).view(1, 4, 3, 3)
    torch.testing.assert_close(x.grad, expected)


# --- The fused forward ------------------------------------------------------------------------

#: (C, G, R, stride, dtype, channels_last, bias): 4 and 16 channels per group.
FUSED_CASES = [
    (8, 2, 5, 1, torch.float32, False, True),
    (8, 2, 5, 2, torch.float32, True, False),
    (32, 2, 20, 1, torch.bfloat16, True, True),
    (12, 3, 6, 2, torch.bfloat16, False, True),
    (8, 2, 5, 1, torch.float16, True, True),
]


@pytest.mark.parametrize("variant", ["gather", "tiled"])
@pytest.mark.parametrize(
    ("channels", "groups", "reduced", "stride", "dtype", "channels_last", "bias"), FUSED_CASES
)
def test_fused_matches_reference(
    variant, channels, groups, reduced, stride, dtype, channels_last, bias
):
    generator = torch.Generator().manual_seed(1)
    height, width, kernel = 7, 6, 3
    out_h, out_w = (output_size(n, kernel, stride, 1, 1) for n in (height, width))
    tensors = [
        torch.randn(2, channels, height, width, generator=generator),
        torch.randn(2, reduced, out_h, out_w, generator=generator),
        torch.randn(groups * kernel * kernel, reduced, generator=generator) / 2,
        torch.randn(groups * kernel * kernel, generator=generator) if bias else None,
        torch.randn(2, channels, out_h, out_w, generator=generator),
    ]
    tensors = [None if t is None else t.to(DEVICE, dtype) for t in tensors]
    if channels_last:
        tensors[0] = tensors[0].contiguous(memory_format=torch.channels_last)
        tensors[1] = tensors[1].contiguous(memory_format=torch.channels_last)

    def run(backend: str):
        *leaves, grad = (None if t is None else t.detach().requires_grad_() for t in tensors)
        out = involution2d_fused(*leaves, kernel, groups, stride=stride, backend=backend)
        out.backward(grad)
        return [out, *(leaf.grad for leaf in leaves if leaf is not None)]

    with triton_backend.use_variant(variant):
        results = run("triton")
    expected = run("reference")
    rtol, atol = TOLERANCES.get(dtype, (2e-3, 2e-3))
    for actual, wanted in zip(results, expected, strict=True):
        # Both sides round the generated kernels to the dtype, from differently ordered float32
        # sums: in half precision a kernel value may differ by one rounding, an error relative
        # to the terms of a sum rather than to the (possibly cancelling) result.
        bound = atol if dtype == torch.float32 else rtol
        scale = wanted.abs().max().item()
        torch.testing.assert_close(actual, wanted, rtol=rtol, atol=bound * scale)


def test_fused_tiled_supported_shapes():
    from involution.ops.backends.triton import tiled

    assert tiled.fused_supported(torch.bfloat16, 64, 4, 16)  # RedNet-50's first stage
    assert not tiled.fused_supported(torch.float64, 64, 4, 16)  # no matrix-product path
    assert not tiled.fused_supported(torch.float32, 64, 4, tiled.FUSED_MAX_REDUCED + 1)


def test_fused_module_runs_tiled_kernel(monkeypatch):
    from involution.ops.backends.triton import tiled

    calls = []
    real = tiled.fused_forward
    monkeypatch.setattr(tiled, "fused_forward", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    fused = Involution2d(16, 3, group_channels=4, reduction_ratio=2, backend="triton", fused=True)
    fused = fused.to(DEVICE)
    x = torch.randn(1, 16, 6, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with triton_backend.use_variant("tiled"):
        out = fused(x)
    fused.fused = False
    torch.testing.assert_close(out, fused(x), rtol=1e-4, atol=1e-4)
    assert calls == [1]


# --- Choosing the variant ---------------------------------------------------------------------


def _key(x: torch.Tensor) -> str:
    return winners.shape_key(x, (1, 2, 3, 3, 7, 9), (1, 1), (1, 1), (1, 1))


def test_variant_comes_from_the_winner_table(tmp_path, monkeypatch):
    x = torch.zeros(1, 8, 7, 9, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert _key(x) == "bfloat16/channels_last/C8/G2/7x9/K3x3/s1x1/p1x1/d1x1"
    table = tmp_path / "winners.json"
    winners.write_table(
        table, {_key(x): {"forward": "tiled", "backward": "inductor"}}, "test", "test"
    )
    monkeypatch.setenv(winners.WINNERS_ENV, str(table))
    monkeypatch.delenv(triton_backend.VARIANT_ENV, raising=False)
    args = (x, (1, 2, 3, 3, 7, 9), (1, 1), (1, 1), (1, 1))
    assert triton_backend.choose_variant("forward", *args) == "tiled"
    assert triton_backend.choose_variant("backward", *args) == "inductor"
    assert triton_backend.choose_variant("fused", *args) == winners.DEFAULT_VARIANT  # unlisted
    other = x.contiguous()  # NCHW: another key, not listed
    assert triton_backend.choose_variant("forward", other, *args[1:]) == winners.DEFAULT_VARIANT
    # The environment and use_variant take precedence over the table, innermost first.
    monkeypatch.setenv(triton_backend.VARIANT_ENV, "inductor")
    assert triton_backend.choose_variant("forward", *args) == "inductor"
    with triton_backend.use_variant("gather"):
        assert triton_backend.choose_variant("forward", *args) == "gather"
    monkeypatch.setenv(triton_backend.VARIANT_ENV, "fastest")
    with pytest.raises(ValueError, match="INVOLUTION_TRITON_VARIANT"):
        triton_backend.choose_variant("forward", *args)


def test_missing_table_means_default(tmp_path, monkeypatch):
    monkeypatch.setenv(winners.WINNERS_ENV, str(tmp_path / "absent.json"))
    assert winners.load_table() == {}
    assert winners.lookup("forward", "float32/nchw/C8/G2/7x9/K3x3/s1x1/p1x1/d1x1") == "gather"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": 2, "winners": {}}', "not an involution winner table"),
        ('{"format": 1, "winners": {"k": {"forward": "fastest"}}}', "'fastest'"),
        ('{"format": 1, "winners": {"k": {"fused": "inductor"}}}', "'fused'"),
        ('{"format": 1, "winners": {"k": "tiled"}}', "entry 'k'"),
    ],
)
def test_bad_table_names_the_file(tmp_path, content, message):
    table = tmp_path / "bad.json"
    table.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        winners.load_table(table)
    assert str(table) in str(error.value)


def test_table_is_reread_when_rewritten(tmp_path):
    table = tmp_path / "winners.json"
    winners.write_table(table, {"k": {"forward": "tiled"}}, "test", "test")
    assert winners.lookup("forward", "k", table) == "tiled"
    winners.write_table(table, {"k": {"forward": "inductor"}}, "test", "test")
    os.utime(table, ns=(0, table.stat().st_mtime_ns + 1))  # a new mtime on coarse clocks
    assert winners.lookup("forward", "k", table) == "inductor"
    assert json.loads(table.read_text())["format"] == winners.FORMAT


def test_front_door_uses_the_table(tmp_path, monkeypatch):
    from involution.ops.backends.triton import tiled

    x, kernels, _, conv = _inputs("odd_sizes", torch.float32, True)
    key = winners.shape_key(x, tuple(kernels.shape), (1, 1), (conv["padding"],) * 2, (1, 1))
    table = tmp_path / "winners.json"
    winners.write_table(table, {key: {"forward": "tiled"}}, "test", "test")
    monkeypatch.setenv(winners.WINNERS_ENV, str(table))
    monkeypatch.delenv(triton_backend.VARIANT_ENV, raising=False)
    calls = []
    real = tiled.forward
    monkeypatch.setattr(tiled, "forward", lambda *a: calls.append(1) or real(*a))
    involution2d(x, kernels, backend="triton", **conv)
    assert calls == [1]


def test_inductor_backend_is_for_cuda():
    assert "CUDA" in inductor.unavailable_reason(torch.device("cpu"))


# Compiles the tiled kernels for sm_90 as a launch on channels_last bf16 tensors would (unit
# channel strides, 16-byte aligned pointers and strides) and checks with ptxas that they use 16-
# byte vector loads and spill no registers. Needs no GPU; runs in a fresh process because with
# TRITON_INTERPRET=1 (this process) Triton's code generator dispatches to the interpreter.
_COMPILE_FOR_HOPPER = """
import os, subprocess, tempfile
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from involution.ops.backends.triton import tiled_kernels

# Strides equal to 1 on channels_last features and pixel-major kernels (Triton specialises
# them): (tuple argument, index) - the channel stride of a (B, C, H, W) feature map's (b, c, h,
# w) strides, the kw or w stride of the kernels' (b, g, kh, kw, h, w) strides.
AGGREGATE = (("ss", 1), ("sd", 1), ("sw", 3))
FUSED = {"R_PAD": 128, "HAS_BIAS": True, "IEEE_DOT": False, "DOT_IN_FP32": False}
ACC = {"ACC_DTYPE": tl.float32}
KERNELS = (  # (kernel, its constexprs, its unit strides)
    ("aggregate_kernel", {**ACC, "ADJOINT": False}, AGGREGATE),
    ("aggregate_kernel", {**ACC, "ADJOINT": True}, AGGREGATE),
    ("backward_weight_kernel", ACC, (("sg", 1), ("sx", 1), ("sw", 5))),
    ("fused_forward_kernel", FUSED, (("sx", 1), ("so", 1), ("sr", 1))),
)
FEATURE_STRIDES = ("sx", "so", "sg", "sr", "ss", "sd")
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
for name, extra, units in KERNELS:
    kernel = getattr(tiled_kernels, name)
    function, config = kernel.fn, kernel.configs[0]
    names = function.arg_names
    constexprs = {"KH": 7, "KW": 7, "CGP": 16, **extra, **config.kwargs}
    unit_paths = {(names.index(arg), i): 1 for arg, i in units}

    def arg_type(position, arg):
        if arg in constexprs:
            return "constexpr"
        if arg == "geometry":
            return (("i32", "i32"),) * 3
        if arg == "sw" or arg in FEATURE_STRIDES:
            size = 6 if arg == "sw" else 4
            return tuple("constexpr" if (position, i) in unit_paths else "i32" for i in range(size))
        return "*bf16" if arg.endswith("_ptr") else "i32"

    signature = {arg: arg_type(position, arg) for position, arg in enumerate(names)}
    # Pointers, C/G = 16 and feature-map strides (sx, so, ...) are multiples of 16 for RedNet's
    # shapes; the kernel tensor's strides (sw) involve K*K = 49 and are not.
    aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(names)
               if arg.endswith("_ptr") or arg == "CG"}
    aligned.update(
        {(i, j): [["tt.divisibility", 16]] for i, arg in enumerate(names)
         if arg in FEATURE_STRIDES for j in range(4) if (i, j) not in unit_paths}
    )
    compiled = triton.compile(
        ASTSource(function, signature, constexprs={**constexprs, **unit_paths}, attrs=aligned),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as ptx:
        ptx.write(compiled.asm["ptx"])
    report = subprocess.run([ptxas, "-v", "-arch=sm_90a", ptx.name, "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
    assert "0 bytes spill stores" in report, (name, report)
    assert "ld.global.v4" in compiled.asm["ptx"], name
    print("compiled", name)
"""


def test_tiled_kernels_compile_for_hopper():
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton build has no NVIDIA backend")
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_HOPPER],
        env={**os.environ, "TRITON_INTERPRET": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled") == 4


# --- The inductor variant ------------------------------------------------------------------
# Last in the file: on a GPU each of these compiles with inductor (seconds each), and the
# benchmark's test step, which has a time limit, should verify the Triton kernels first.


@pytest.mark.parametrize(("case", "dtype", "layout"), MATRIX)
def test_inductor_variant_matches_reference(case, dtype, layout):
    check_variant("inductor", case, dtype, layout)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on CUDA the inductor tests above compile")
def test_inductor_passes_trace_without_graph_breaks():
    # On CPU the other tests run the inductor passes eagerly. Here Dynamo traces both gradients
    # (the taps view the forward shares, and the adjoint's pads) with dynamic sizes, as on a
    # GPU, into one graph (fullgraph=True), and aot_eager runs it. Inductor's own code
    # generation is exercised by the GPU run (C++ compilation on CPU takes about a minute).
    x, kernels, grad, conv = _inputs("stride2", torch.float32, True)
    geometry = {k: (v, v) for k, v in conv.items()}
    traced = inductor.call("backward", grad, x, kernels, **geometry, compiler="aot_eager")
    eager = inductor.call("backward", grad, x, kernels, **geometry)
    torch.testing.assert_close(traced, eager)
