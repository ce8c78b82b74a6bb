"""``involution bench gpu``: the prepared GPU run, from correctness to the winner table and RedNet.

One command, meant for one GPU and at most ``--budget`` seconds (8 minutes by default):

1. **tests**: ``pytest tests/test_triton_candidates.py tests/test_regen_triton.py`` in a
   subprocess (on CUDA every Triton variant, dtype and layout against the reference, and the
   regenerating training path against its ATen composition). A variant named by a failing
   test, or by no passing one, is kept out of the winner table.
2. **op**: every distinct involution layer shape of RedNet-50 (read off the model on the meta
   device) at ``--batch`` (128), bfloat16, channels_last, with the kernels in the layout the
   span conv produces: the forward, the backward (both gradients) and the fused forward
   (kernel generation inside the aggregation) of every variant, beside cuDNN's depthwise 7x7
   and dense 3x3 convolutions of the same shape and stride. Times are medians of
   ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls); bandwidth is the
   compulsory traffic (:mod:`involution.bench.bandwidth`: every operand read once, every result
   written once) per second, as a fraction of the device's peak.
3. **winners**: the fastest eligible variant per (shape, pass), written as a winner table
   (:mod:`involution.ops.backends.triton.winners`) to ``DIR/winners.json``; commit it as
   ``src/involution/ops/backends/triton/winners.json`` and ``backend="auto"`` uses it.
4. **regeneration**: the training path that regenerates the kernels in backward against the
   one that keeps them, forward + backward time and peak memory per RedNet-50 layer shape and
   for a RedNet-50 training step (:mod:`involution.bench.regeneration`).
5. **models**: RedNet-50 (unfused and fused, Triton variants from the new table) against
   torchvision's ResNet-50, training and inference images/s and peak memory, bf16 autocast,
   channels_last, eagerly and through ``torch.compile`` (:mod:`involution.bench.model`).

Everything goes to ``DIR/bench_gpu.json`` (rewritten after every step, so a run cut short
keeps what it measured) and a summary is printed. The budget guard gives each step a share of
what is left and skips what would not fit, recording each skip and why.

``--dry-run`` runs the same pipeline on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``): a few of the tests, the first layer shape of RedNet-26 at 8 px and
batch 1 (one call each), and RedNet-26 against ``torchvision.resnet18`` at 32 px and batch 2,
eager only (compiling on CPU takes minutes). Its timings mean nothing; it checks that
the pipeline runs end to end without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from involution.bench.op import DENSE, DEPTHWISE, times_ms

if TYPE_CHECKING:
    from involution.bench.model import BenchSettings

#: Files under the repository root (a source checkout: the tests are not installed).
REPO_ROOT = Path(__file__).resolve().parents[3]
TEST_FILES = (Path("tests") / "test_triton_candidates.py", Path("tests") / "test_regen_triton.py")
#: The issue's targets, checked in the summary.
TARGETS = {
    "forward_bandwidth": 0.70,
    "backward_bandwidth": 0.50,
    "train_speed_vs_resnet": 1.0,
    "infer_speed_vs_resnet": 1.3,
    "train_memory_vs_resnet": 0.8,
}
PASSES = ("forward", "backward", "fused")
#: Shares of the budget: the tests get 30 % (at most 150 s), the op timings half of what is
#: left after them, the regeneration step what it needs (about REGEN_S on a GPU), the models
#: the rest.
TEST_SHARE, TEST_MAX_S, OP_SHARE, REGEN_S = 0.3, 150.0, 0.5, 90.0


@dataclass(frozen=True)
class RunPlan:
    """What one run measures; :func:`plan` gives the GPU run's and the dry run's."""

    device: torch.device
    budget_s: float
    batch: int
    layer_model: str
    layer_image_size: int
    max_shapes: int | None
    test_selection: str | None
    rednet: str
    resnet: str
    model_batch: int
    model_image_size: int
    model_warmup: int
    model_iters: int
    compile_models: bool
    dtype: torch.dtype = torch.bfloat16


#: (setting, GPU run, dry run): RedNet-50's layer shapes at batch 128 and 224 px, every test,
#: ResNet-50 and compiled models on a GPU; on CPU RedNet-26's first layer shape at 8 px and
#: batch 1, a few tests, RedNet-26 against ResNet-18 at 32 px and batch 2, eager only.
PLANS: tuple[tuple[str, Any, Any], ...] = (
    ("batch", 128, 1),
    ("layer_model", "rednet50", "rednet26"),
    ("layer_image_size", 224, 8),
    ("max_shapes", None, 1),
    ("test_selection", None, "odd_sizes and fp32 and nchw or winner_table or missing_table"),
    ("rednet", "rednet50", "rednet26"),
    ("resnet", "torchvision.resnet50", "torchvision.resnet18"),
    ("model_batch", 128, 2),
    ("model_image_size", 224, 32),
    ("model_warmup", 3, 1),
    ("model_iters", 10, 1),
    ("compile_models", True, False),
)


def plan(dry_run: bool, budget_s: float, batch: int | None) -> RunPlan:
    """The GPU plan or the CPU dry-run plan (:data:`PLANS`); ``batch`` overrides the op batch."""
    settings = {name: dry if dry_run else gpu for name, gpu, dry in PLANS}
    settings["batch"] = batch or settings["batch"]
    device = torch.device("cpu" if dry_run else "cuda")
    return RunPlan(device=device, budget_s=budget_s, **settings)


class Budget:
    """Seconds left of the run's budget, and the skips it forced."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()
        self.skipped: list[dict[str, str]] = []

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def allows(self, what: str, needs_s: float) -> bool:
        """Whether ``needs_s`` seconds are left; records the skip of ``what`` when not."""
        if self.left() >= needs_s:
            return True
        self.skip(what, f"needs about {needs_s:.0f} s, {max(self.left(), 0):.0f} s left")
        return False

    def skip(self, what: str, why: str) -> None:
        self.skipped.append({"what": what, "why": why})
        print(f"skipped {what}: {why}", file=sys.stderr, flush=True)


