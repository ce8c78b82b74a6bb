"""Registration of the involution operator with ``torch.library``, and its eager fast path.

The operator is a ``torch.library.custom_op`` (``torch.ops.involution.involution2d``) with a fake
(meta) implementation and a registered autograd formula, so ``torch.compile(fullgraph=True)``
traces through it without a graph break and ``torch.library.opcheck`` passes. The backward is
more custom ops: one per gradient, so only the gradients that are needed are computed, and one
for both, which lets a backend share work between them.

Plain eager calls take :class:`EagerInvolution2d` instead: an ``autograd.Function`` around the
same backend calls (:func:`aggregate`, :func:`gradients`). ``torch.library``'s Python dispatch
costs about 120 µs per forward+backward on CPU, which is a quarter of the whole operator on
RedNet's 7x7 maps at batch 1. See :func:`use_eager_path` for when the ops are used instead.

``involution::involution2d_fused`` takes the kernel branch's reduced features and the span
conv's parameters instead of the kernels: a backend with a ``fused_forward`` generates the
kernels on the fly (Triton: in registers, never written to memory); every other backend runs the
span conv, then its aggregation. Either way autograd saves only the op's inputs and the backward
recomputes the kernels, materialising them (and their gradient) only while it runs.

``involution::involution2d_layer`` is the whole :class:`~involution.ops.Involution2d` layer
for inference (kernel branch, span conv, aggregation, an optional per-channel affine + ReLU
epilogue and 1x1 projection), an :class:`~involution.ops.layer.Involution2dLayerSpec` flattened
into tensors and scalars: a backend with a ``layer_prepare`` (``"cpu"``) computes it without
storing the kernels; every other call composes the steps (:func:`compose_layer`). It has no
autograd. Eager callers run the spec without the op (:func:`run_layer`), or prepare it once for
many calls (:func:`prepare_layer`).

The ops take already-validated arguments: call the front doors in
:mod:`involution.ops.functional`. Outputs follow the input's memory format (channels_last in,
channels_last out).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from involution.ops.backends import get_backend, resolve_backend
from involution.ops.checks import output_size
from involution.ops.layer import Involution2dLayerSpec, LayerRun
from involution.ops.layout import (
    aggregation_output,
    empty_output,
    generate_kernels,
    kernels_like,
    memory_format_of,
    pair,
)


def backend_module(name: str, device: torch.device):
    """The module of backend ``name``. The ops also take ``"auto"``, resolved for ``device``:
    TorchScript calls them with a layer's own setting, the device being known only at run time.
    """
    return get_backend(resolve_backend(name, device) if name == "auto" else name)


#: The aggregation ops' arguments after their tensors, as their schemas spell them. The schemas
#: are given explicitly so that the 2-D ops, their gradients and the 3-D ops
#: (:mod:`involution.ops.registration_nd`) share this one spelling.
CONV_SCHEMA = "SymInt[] stride, SymInt[] padding, SymInt[] dilation, str backend"
#: The arguments of an aggregation op (input, weight, then :data:`CONV_SCHEMA`).
AGGREGATE_SCHEMA = f"Tensor input, Tensor weight, {CONV_SCHEMA}"
#: The arguments of a gradient op of an aggregation: the output gradient, then the op's.
GRADIENT_SCHEMA = f"Tensor grad_output, {AGGREGATE_SCHEMA}"


def aggregate(
    input: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str,
) -> Tensor:
    """Involution forward: y[b, c, i, j] = sum_uv weight[b, g(c), u, v, i, j] * x_pad[...]."""
    return aggregation_output(
        input,
        weight.shape[-2:],
        lambda: backend_module(backend, input.device).forward(
            input, weight, pair(stride), pair(padding), pair(dilation)
        ),
    )


def gradients(
    grad_output: Tensor, input: Tensor, weight: Tensor, conv_args: tuple, needs: tuple[bool, bool]
) -> tuple[Tensor | None, Tensor | None]:
    """(grad_input, grad_weight) of :func:`aggregate`, each ``None`` where ``needs`` (input,
    weight) says it is not needed; ``conv_args``: (stride, padding, dilation, backend).

    grad_input has the input's memory format, grad_weight the backend's layout (the cpu
    backend's: the weight's when pixel-major): the ops make it contiguous, the eager path the
    weight's layout (:func:`~involution.ops.layout.kernels_like`). A backend with a
    ``backward`` computes both in one call, sharing work between them.
    """
    stride, padding, dilation, backend = conv_args
    needs_input, needs_weight = needs
    memory_format = memory_format_of(input)
    if input.numel() == 0:
        return (
            torch.zeros_like(input, memory_format=memory_format) if needs_input else None,
            torch.zeros_like(weight) if needs_weight else None,
        )
    impl = backend_module(backend, input.device)
    args = (grad_output, input, weight, pair(stride), pair(padding), pair(dilation))
    if needs_input and needs_weight and hasattr(impl, "backward"):
        grad_input, grad_weight = impl.backward(*args)
    else:
        grad_input = impl.backward_input(*args) if needs_input else None
        grad_weight = impl.backward_weight(*args) if needs_weight else None
    return (
        None if grad_input is None else grad_input.contiguous(memory_format=memory_format),
        grad_weight,
    )


@torch.library.custom_op(
    "involution::involution2d", mutates_args=(), schema=f"({AGGREGATE_SCHEMA}) -> Tensor"
)
def involution2d_op(*args: Any) -> Tensor:
    """Involution forward (:func:`aggregate`, same arguments) as a custom op."""
    return aggregate(*args)


@involution2d_op.register_fake
def _(input, weight, stride, padding, dilation, backend):
    return empty_output(input, weight.shape[-2:])


@torch.library.custom_op(
    "involution::involution2d_backward_input",
    mutates_args=(),
    schema=f"({GRADIENT_SCHEMA}) -> Tensor",
)
def involution2d_backward_input_op(*args: Any) -> Tensor:
    """Gradient of :func:`involution2d_op` with respect to ``input``; the arguments: the output
    gradient, then the op's."""
    return gradients(*args[:3], args[3:], (True, False))[0]


