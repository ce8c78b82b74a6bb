"""The Triton backend and the fused kernel-generation op against the reference implementation.

On a machine with CUDA these run on the GPU; otherwise on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``, set by ``conftest.py``), which is slow, hence the tiny shapes.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from involution import Involution2d, cli, involution2d
from involution.bench import bandwidth
from involution.bench.model import variants
from involution.bench.op import Measurement
from involution.bench.op import format_table as format_op_table
from involution.ops import involution2d_fused
from involution.ops.backends import triton as triton_backend
from involution.ops.checks import output_size

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

needs_triton = pytest.mark.skipif(
    triton_backend.unavailable_reason(DEVICE) is not None,
    reason=f"triton backend unavailable: {triton_backend.unavailable_reason(DEVICE)}",
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

#: (rtol, atol) of a Triton result against the reference run on the same inputs. Both
#: accumulate in float32 (float64); half results may differ by one rounding of the output.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 2e-2),
}

#: (B, C, G, H, W, kernel, stride, padding, dilation); padding None = "same"-style default.
OP_CASES = {
    "odd_sizes": (2, 8, 2, 9, 7, (3, 3), (1, 1), None, (1, 1)),
    "stride2": (1, 8, 2, 9, 8, (3, 3), (2, 2), None, (1, 1)),
    "dilation2": (1, 4, 1, 7, 9, (3, 3), (1, 1), None, (2, 2)),
    "even_rect_kernel": (1, 6, 3, 6, 5, (2, 4), (1, 2), (0, 1), (2, 1)),
}


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    rtol, atol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _op_inputs(case: str, dtype: torch.dtype, channels_last: bool = False):
    batch, channels, groups, height, width, kernel, stride, padding, dilation = OP_CASES[case]
    pad = padding or tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
    out = [
        output_size(n, k, s, p, d)
        for n, k, s, p, d in zip((height, width), kernel, stride, pad, dilation, strict=True)
    ]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, height, width, generator=generator)
    weight = torch.randn(batch, groups, *kernel, *out, generator=generator) / 2
    grad = torch.randn(batch, channels, *out, generator=generator)
    x, weight, grad = (t.to(DEVICE, dtype) for t in (x, weight, grad))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, weight, grad, {"stride": stride, "padding": padding, "dilation": dilation}


def _run_op(backend: str, x, weight, grad, conv):
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    out = involution2d(x, weight, backend=backend, **conv)
    out.backward(grad)
    return out, x.grad, weight.grad


@needs_triton
@pytest.mark.parametrize(
    ("case", "dtype", "channels_last"),
    [("odd_sizes", dtype, False) for dtype in DTYPES]
    + [(case, torch.float32, False) for case in ("stride2", "dilation2", "even_rect_kernel")]
    + [("stride2", torch.float32, True), ("even_rect_kernel", torch.float16, True)],
)
def test_op_matches_reference(case, dtype, channels_last):
    x, weight, grad, conv = _op_inputs(case, dtype, channels_last)
    out, grad_x, grad_w = _run_op("triton", x, weight, grad, conv)
    ref_out, ref_grad_x, ref_grad_w = _run_op("reference", x, weight, grad, conv)
    _close(out, ref_out)
    _close(grad_x, ref_grad_x)
    _close(grad_w, ref_grad_w)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert grad_x.is_contiguous(memory_format=torch.channels_last) == channels_last


@needs_triton
def test_grad_input_skips_unread_pixels():
    # Stride 3 with a 1x1 kernel reads one input pixel in nine: the others get zero gradient.
    x = torch.randn(1, 4, 7, 7, device=DEVICE, requires_grad=True)
    weight = torch.randn(1, 2, 1, 1, 3, 3, device=DEVICE)
    involution2d(x, weight, stride=3, backend="triton").sum().backward()
    expected = torch.zeros(1, 4, 7, 7, device=DEVICE)
    expected[..., ::3, ::3] = weight.repeat_interleave(2, dim=1).flatten(1, 3).view(1, 4, 3, 3)
    torch.testing.assert_close(x.grad, expected)


@needs_triton
def test_op_is_deterministic():
    x, weight, grad, conv = _op_inputs("stride2", torch.float32)
    first = _run_op("triton", x, weight, grad, conv)
    second = _run_op("triton", x, weight, grad, conv)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def _fused_inputs(dtype: torch.dtype, stride: int, kernel=(3, 3)):
    batch, channels, groups, reduced_channels, height, width = 2, 8, 2, 5, 7, 6
    out = [
        output_size(n, k, stride, (k - 1) // 2, 1)
        for n, k in zip((height, width), kernel, strict=True)
    ]
    generator = torch.Generator().manual_seed(1)
    tensors = (
        torch.randn(batch, channels, height, width, generator=generator),
        torch.randn(batch, reduced_channels, *out, generator=generator),
        torch.randn(groups * kernel[0] * kernel[1], reduced_channels, generator=generator) / 2,
        torch.randn(groups * kernel[0] * kernel[1], generator=generator),
        torch.randn(batch, channels, *out, generator=generator),
    )
    return [t.to(DEVICE, dtype) for t in tensors], groups


def _run_fused(backend: str, tensors, groups, kernel, stride):
    *leaves, grad = (t.detach().requires_grad_() for t in tensors)
    out = involution2d_fused(*leaves, kernel, groups, stride=stride, backend=backend)
    out.backward(grad)
    return [out, *(leaf.grad for leaf in leaves)]


@needs_triton
@pytest.mark.parametrize(
    ("dtype", "stride", "kernel"),
    [(dtype, 1, (3, 3)) for dtype in DTYPES]
    + [(torch.float32, 2, (3, 3)), (torch.float32, 1, (3, 2))],
)
def test_fused_op_matches_reference(dtype, stride, kernel):
    tensors, groups = _fused_inputs(dtype, stride, kernel)
    results = _run_fused("triton", tensors, groups, kernel, stride)
    expected = _run_fused("reference", tensors, groups, kernel, stride)
    rtol, atol = TOLERANCES[dtype]
    for name, actual, wanted in zip(
        ("out", "input", "reduced", "span_weight", "span_bias"), results, expected, strict=True
    ):
        # Both sides round the generated kernels to the dtype, but from differently ordered
        # float32 sums: in half precision a kernel value may differ by one rounding, an error
        # relative to the terms of a sum, not to the (possibly cancelling) result.
        bound = atol if dtype in (torch.float32, torch.float64) else rtol
        torch.testing.assert_close(
            actual, wanted, rtol=rtol, atol=bound * wanted.abs().max().item(), msg=name
        )


@needs_triton
def test_fused_op_without_bias_matches_explicit_kernels():
    (x, reduced, span_weight, _, _), groups = _fused_inputs(torch.float32, 1)
    out = involution2d_fused(x, reduced, span_weight, None, 3, groups, backend="triton")
    kernels = F.conv2d(reduced, span_weight[:, :, None, None]).view(2, groups, 3, 3, 7, 6)
    _close(out, involution2d(x, kernels, backend="reference"))


@needs_triton
def test_fused_op_is_deterministic():
    tensors, groups = _fused_inputs(torch.float32, 1)
    first = _run_fused("triton", tensors, groups, (3, 3), 1)
    second = _run_fused("triton", tensors, groups, (3, 3), 1)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.parametrize(("stride", "channels_last"), [(1, False), (2, True)])
def test_fused_module_matches_unfused(stride, channels_last, monkeypatch):
    # Full float32 in the unfused span conv: cuDNN may otherwise pick TF32 kernels on a GPU,
    # while the fused kernel computes its products in full float32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    fused = Involution2d(
        8, 3, stride, group_channels=4, reduction_ratio=2, backend="triton", fused=True
    )
    fused = fused.to(DEVICE)
    unfused = copy.deepcopy(fused)
    unfused.fused = False
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    x = torch.randn(2, 8, 9, 7, device=DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    results = []
    for module in (fused, unfused):
        leaf = x.clone().requires_grad_()
        out = module(leaf)
        out.backward(torch.cos(out.detach()))
        results.append((out, leaf.grad, [p.grad for p in module.parameters()]))
    (out, grad_x, grads), (ref_out, ref_grad_x, ref_grads) = results
    _close(out, ref_out)
    _close(grad_x, ref_grad_x)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4)


@needs_triton
def test_fused_module_compiles_without_graph_breaks():
    module = Involution2d(8, 3, group_channels=4, backend="triton", fused=True).to(DEVICE)
    x = torch.randn(1, 8, 5, 6, device=DEVICE, requires_grad=True)
    # aot_eager traces forward and backward like inductor does, without generating C++/PTX.
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, module(x))


@needs_triton
def test_fused_op_opcheck():
    (x, reduced, span_weight, span_bias, _), groups = _fused_inputs(torch.float32, 2)
    args = (x, reduced, span_weight, span_bias, (3, 3), (2, 2), (1, 1), (1, 1), groups, "triton")
    torch.library.opcheck(torch.ops.involution.involution2d_fused.default, args)


@needs_triton
def test_unavailable_reason():
    assert triton_backend.unavailable_reason(DEVICE) is None
    assert "CUDA" in triton_backend.unavailable_reason(torch.device("meta"))


@needs_triton
def test_unavailable_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in triton_backend.unavailable_reason(torch.device("cpu"))


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"span_weight": torch.zeros(17, 5)}, ValueError),
        ({"span_bias": torch.zeros(17)}, ValueError),
        ({"reduced": torch.zeros(2, 5, 6, 6)}, ValueError),
        ({"span_bias": torch.zeros(18, dtype=torch.float64)}, TypeError),
        ({"groups": 3}, ValueError),
        ({"backend": "cuda"}, ValueError),
    ],
)
def test_fused_op_rejects_bad_arguments(change, error):
    (x, reduced, span_weight, span_bias, _), groups = _fused_inputs(torch.float32, 1)
    kwargs = {
        "input": x.cpu(),
        "reduced": reduced.cpu(),
        "span_weight": span_weight.cpu(),
        "span_bias": span_bias.cpu(),
        "kernel_size": 3,
        "groups": groups,
        "backend": "reference",
        **change,
    }
    with pytest.raises(error):
        involution2d_fused(**kwargs)


def test_min_bytes_moved_counts_each_operand_once():
    # x: 2*8*9*9, weight: 2*2*3*3*5*5, output: 2*8*5*5 elements of 2 bytes.
    assert bandwidth.min_bytes_moved((2, 8, 9, 9), (2, 2, 3, 3, 5, 5), 2) == 2 * (1296 + 900 + 400)
    with pytest.raises(ValueError, match="expected input"):
        bandwidth.min_bytes_moved((2, 8, 9), (2, 2, 3, 3, 5, 5), 2)


def test_bandwidth_fraction_needs_a_cuda_peak():
    assert bandwidth.peak_memory_bandwidth("cpu") is None
    assert bandwidth.bandwidth_fraction(10**9, 1.0, "cpu") is None
    with pytest.raises(ValueError, match="positive"):
        bandwidth.bandwidth_fraction(10**9, 0.0, "cpu")
    if torch.cuda.is_available():
        fraction = bandwidth.bandwidth_fraction(10**9, 1e-3, "cuda")
        assert fraction is not None and 0 < fraction < 1


def test_bench_model_variants():
    assert variants("rednet50", "both") == [("fused", True), ("unfused", False)]
    assert variants("resnet50", "both") == [("-", None)]
    with pytest.raises(ValueError, match="fused"):
        variants("rednet50", "sometimes")


def test_bench_model_cli_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "model", "--device", "cpu", "--models", "rednet26,resnet26"]
    argv += ["--batch-size", "2", "--image-size", "32", "--warmup", "0", "--iters", "1"]
    argv += ["--json", str(out)]
    assert cli.main(argv) == 0
    records = json.loads(out.read_text())
    assert [(r["model"], r["mode"]) for r in records] == [
        ("rednet26", "train"),
        ("rednet26", "infer"),
        ("resnet26", "train"),
        ("resnet26", "infer"),
    ]
    for record in records:
        assert record["error"] is None and record["peak_memory_mib"] is None
        assert math.isfinite(record["images_per_second"]) and record["images_per_second"] > 0
    table = capsys.readouterr().out
    assert "rednet26" in table and "images/s" in table


def test_bench_model_cli_rejects_unknown_model(capsys):
    argv = ["bench", "model", "--device", "cpu", "--models", "rednet7"]
    assert cli.main(argv) == 2
    assert "rednet7" in capsys.readouterr().err


def test_bench_op_bandwidth_column():
    common = {"channels": 64, "size": 56, "batch": 8, "method": "triton", "peak_bytes": 0}
    results = [
        Measurement(**common, pass_name=name, median_ms=ms, min_ms=ms, tensor_bytes=10**9)
        for name, ms in (("forward", 1.0), ("forward+backward", 2.0))
    ]
    # 1e9 bytes in 1 ms, and 3e9 bytes in 2 ms, against a 2e12 B/s peak.
    rows = format_op_table(results, peak_bandwidth=2e12).splitlines()
    assert rows[0].endswith("% peak bandwidth |")
    assert rows[2].endswith("| 50.0 |") and rows[3].endswith("| 75.0 |")
    assert "bandwidth" not in format_op_table(results)


def test_every_tiling_has_a_value_per_name_then_warps_and_stages():
    # On a CPU only the interpreted rows are built: a malformed GPU row would fail on a GPU only.
    from involution.ops.backends.triton import launch

    tilings = json.loads(launch.TILINGS_PATH.read_text())
    families = {name: entry for name, entry in tilings.items() if isinstance(entry, dict)}
    assert set(families) == {"gather", "gather_fused", "regeneration", "tiled", "tiled_fused"}
    for name, entry in families.items():
        for mode in ("interpreted", "fixed", "tuned"):
            assert entry[mode], (name, mode)
            for row in entry[mode]:
                assert len(row) == len(entry["names"]) + 2, (name, mode, row)
                assert all(isinstance(value, int) and value > 0 for value in row), (name, row)


# Compiles the gather, fused, regenerating and 3-D kernels for sm_90 (PTX, then cubin with
# Triton's bundled ptxas; the tiled ones: test_triton_candidates.py); needs no GPU. Run in a
# fresh process: with TRITON_INTERPRET=1 (this process) Triton's code generator dispatches to
# the interpreter's implementations.
_COMPILE_FOR_HOPPER = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from involution.ops.backends.triton import fused, kernels, nd, regeneration

FUSED = {"KK_PAD": 64, "HAS_BIAS": True, "IEEE_DOT": False, "DOT_IN_FP32": False}
SPAN = {"KK_PAD": 64, "ACC_DTYPE": tl.float32, "USE_DOT": True, "IEEE_DOT": False,
        "DOT_IN_FP32": False, "NEEDS_WEIGHT": True, "NEEDS_BIAS": True}
# The 3-D kernels: a stride and a dilation of 2 (the adjoint taps' exact division).
ND = {"GEOMETRY": ((2, 1, 1), (1, 0, 1), (1, 2, 1)), "KD": 3, "KH": 1, "KW": 3,
      "ACC": tl.float32, "BLOCK_P": nd.BLOCK_P, "BLOCK_C": nd.BLOCK_C}
# The regenerating backward's float32 accumulation buffers.
FLOAT32 = ("ga_ptr", "gsw_ptr", "gsb_ptr")
# Tuple arguments: the (stride, padding, dilation) pairs, the 3-D kernels' (D, H, W) sizes and
# a feature map's (b, c, h, w) strides.
TUPLES = {"geometry": (("i32", "i32"),) * 3, "size": ("i32",) * 3, "out_size": ("i32",) * 3}
FEATURE_STRIDES = ("sx", "so", "sg", "si", "sr", "sa", "ss", "sd")


def arg_type(arg):
    if arg in TUPLES:
        return TUPLES[arg]
    if arg in FEATURE_STRIDES:
        return ("i32",) * 4
    if arg.endswith("_ptr"):
        return "*fp32" if arg in FLOAT32 else "*bf16"
    return "i32"


for kernel, extra in (
    (kernels.aggregate_kernel, {"ACC_DTYPE": tl.float32, "ADJOINT": False}),
    (kernels.aggregate_kernel, {"ACC_DTYPE": tl.float32, "ADJOINT": True}),
    (kernels.backward_weight_kernel, {"ACC_DTYPE": tl.float32}),
    (fused.fused_forward_kernel, FUSED),
    (regeneration.span_gradients_kernel, {**SPAN, "PARTIALS": False}),
    (regeneration.span_gradients_kernel, {**SPAN, "PARTIALS": True}),
    (regeneration.input_gradient_kernel, {"CG_PAD": 16, "ACC_DTYPE": tl.float32, "HAS_BIAS": True}),
    (nd._aggregate_kernel, {**ND, "ADJOINT": False}),
    (nd._aggregate_kernel, {**ND, "ADJOINT": True}),
    (nd._backward_weight_kernel, ND),
):
    # The 2-D kernels are autotuned (compiled in their first tiling), the 3-D ones launch with
    # 4 warps.
    tuned = isinstance(kernel, triton.runtime.Autotuner)
    function = kernel.fn if tuned else kernel
    config = kernel.configs[0] if tuned else triton.Config({}, num_warps=4)
    constexprs = {"KH": 7, "KW": 7, **extra, **config.kwargs}
    signature = {
        arg: "constexpr" if arg in constexprs else arg_type(arg) for arg in function.arg_names
    }
    indexed = {(function.arg_names.index(arg),): value for arg, value in constexprs.items()}
    compiled = triton.compile(
        ASTSource(function, signature, constexprs=indexed),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": config.num_warps},
    )
    assert compiled.asm["cubin"], function.__name__
    print("compiled", function.__name__)
"""


@needs_triton
def test_kernels_compile_for_hopper():
    # The interpreter never runs Triton's GPU compiler, which rejects code the interpreter
    # accepts (tile shapes, dtypes of loop-carried values, unsupported dot operands).
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_HOPPER],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled") == 10