# --- 1. The op tests ----------------------------------------------------------------------


_RESULT_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def variant_verdicts(outcomes: dict[str, str], variants: tuple[str, ...]) -> dict[str, str]:
    """``"passed"``, ``"failed"`` or ``"untested"`` per variant from pytest outcomes.

    A test concerns a variant when the variant's name is one of the ``_``/``-``/``[]``
    separated words of its id (``test_variant_matches_reference[tiled-odd_sizes-fp32-nchw]``,
    ``test_tiled_kernels_compile_for_hopper``).
    """
    verdicts = {}
    for variant in variants:
        mine = [
            outcome
            for test, outcome in outcomes.items()
            if variant in re.split(r"[_\-\[\]:.]+", test.rsplit("::", 1)[-1])
        ]
        if any(outcome in ("FAILED", "ERROR") for outcome in mine):
            verdicts[variant] = "failed"
        elif "PASSED" in mine:
            verdicts[variant] = "passed"
        else:
            verdicts[variant] = "untested"
    return verdicts


def run_tests(run: RunPlan, budget: Budget, variants: tuple[str, ...]) -> dict[str, Any]:
    """pytest on :data:`TEST_FILES` in a subprocess, within a share of the budget."""
    missing = [str(REPO_ROOT / path) for path in TEST_FILES if not (REPO_ROOT / path).is_file()]
    if missing:
        budget.skip("tests", f"{', '.join(missing)} not found (run from a source checkout)")
        return {"verdicts": dict.fromkeys(variants, "untested"), "outcomes": {}}
    limit = max(10.0, min(TEST_SHARE * budget.left(), TEST_MAX_S))
    command = [
        sys.executable,
        "-m",
        "pytest",
        *map(str, TEST_FILES),
        "-v",
        "-p",
        "no:cacheprovider",
    ]
    if run.test_selection:
        command += ["-k", run.test_selection]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT / "src"), env.get("PYTHONPATH")])
    )
    print(f"tests: {' '.join(command[3:])} (limit {limit:.0f} s)", file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=limit
        )
        output, returncode, timed_out = done.stdout + done.stderr, done.returncode, False
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout or ""
        if isinstance(output, bytes):  # run() hands back bytes on a timeout, even in text mode
            output = output.decode(errors="replace")
        returncode, timed_out = None, True
        budget.skip("the rest of the tests", f"the test step ran past its {limit:.0f} s share")
    outcomes = {
        match[1]: match[2]
        for line in output.splitlines()
        if (match := _RESULT_LINE.match(line.strip()))
    }
    counts = Counter(outcomes.values())
    summary = next((line for line in reversed(output.splitlines()) if " in " in line), "")
    return {
        "command": " ".join(command[1:]),
        "returncode": returncode,
        "timed_out": timed_out,
        "seconds": round(time.monotonic() - start, 1),
        "counts": dict(counts),
        "summary": summary.strip("= "),
        "outcomes": outcomes,
        "failures": [test for test, outcome in outcomes.items() if outcome in ("FAILED", "ERROR")],
        "verdicts": variant_verdicts(outcomes, variants),
        "output_tail": output[-3000:] if returncode not in (0, 5) else "",
    }