@involution2d_backward_input_op.register_fake
def _(grad_output, input, weight, stride, padding, dilation, backend):
    return torch.empty_like(input, memory_format=memory_format_of(input))


@torch.library.custom_op(
    "involution::involution2d_backward_weight",
    mutates_args=(),
    schema=f"({GRADIENT_SCHEMA}) -> Tensor",
)
def involution2d_backward_weight_op(*args: Any) -> Tensor:
    """Gradient of :func:`involution2d_op` with respect to ``weight``, contiguous."""
    return gradients(*args[:3], args[3:], (False, True))[1].contiguous()


# The ops' kernel gradients are contiguous whatever the kernels' layout: under torch.compile the
# kernels given to the op at run time may be laid out otherwise than the traced (fake) ones.
@involution2d_backward_weight_op.register_fake
def _(grad_output, input, weight, stride, padding, dilation, backend):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.custom_op(
    "involution::involution2d_backward",
    mutates_args=(),
    schema=f"({GRADIENT_SCHEMA}) -> (Tensor, Tensor)",
)
def involution2d_backward_op(*args: Any) -> tuple[Tensor, Tensor]:
    """Both gradients of :func:`involution2d_op`: (grad_input, grad_weight contiguous)."""
    grad_input, grad_weight = gradients(*args[:3], args[3:], (True, True))
    return grad_input, grad_weight.contiguous()


@involution2d_backward_op.register_fake
def _(grad_output, input, weight, stride, padding, dilation, backend):
    return (
        torch.empty_like(input, memory_format=memory_format_of(input)),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
    )


def setup_context(ctx, inputs: tuple, output: Any) -> None:
    """Autograd set-up of an aggregation op (2-D or 3-D): saves input and weight, and
    ``ctx.conv_args`` = (stride, padding, dilation, backend)."""
    input, weight, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(input, weight)
    ctx.conv_args = (stride, padding, dilation, backend)