# --- 2. Layer shapes and op timings -------------------------------------------------------


@dataclass(frozen=True)
class LayerShape:
    """One involution layer: input (C, H, W), kernel K, stride, groups G, reduced width R."""

    channels: int
    height: int
    width: int
    kernel: int
    stride: int
    groups: int
    reduced: int
    count: int = field(default=1, compare=False)

    @property
    def label(self) -> str:
        return f"C{self.channels} {self.height}x{self.width} K{self.kernel} s{self.stride}"

    @property
    def padding(self) -> int:
        return (self.kernel - 1) // 2

    @property
    def out_size(self) -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            (n + 2 * self.padding - self.kernel) // self.stride + 1
            for n in (self.height, self.width)
        )


def layer_shapes(model_name: str, image_size: int) -> list[LayerShape]:
    """The distinct Involution2d shapes of timm model ``model_name`` in forward order, with
    how often each occurs; read with forward pre-hooks on the meta device (no compute)."""
    import timm

    import involution.models  # noqa: F401  (registers the RedNets with timm)
    from involution.ops import Involution2d

    model = timm.create_model(model_name, num_classes=10).to("meta")
    seen: list[LayerShape] = []

    def record(module: Involution2d, args: tuple) -> None:
        _, channels, height, width = args[0].shape
        seen.append(
            LayerShape(
                channels,
                height,
                width,
                module.kernel_size,
                module.stride,
                module.groups,
                module.reduce.out_channels,
            )
        )

    hooks = [
        module.register_forward_pre_hook(record)
        for module in model.modules()
        if isinstance(module, Involution2d) and module.dilation == 1
    ]
    with torch.no_grad():
        # Batch 2: training-mode BatchNorm needs two values per channel on 1x1 maps.
        model(torch.empty(2, 3, image_size, image_size, device="meta"))
    for hook in hooks:
        hook.remove()
    counts = Counter(seen)
    return [replace(shape, count=counts[shape]) for shape in dict.fromkeys(seen)]


@dataclass(frozen=True)
class OpTiming:
    """One method and pass on one layer shape; ``ms`` is ``None`` when it failed."""

    shape: str
    method: str
    pass_name: str
    ms: float | None
    bytes_moved: int
    bandwidth_fraction: float | None = None
    error: str | None = None


def _time_ms(function: Callable[[], Any], device: torch.device) -> float:
    """Median milliseconds of ``function``: do_bench on CUDA, a few timed calls on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(function, warmup=10, rep=40, return_mode="median"))
    return statistics.median(times_ms(function, device, warmup=0, repeats=1))


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class LayerProblem:
    """The tensors of one layer shape at one batch size, as RedNet's layer produces them:
    channels_last features, the kernels as the pixel-major view of the span conv's output."""

    def __init__(self, shape: LayerShape, batch: int, dtype: torch.dtype, device: torch.device):
        from involution.ops.layout import generate_kernels

        factory = {"dtype": dtype, "device": device}
        cl = torch.channels_last
        out_h, out_w = shape.out_size
        kk = shape.kernel * shape.kernel
        self.shape = shape
        self.geometry = ((shape.stride,) * 2, (shape.padding,) * 2, (1, 1))
        self.x = torch.randn(batch, shape.channels, shape.height, shape.width, **factory)
        self.x = self.x.contiguous(memory_format=cl)
        self.reduced = torch.randn(batch, shape.reduced, out_h, out_w, **factory)
        self.reduced = self.reduced.contiguous(memory_format=cl)
        self.span_weight = torch.randn(shape.groups * kk, shape.reduced, **factory) / 8
        self.span_bias = torch.randn(shape.groups * kk, **factory)
        self.weight = generate_kernels(
            self.reduced, self.span_weight, self.span_bias, (shape.kernel,) * 2, shape.groups
        )
        self.grad = torch.randn(batch, shape.channels, out_h, out_w, **factory)
        self.grad = self.grad.contiguous(memory_format=cl)

    def involution(self, variant: str, pass_name: str) -> tuple[Callable[[], Any], int]:
        """(call, compulsory bytes) of one pass of the ``"triton"`` backend's ``variant``."""
        from involution.bench.bandwidth import min_bytes_moved
        from involution.ops.backends import triton as backend

        x, w, geometry = self.x, self.weight, self.geometry
        one_pass = min_bytes_moved(x.shape, w.shape, x.element_size())
        if pass_name == "forward":
            return lambda: backend.forward(x, w, *geometry, variant=variant), one_pass
        if pass_name == "backward":
            # grad_input reads grad_output and the kernels, grad_weight grad_output and x.
            return lambda: backend.backward(self.grad, x, w, *geometry, variant=variant), (
                2 * one_pass
            )
        kernel = (self.shape.kernel,) * 2
        args = (x, self.reduced, self.span_weight, self.span_bias, kernel, *geometry)
        # Reads x, the reduced features and the span conv; writes an output-sized tensor.
        fused_bytes = _nbytes(x, self.reduced, self.span_weight, self.span_bias, self.grad)
        return lambda: backend.fused_forward(*args, variant=variant), fused_bytes

    def convolution(self, method: str, pass_name: str) -> tuple[Callable[[], Any], int]:
        """(call, compulsory bytes) of the depthwise 7x7 or dense 3x3 conv (cuDNN on a GPU),
        with the layer's stride."""
        channels, stride = self.shape.channels, self.shape.stride
        options = {"dtype": self.x.dtype, "device": self.x.device, "bias": False}
        if method == DEPTHWISE:
            conv = nn.Conv2d(channels, channels, 7, stride, 3, groups=channels, **options)
        else:
            conv = nn.Conv2d(channels, channels, 3, stride, 1, **options)
        conv = conv.to(memory_format=torch.channels_last)
        x = self.x.detach().requires_grad_()
        with torch.no_grad():
            out_bytes = _nbytes(conv(x))
        one_pass = _nbytes(x, conv.weight) + out_bytes
        if pass_name == "forward":

            def forward() -> Tensor:
                with torch.no_grad():
                    return conv(x)

            return forward, one_pass
        output = conv(x)
        grad = torch.randn_like(output)

        def backward() -> Any:
            return torch.autograd.grad(output, (x, conv.weight), grad, retain_graph=True)

        return backward, 2 * one_pass