def aggregation_gradients(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    conv_args: tuple,
    needs_input: bool,
    needs_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """(grad_input, grad_weight) of the aggregation, each ``None`` where it is not needed.

    ``conv_args`` is (stride, padding, dilation, backend). Both gradients go through one op
    call, so that a backend can share work between them.
    """
    if needs_input and needs_weight:
        return involution2d_backward_op(grad_output, input, weight, *conv_args)
    if needs_input:
        return involution2d_backward_input_op(grad_output, input, weight, *conv_args), None
    if needs_weight:
        return None, involution2d_backward_weight_op(grad_output, input, weight, *conv_args)
    return None, None


def _backward(ctx, grad_output: Tensor):
    input, weight = ctx.saved_tensors
    grad_input, grad_weight = aggregation_gradients(
        grad_output, input, weight, ctx.conv_args, *ctx.needs_input_grad[:2]
    )
    return grad_input, grad_weight, None, None, None, None


torch.library.register_autograd("involution::involution2d", _backward, setup_context=setup_context)


def use_eager_path(input: Tensor, weight: Tensor) -> bool:
    """Whether a call can skip the custom op for :class:`EagerInvolution2d`.

    Only plain tensors in plain eager mode: under ``torch.compile``/``torch.export``, under a
    dispatch mode (``FlopCounterMode``, ``FakeTensorMode``, ...) and for tensor subclasses the
    custom op is used, since those see ops, not Python code.
    """
    return (
        type(input) is Tensor
        and type(weight) is Tensor
        and input.device.type != "meta"
        and not torch.compiler.is_compiling()
        and not is_in_torch_dispatch_mode()
    )


class EagerInvolution2d(torch.autograd.Function):
    """The involution op for eager calls, without ``torch.library``'s dispatch overhead.

    Same arguments, results and gradient values as ``torch.ops.involution.involution2d``: both
    call :func:`aggregate` and :func:`gradients`. The kernel gradient comes in the kernels' layout
    (the op's is contiguous).
    """

    @staticmethod
    def forward(ctx, input, weight, stride, padding, dilation, backend):
        inputs = (input, weight, stride, padding, dilation, backend)
        setup_context(ctx, inputs, None)
        return aggregate(*inputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input, grad_weight = gradients(
            grad_output, input, weight, ctx.conv_args, ctx.needs_input_grad[:2]
        )
        # In the kernels' layout: the span conv's backward then reads it without a copy.
        if grad_weight is not None:
            grad_weight = kernels_like(grad_weight, weight)
        return grad_input, grad_weight, None, None, None, None


@torch.library.custom_op(
    "involution::involution2d_fused",
    mutates_args=(),
    schema="(Tensor input, Tensor reduced, Tensor span_weight, Tensor? span_bias, "
    "SymInt[] kernel_size, SymInt[] stride, SymInt[] padding, SymInt[] dilation, SymInt groups, "
    "str backend) -> Tensor",
)
def involution2d_fused_op(*args: Any) -> Tensor:
    """Involution of ``input`` with the kernels ``generate_kernels(reduced, span_weight, ...)``;
    ``args``: (input, reduced, span_weight, span_bias, kernel_size, stride, padding, dilation,
    groups, backend). See :func:`fused_aggregate`."""
    return fused_aggregate(*args)


def fused_aggregate(*args: Any) -> Tensor:
    """The fused op's computation, which eager callers run without the op's dispatch; ``args``
    as :func:`involution2d_fused_op`'s.

    Backends without a ``fused_forward`` (and empty inputs) get the kernels materialised by the
    span conv and aggregated by :func:`aggregate`.
    """
    input, reduced, span_weight, span_bias, kernel_size = args[:5]
    stride, padding, dilation, groups, backend = args[5:]
    impl = backend_module(backend, input.device)
    if input.numel() == 0 or not hasattr(impl, "fused_forward"):
        kernels = generate_kernels(reduced, span_weight, span_bias, kernel_size, groups)
        return aggregate(input, kernels, stride, padding, dilation, backend)
    output = impl.fused_forward(
        input,
        reduced,
        span_weight,
        span_bias,
        pair(kernel_size),
        pair(stride),
        pair(padding),
        pair(dilation),
    )
    return output.contiguous(memory_format=memory_format_of(input))


@involution2d_fused_op.register_fake
def _(input, reduced, span_weight, span_bias, *args):
    return empty_output(input, reduced.shape[-2:])


def _fused_setup_context(ctx, inputs, output) -> None:
    input, reduced, span_weight, span_bias = inputs[:4]
    kernel_size, stride, padding, dilation, groups, backend = inputs[4:]
    # Only the op's inputs are saved: the kernels are recomputed in the backward.
    ctx.save_for_backward(input, reduced, span_weight, span_bias)
    ctx.kernel_args = (kernel_size, groups)
    ctx.conv_args = (stride, padding, dilation, backend)


def _fused_backward(ctx, grad_output: Tensor):
    input, reduced, span_weight, span_bias = ctx.saved_tensors
    kernel_size, groups = ctx.kernel_args
    needs_input, needs_reduced, needs_weight, needs_bias = ctx.needs_input_grad[:4]
    kernels = generate_kernels(reduced, span_weight, span_bias, kernel_size, groups)
    grad_reduced = grad_span_weight = grad_span_bias = None
    grad_input, grad_kernels = aggregation_gradients(
        grad_output,
        input,
        kernels,
        ctx.conv_args,
        needs_input,
        needs_reduced or needs_weight or needs_bias,
    )
    if grad_kernels is not None:
        # (B, G*Kh*Kw, P): the gradient of the span conv's output.
        grad_kernels = grad_kernels.flatten(1, 3).flatten(2)
        if needs_reduced:
            grad_reduced = torch.matmul(span_weight.t(), grad_kernels).view(reduced.shape)
        if needs_weight:
            grad_span_weight = torch.einsum("bkp,brp->kr", grad_kernels, reduced.flatten(2))
        if needs_bias:
            grad_span_bias = grad_kernels.sum(dim=(0, 2))
    return grad_input, grad_reduced, grad_span_weight, grad_span_bias, *([None] * 6)


torch.library.register_autograd(
    "involution::involution2d_fused", _fused_backward, setup_context=_fused_setup_context
)


def compose_layer(spec: Involution2dLayerSpec, input: Tensor, residual: Tensor | None) -> Tensor:
    """The layer op step by step: pool, reduce conv + ReLU, span conv, aggregation, epilogue,
    projection. input (B, C, H, W), residual (B, P, H_out, W_out) or ``None`` -> (B, C or P,
    H_out, W_out)."""
    branch = input
    if spec.stride != (1, 1):  # Involution2d's kernel branch: AvgPool2d(stride, ceil_mode=True)
        branch = F.avg_pool2d(input, spec.stride, spec.stride, ceil_mode=True)
    reduce_weight = spec.reduce_weight.reshape(spec.reduce_weight.shape[0], -1, 1, 1)
    reduced = F.relu(F.conv2d(branch, reduce_weight, spec.reduce_bias))
    span_weight = spec.span_weight.reshape(spec.span_weight.shape[0], -1)
    kernels = generate_kernels(reduced, span_weight, spec.span_bias, spec.kernel_size, spec.groups)
    output = aggregate(input, kernels, spec.stride, spec.padding, spec.dilation, spec.backend)
    if spec.out_scale is not None:
        output = output * spec.out_scale[:, None, None] + spec.out_shift[:, None, None]
    output = F.relu(output) if spec.out_relu else output
    if spec.proj_weight is None:
        return output
    proj_weight = spec.proj_weight.reshape(*spec.proj_weight.shape[:2], 1, 1)
    output = F.conv2d(output, proj_weight, spec.proj_bias)
    if residual is not None:
        output = output + residual
    return F.relu(output) if spec.proj_relu else output


def prepare_layer(spec: Involution2dLayerSpec) -> LayerRun:
    """The layer op of ``spec`` as ``run(input, residual)``: the backend's ``layer_prepare``
    (its parameters prepared once for every call of ``run``) where it has one for them, else
    :func:`compose_layer`. Output in the memory format of ``input``."""
    prepare = getattr(get_backend(spec.backend), "layer_prepare", None)
    fused = None if prepare is None else prepare(spec)

    def output(input: Tensor, residual: Tensor | None) -> Tensor:
        if fused is not None and input.numel() > 0:
            return fused(input, residual)
        return compose_layer(spec, input, residual)

    def run(input: Tensor, residual: Tensor | None) -> Tensor:
        # Named in torch.profiler traces (eager calls reach here without a dispatcher op); only
        # while profiling, since a record_function costs about 20 us.
        if torch._C._autograd._profiler_enabled():
            with torch.profiler.record_function("involution::layer_inference"):
                result = output(input, residual)
        else:
            result = output(input, residual)
        return result.contiguous(memory_format=memory_format_of(input))

    return run


def run_layer(spec: Involution2dLayerSpec, input: Tensor, residual: Tensor | None) -> Tensor:
    """The layer op of ``spec`` once: prepared and run in plain eager mode, else (tracers,
    dispatch modes, tensor subclasses) the custom op, ``spec`` flattened into its arguments."""
    # The weights are often Parameters (a Tensor subclass that eager mode treats as a tensor):
    # the input alone decides.
    if use_eager_path(input, input):
        return prepare_layer(spec)(input, residual)
    return involution2d_layer_op(input=input, residual=residual, **spec.op_arguments())


# The op's schema is its signature, one argument per field of the flattened spec.
@torch.library.custom_op("involution::involution2d_layer", mutates_args=())
def involution2d_layer_op(  # noqa: PLR0913
    input: Tensor,
    reduce_weight: Tensor,
    reduce_bias: Tensor | None,
    span_weight: Tensor,
    span_bias: Tensor | None,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    out_scale: Tensor | None,
    out_shift: Tensor | None,
    out_relu: bool,
    proj_weight: Tensor | None,
    proj_bias: Tensor | None,
    residual: Tensor | None,
    proj_relu: bool,
    backend: str,
) -> Tensor:
    """The whole Involution2d layer for inference as a custom op: the flattened
    :class:`~involution.ops.layer.Involution2dLayerSpec`, gathered again and run once."""
    spec = Involution2dLayerSpec.from_op_arguments(locals())  # the arguments by name
    return prepare_layer(spec)(input, residual)


@involution2d_layer_op.register_fake
def _(  # noqa: PLR0913 (a fake takes the op's arguments)
    input,
    reduce_weight,
    reduce_bias,
    span_weight,
    span_bias,
    kernel_size,
    stride,
    padding,
    dilation,
    groups,
    out_scale,
    out_shift,
    out_relu,
    proj_weight,
    *args,
):
    out_size = [
        output_size(input.shape[2 + d], kernel_size[d], stride[d], padding[d], dilation[d])
        for d in range(2)
    ]
    return empty_output(input, out_size, None if proj_weight is None else proj_weight.shape[0])