def time_layers(
    run: RunPlan,
    shapes: list[LayerShape],
    variants: tuple[str, ...],
    budget: Budget,
    share_s: float,
) -> list[OpTiming]:
    """Every variant's passes and both convolutions on every shape, until ``share_s`` is spent."""
    from involution.bench.bandwidth import bandwidth_fraction
    from involution.ops.backends.triton import winners

    deadline = time.monotonic() + share_s
    timings = []
    for index, shape in enumerate(shapes):
        if time.monotonic() > deadline:
            for rest in shapes[index:]:
                budget.skip(f"op timings of {rest.label}", "the op step's share is spent")
            break
        problem = LayerProblem(shape, run.batch, run.dtype, run.device)
        methods = [(v, p) for v in variants for p in PASSES]
        methods = [(v, p) for v, p in methods if p != "fused" or v in winners.FUSED_VARIANTS]
        methods += [(conv, p) for conv in (DEPTHWISE, DENSE) for p in ("forward", "backward")]
        for method, pass_name in methods:
            print(f"op: {shape.label} {method} {pass_name}", file=sys.stderr, flush=True)
            make = problem.convolution if method in (DEPTHWISE, DENSE) else problem.involution
            ms, fraction, error, nbytes = None, None, None, 0
            try:
                function, nbytes = make(method, pass_name)
                ms = _time_ms(function, run.device)
                fraction = bandwidth_fraction(nbytes, ms / 1e3, run.device)
            except Exception as failure:  # a variant that fails is recorded, not fatal
                error = f"{type(failure).__name__}: {str(failure)[:300]}"
            timings.append(OpTiming(shape.label, method, pass_name, ms, nbytes, fraction, error))
        del problem
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    return timings


def choose_winners(
    shapes: list[LayerShape],
    timings: list[OpTiming],
    eligible: tuple[str, ...],
    run: RunPlan,
) -> dict[str, dict[str, str]]:
    """Winner table entries: the fastest eligible variant per layer shape and pass."""
    from involution.ops.backends.triton import winners

    table: dict[str, dict[str, str]] = {}
    for shape in shapes:
        problem_x = torch.empty(
            (1, shape.channels, shape.height, shape.width), dtype=run.dtype, device="meta"
        ).contiguous(memory_format=torch.channels_last)
        weight_shape = (1, shape.groups, shape.kernel, shape.kernel, *shape.out_size)
        stride, padding = (shape.stride,) * 2, (shape.padding,) * 2
        key = winners.shape_key(problem_x, weight_shape, stride, padding, (1, 1))
        for pass_name in PASSES:
            candidates = [
                t
                for t in timings
                if t.shape == shape.label
                and t.pass_name == pass_name
                and t.method in eligible
                and t.ms is not None
            ]
            if candidates:
                best = min(candidates, key=lambda t: t.ms)
                table.setdefault(key, {})[pass_name] = best.method
    return table


# --- 4. Kernel regeneration ---------------------------------------------------------------


def time_regeneration(
    run: RunPlan, shapes: list[LayerShape], budget: Budget, winners_path: Path
) -> dict[str, Any]:
    """The kept-kernel and regenerating training paths (:mod:`involution.bench.regeneration`)
    on ``shapes`` at the op batch and RedNet's training step, with the winner table at
    ``winners_path``. The regenerating backward's kernels run with their fixed tiling (they are
    first imported here, under ``INVOLUTION_TRITON_AUTOTUNE=0``): autotuning every shape would
    take minutes of the budget."""
    from involution.bench import regeneration
    from involution.ops.backends.triton import winners

    if not budget.allows("regeneration", REGEN_S if run.device.type == "cuda" else 5.0):
        return {"layers": [], "models": []}
    with (
        _environment(winners.WINNERS_ENV, str(winners_path)),
        _environment("INVOLUTION_TRITON_AUTOTUNE", "0"),
    ):
        layers = regeneration.time_layer_paths(
            shapes, run.batch, run.dtype, run.device, lambda f: _time_ms(f, run.device)
        )
        models = regeneration.time_model_paths(run.rednet, _model_settings(run))
    return {"layers": [asdict(t) for t in layers], "models": models}


# --- 5. Models ----------------------------------------------------------------------------


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _model_settings(run: RunPlan) -> BenchSettings:
    """The models' :class:`~involution.bench.model.BenchSettings`: the run's model batch and
    image size, its dtype under autocast on a GPU (float32 on CPU), channels_last."""
    from involution.bench import model as model_bench

    return model_bench.BenchSettings(
        device=run.device,
        batch_size=run.model_batch,
        image_size=run.model_image_size,
        warmup=run.model_warmup,
        iters=run.model_iters,
        dtype=run.dtype if run.device.type == "cuda" else torch.float32,
        channels_last=True,
    )


def time_models(run: RunPlan, budget: Budget, winners_path: Path) -> list[dict[str, Any]]:
    """RedNet (unfused, fused) vs ResNet, train and infer, eager then compiled, within budget.

    ``backend="auto"`` with the winner table at ``winners_path``.
    """
    from involution.bench import model as model_bench
    from involution.ops.backends.triton import winners

    base = _model_settings(run)
    # (model, modes, compiled, fused, seconds it needs on a GPU), most important first:
    # eager runs, then compiled training, then compiled inference (compiling a model's
    # training step takes about a minute); compiled RedNets unfused only.
    jobs = [
        (run.rednet, ("train", "infer"), False, "both", 30.0),
        (run.resnet, ("train", "infer"), False, "auto", 15.0),
    ]
    if run.compile_models:
        jobs += [
            (run.resnet, ("train",), True, "auto", 60.0),
            (run.rednet, ("train",), True, "off", 75.0),
            (run.resnet, ("infer",), True, "auto", 40.0),
            (run.rednet, ("infer",), True, "off", 40.0),
        ]
    else:
        budget.skip("compiled models", "dry run: compiling on CPU takes minutes")
    records = []
    with _environment(winners.WINNERS_ENV, str(winners_path)):
        for name, modes, compiled, fused, needs_s in jobs:
            what = f"{name} {'/'.join(modes)} {'compiled' if compiled else 'eager'}"
            if not budget.allows(what, needs_s if run.device.type == "cuda" else 5.0):
                continue
            settings = replace(base, compile="on" if compiled else "off", fused=fused)
            for result in model_bench.run_benchmarks([name], list(modes), settings):
                records.append(
                    {
                        k: None if isinstance(v, float) and math.isnan(v) else v
                        for k, v in asdict(result).items()
                    }
                )
    return records


# --- Reporting ----------------------------------------------------------------------------


def _environment_info(device: torch.device) -> dict[str, Any]:
    from involution.bench.bandwidth import peak_memory_bandwidth

    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "triton_interpreter": os.environ.get("TRITON_INTERPRET", "0"),
    }
    with contextlib.suppress(ImportError):
        import triton

        info["triton"] = triton.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        peak = peak_memory_bandwidth(device)
        info["peak_bandwidth_gb_s"] = None if peak is None else round(peak / 1e9, 1)
    return info


def summary(report: dict[str, Any]) -> str:
    """The printed summary: tests, per-shape timings, winners, models, targets, skips."""
    lines = [f"# involution bench gpu: {report['environment']}", ""]
    tests = report.get("tests", {})
    lines.append(
        f"tests: {tests.get('summary') or tests.get('counts')}; variants {tests.get('verdicts')}"
    )
    for failure in tests.get("failures", [])[:10]:
        lines.append(f"  FAILED {failure}")
    timings = [OpTiming(**t) for t in report.get("op", [])]
    if timings:
        methods = list(dict.fromkeys(t.method for t in timings))
        lines += ["", "| shape | pass | " + " | ".join(methods) + " |"]
        lines.append("|---|---|" + "---:|" * len(methods))
        by_key = {(t.shape, t.pass_name, t.method): t for t in timings}
        for shape in dict.fromkeys(t.shape for t in timings):
            for pass_name in PASSES:
                cells = []
                for method in methods:
                    t = by_key.get((shape, pass_name, method))
                    if t is None:
                        cells.append("")
                    elif t.ms is None:
                        cells.append("error")
                    else:
                        share = (
                            ""
                            if t.bandwidth_fraction is None
                            else (f" ({100 * t.bandwidth_fraction:.0f} %)")
                        )
                        cells.append(f"{t.ms:.3f} ms{share}")
                if any(cells):
                    lines.append(f"| {shape} | {pass_name} | " + " | ".join(cells) + " |")
        lines.append("(ms: median; in brackets: compulsory bytes per second / peak bandwidth)")
    if report.get("winners"):
        lines += ["", "winners (shape key -> pass: variant):"]
        lines += [f"  {key}: {choice}" for key, choice in report["winners"].items()]
    regenerated = report.get("regeneration", {})
    if regenerated.get("layers") or regenerated.get("models"):
        from involution.bench.regeneration import PathTiming, format_table

        lines += ["", "kernel regeneration (training: kernels kept vs regenerated):"]
        layers = [PathTiming(**t) for t in regenerated["layers"]]
        lines += format_table(layers, regenerated["models"])
    models = report.get("models", [])
    if models:
        lines += [
            "",
            f"{'model':<24} {'variant':<8} {'compiled':<8} {'mode':<6} "
            f"{'images/s':>10} {'peak MiB':>9}",
        ]
        for m in models:
            speed = m["error"] or f"{m['images_per_second']:10.1f}"
            memory = "-" if m["peak_memory_mib"] is None else f"{m['peak_memory_mib']:9.0f}"
            compiled = "yes" if m.get("compiled") else "no"
            lines.append(
                f"{m['model']:<24} {m['variant']:<8} {compiled:<8} {m['mode']:<6} "
                f"{speed:>10} {memory:>9}"
            )
    if report.get("targets"):
        lines += ["", "targets:"]
        lines += [f"  {name}: {value}" for name, value in report["targets"].items()]
    for skip in report.get("skipped", []):
        lines.append(f"skipped {skip['what']}: {skip['why']}")
    return "\n".join(lines)


def check_targets(report: dict[str, Any], run: RunPlan) -> dict[str, str]:
    """The issue's targets against what was measured (``"not measured"`` where missing)."""
    results: dict[str, str] = {}
    winners_ms: dict[tuple[str, str], OpTiming] = {}
    for t in (OpTiming(**t) for t in report.get("op", [])):
        if t.ms is None or t.bandwidth_fraction is None or t.method in (DEPTHWISE, DENSE):
            continue
        best = winners_ms.get((t.shape, t.pass_name))
        if best is None or t.ms < best.ms:
            winners_ms[(t.shape, t.pass_name)] = t
    for pass_name, target in (("forward", "forward_bandwidth"), ("backward", "backward_bandwidth")):
        fractions = [t.bandwidth_fraction for (_, p), t in winners_ms.items() if p == pass_name]
        goal = TARGETS[target]
        if fractions:
            worst = min(fractions)
            verdict = "met" if worst >= goal else "not met"
            results[target] = (
                f"{verdict}: worst shape {100 * worst:.0f} % (goal {100 * goal:.0f} %)"
            )
        else:
            results[target] = "not measured"
    models = {
        (m["model"], m["variant"], m["mode"], m.get("compiled")): m
        for m in report.get("models", [])
        if m["error"] is None
    }
    for mode, key, field_name, better in (
        ("train", "train_speed_vs_resnet", "images_per_second", "higher"),
        ("infer", "infer_speed_vs_resnet", "images_per_second", "higher"),
        ("train", "train_memory_vs_resnet", "peak_memory_mib", "lower"),
    ):
        ratios = []
        for (name, variant, m_mode, compiled), m in models.items():
            resnet = models.get((run.resnet, "-", mode, compiled))
            if name != run.rednet or m_mode != mode or resnet is None:
                continue
            if m[field_name] is None or resnet[field_name] in (None, 0):
                continue
            label = f"{variant}{' compiled' if compiled else ''}"
            ratios.append((m[field_name] / resnet[field_name], label))
        goal = TARGETS[key]
        if not ratios:
            results[key] = "not measured"
            continue
        best, label = max(ratios) if better == "higher" else min(ratios)
        met = best >= goal if better == "higher" else best <= goal
        results[key] = f"{'met' if met else 'not met'}: best {best:.2f}x ({label}, goal {goal}x)"
    return results


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


# --- The command --------------------------------------------------------------------------


def _check_interpreter() -> None:
    """The dry run's kernels must run in the Triton interpreter."""
    from involution.ops.backends import triton as backend

    reason = backend.unavailable_reason(torch.device("cpu"))
    if reason is not None:
        raise SystemExit(f"involution bench gpu --dry-run: {reason}")


def _rerun_interpreted(args: argparse.Namespace) -> int:
    """Run the dry run again in a fresh process with ``TRITON_INTERPRET=1``.

    Triton decides between compiling and interpreting when its modules are imported, which
    ``import involution`` already did (through ``torch.utils.flop_counter``): the variable
    must be set before the process starts.
    """
    argv = ["--out", str(args.out), "--dry-run", "--budget", str(args.budget)]
    if args.batch is not None:
        argv += ["--batch", str(args.batch)]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "involution.bench.gpu", *argv]
    return subprocess.run(command, env=env, check=False).returncode


def bench_gpu(out: Path, dry_run: bool, budget_s: float, batch: int | None) -> dict[str, Any]:
    """Run the whole pipeline into ``out``; returns the report (also ``out/bench_gpu.json``)."""
    if dry_run:
        _check_interpreter()
    elif not torch.cuda.is_available():
        raise SystemExit("involution bench gpu: no CUDA device (use --dry-run to check on CPU)")
    from involution.ops.backends.triton import winners

    # cuDNN picks its fastest algorithms, as a training script would.
    torch.backends.cudnn.benchmark = not dry_run
    run = plan(dry_run, budget_s, batch)
    budget = Budget(run.budget_s)
    out.mkdir(parents=True, exist_ok=True)
    report_path, winners_path = out / "bench_gpu.json", out / "winners.json"
    report: dict[str, Any] = {
        "environment": _environment_info(run.device),
        "plan": {
            k: str(v) if isinstance(v, torch.device | torch.dtype) else v
            for k, v in asdict(run).items()
        },
        "dry_run": dry_run,
    }
    variants = winners.VARIANTS

    report["tests"] = run_tests(run, budget, variants)
    write_report(report_path, report)
    eligible = tuple(v for v in variants if report["tests"]["verdicts"][v] == "passed")

    shapes = layer_shapes(run.layer_model, run.layer_image_size)[: run.max_shapes]
    report["layer_shapes"] = [asdict(shape) | {"label": shape.label} for shape in shapes]
    timings = time_layers(run, shapes, variants, budget, OP_SHARE * budget.left())
    report["op"] = [asdict(t) for t in timings]
    write_report(report_path, report)

    report["winners"] = choose_winners(shapes, timings, eligible, run)
    source = f"involution bench gpu (batch {run.batch}, {report['environment'].get('gpu', 'cpu')})"
    winners.write_table(
        winners_path, report["winners"], report["environment"].get("gpu", "cpu"), source
    )
    write_report(report_path, report)

    report["regeneration"] = time_regeneration(run, shapes, budget, winners_path)
    write_report(report_path, report)

    report["models"] = time_models(run, budget, winners_path)
    report["targets"] = (
        {"all": "not checked: a dry run's figures mean nothing"}
        if dry_run
        else check_targets(report, run)
    )
    report["skipped"] = budget.skipped
    report["seconds"] = round(budget.seconds - budget.left(), 1)
    write_report(report_path, report)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """the prepared GPU run: op tests, kernel timings, winner table, RedNet vs ResNet"""
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON files")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, Triton interpreter, tiny shapes and models: checks the pipeline, no figures",
    )
    parser.add_argument(
        "--budget", type=float, default=480.0, help="seconds for the whole run (default 480)"
    )
    parser.add_argument("--batch", type=int, help="op batch size (default 128; dry run 2)")


def gpu_command(args: argparse.Namespace) -> int:
    """Run ``involution bench gpu``: summary to stdout, progress to stderr."""
    if args.budget <= 0 or (args.batch is not None and args.batch < 1):
        raise SystemExit("involution bench gpu: --budget and --batch must be positive")
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        return _rerun_interpreted(args)
    report = bench_gpu(args.out, args.dry_run, args.budget, args.batch)
    print(summary(report))
    print(f"\nwrote {args.out / 'bench_gpu.json'} and {args.out / 'winners.json'}")
    return 1 if report["tests"].get("failures") else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m involution.bench.gpu``: the same command without the ``involution`` CLI
    (whose other sub-commands import training dependencies a bare GPU image may lack)."""
    parser = argparse.ArgumentParser(prog="python -m involution.bench.gpu", description=__doc__)
    add_arguments(parser)
    return gpu_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
