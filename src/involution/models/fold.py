"""Eval-only BatchNorm folding for RedNet: each conv -> BatchNorm pair becomes one conv.

In eval mode a BatchNorm is a fixed per-channel affine, so a BatchNorm right after a conv folds
into that conv's weight and bias (``torch.nn.utils.fuse_conv_bn_eval``), and the network makes
one pass less over every activation. A BatchNorm after an involution cannot fold into it (its
kernels are shared by a group's channels); it becomes the epilogue of the fused inference op
(:class:`~involution.ops.Involution2dAffine`), together with the ReLU after it.

The ReLU after a folded conv, and a bottleneck's residual add and ReLU after its last conv, run
inside the conv too (:class:`ConvAct`: oneDNN's fused convolution on CPU float32, which applies
them to each output tile while it is in cache), so no activation is read back for them.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import fuse_conv_bn_eval

from involution.models.rednet import Bottleneck, RedNetStem
from involution.ops.layout import tensor_states
from involution.ops.modules import Involution2d, Involution2dAffine

__all__ = ["ConvAct", "fold_batchnorm"]


class ConvAct(nn.Module):
    """Eval-only ``relu?(conv(x) [+ residual])`` for a conv with its BatchNorm folded in.

    Without gradients on CPU float32 (oneDNN available, not under ``torch.compile``, which
    fuses the same on its own), one call of oneDNN's convolution with the add and the ReLU as
    post-ops (``torch.ops.mkldnn._convolution_pointwise``, what inductor's CPU freezing pass
    emits), on the weight reordered once into oneDNN's blocked layout (kept while the weight is
    unchanged: reordering on every call would cost more than the conv on small maps);
    otherwise the conv, the add and the ReLU one after another. The blocked layout oneDNN picks
    depends on the input shape and the number of threads, and a weight in another one's layout
    is reordered inside every call (RedNet-50 and ResNet-50 ran 3x slower at 224 px after a
    call at 32 px; a ResNet-50 layer3 block 10x slower on 1 thread after a call on 2): one
    reordered weight is kept per input shape and thread count, for the last
    :attr:`PACKED_SHAPES` of them. A weight that is an inference tensor (made under
    ``torch.inference_mode``) has no version counter to tell when it changes: it is reordered
    on every call.

    Shape:
        (B, C_in, H, W) [, residual (B, C_out, H_out, W_out)] -> (B, C_out, H_out, W_out).
    """

    #: (input shape, threads) whose oneDNN-layout weight a ConvAct keeps (least recently used
    #: dropped).
    PACKED_SHAPES = 4

    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"ConvAct needs explicit zero padding, got {conv}")
        self.conv = conv
        self.relu = relu
        # (input shape, threads) -> oneDNN-layout weight, for the weight state in
        # _packed_for: not buffers, so that they are neither saved nor converted with the
        # module; rebuilt when the weight changes.
        self._packed: dict[tuple[tuple[int, ...], int], Tensor] = {}
        self._packed_for: tuple | None = None

    def __getstate__(self) -> dict:
        # The oneDNN-layout weights are a cache (and cannot be copied or pickled): drop them.
        state = self.__dict__.copy()
        state["_packed"], state["_packed_for"] = {}, None
        return state

    def _packed_weight(self, x: Tensor) -> Tensor:
        conv = self.conv
        weight = conv.weight

        def reorder() -> Tensor:
            return torch.ops.mkldnn._reorder_convolution_weight(
                weight, conv.padding, conv.stride, conv.dilation, conv.groups, list(x.shape)
            )

        version = tensor_states(weight)
        if version is None:  # an inference tensor: no version counter tells when it changes
            return reorder()
        if self._packed_for != version:
            self._packed, self._packed_for = {}, version
        key = (tuple(x.shape), torch.get_num_threads())
        packed = self._packed.pop(key, None)  # re-inserted last: the most recently used
        if packed is None:
            packed = reorder()
            if len(self._packed) >= self.PACKED_SHAPES:
                del self._packed[next(iter(self._packed))]
        self._packed[key] = packed
        return packed

    def _fused(self, x: Tensor) -> bool:
        if torch.compiler.is_compiling():
            # Checked first: Dynamo cannot trace the availability check (a graph break, and a
            # recompilation of the rest of forward for every conv shape).
            return False
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and not torch.is_grad_enabled()
        )

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        conv = self.conv
        if self._fused(x):
            weight = self._packed_weight(x)
            args = (weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups)
            if residual is None:
                attr = "relu" if self.relu else "none"
                return torch.ops.mkldnn._convolution_pointwise(x, *args, attr, [], "")
            unary = "relu" if self.relu else None
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, *args, "add", None, unary, [], ""
            )
        y = conv(x)
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


#: The largest last conv (weight elements) of a bottleneck that the fused involution layer
#: computes itself, on each block of 8 pixels while it is in registers (its output then never
#: reaches memory). Measured on RedNet-50 at batch 8: layer1's and layer2's (64 x 256,
#: 128 x 512) gain, layer3's and layer4's (256 x 1024, 512 x 2048) lose, their weights read
#: again for every block; oneDNN computes those.
PROJECT_MAX_WEIGHTS = 128 * 512


class _InferenceBottleneck(nn.Module):
    """A folded :class:`Bottleneck` whose ReLUs and residual add run inside its convs, and whose
    last conv runs inside the fused involution layer where it is small
    (:data:`PROJECT_MAX_WEIGHTS`)."""

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        self.conv1 = ConvAct(block.conv1, relu=True)
        # The spatial layer: an Involution2dAffine (BN and ReLU inside), or the conv twin's conv.
        mixer = block.conv2
        self.conv2 = ConvAct(mixer, relu=True) if isinstance(mixer, nn.Conv2d) else mixer
        self.conv3 = ConvAct(block.conv3, relu=True)  # + shortcut, then ReLU
        self.downsample = None if block.downsample is None else ConvAct(block.downsample[0], False)
        self.project = (
            isinstance(self.conv2, Involution2dAffine)
            and self.conv3.conv.weight.numel() <= PROJECT_MAX_WEIGHTS
        )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        if self.project:
            return self.conv2.forward_projected(self.conv1(x), self.conv3.conv, shortcut, True)
        return self.conv3(self.conv2(self.conv1(x)), residual=shortcut)


class _InferenceStem(nn.Module):
    """A folded :class:`RedNetStem` whose ReLUs run inside its convs."""

    def __init__(self, stem: RedNetStem) -> None:
        super().__init__()
        self.conv1 = ConvAct(stem.conv1, relu=True)
        self.inv = stem.inv  # an Involution2dAffine: BN and ReLU inside
        self.conv2 = ConvAct(stem.conv2, relu=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.inv(self.conv1(x)))


def _is_relu(*modules: nn.Module) -> bool:
    return all(type(m) is nn.ReLU for m in modules)


def _all_folded(*norms: nn.Module) -> bool:
    return all(type(m) is nn.Identity for m in norms)


def _fuse_block(block: nn.Module) -> nn.Module:
    """The folded block's inference version when its structure allows, else the block itself."""
    if isinstance(block, Bottleneck):
        downsample_folded = block.downsample is None or (
            isinstance(block.downsample, nn.Sequential)
            and len(block.downsample) == 2
            and isinstance(block.downsample[0], nn.Conv2d)
            and _all_folded(block.downsample[1])
        )
        mixer_ok = isinstance(block.conv2, Involution2dAffine) or (
            isinstance(block.conv2, nn.Conv2d) and _is_relu(block.act2)
        )
        if (
            isinstance(block.conv1, nn.Conv2d)
            and isinstance(block.conv3, nn.Conv2d)
            and _all_folded(block.bn1, block.bn2, block.bn3)
            and _is_relu(block.act1, block.act3)
            and downsample_folded
            and mixer_ok
        ):
            return _InferenceBottleneck(block)
    if isinstance(block, RedNetStem) and (
        isinstance(block.inv, Involution2dAffine)
        and _all_folded(block.bn1, block.bn2, block.bn3)
        and _is_relu(block.act1, block.act3)
    ):
        return _InferenceStem(block)
    return block


def _foldable(norm: nn.Module) -> bool:
    """A BatchNorm2d with running statistics (eval mode uses them: a fixed affine)."""
    return isinstance(norm, nn.BatchNorm2d) and norm.running_var is not None


def _fold_pair(parent: nn.Module, conv_name: str, norm_name: str) -> None:
    """``parent.<conv_name>`` absorbs ``parent.<norm_name>``, which becomes an identity."""
    conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
    if isinstance(conv, nn.Conv2d) and _foldable(norm):
        setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
        setattr(parent, norm_name, nn.Identity())


def _fold_mixer(parent: nn.Module, mixer_name: str, norm_name: str, act_name: str) -> None:
    """An involution -> BatchNorm -> act triple becomes an Involution2dAffine (norm and act:
    identities); a conv -> BatchNorm pair (the conv twin) folds like any other."""
    mixer, norm = getattr(parent, mixer_name), getattr(parent, norm_name)
    if isinstance(mixer, Involution2d) and _foldable(norm):
        act = getattr(parent, act_name)
        setattr(parent, mixer_name, Involution2dAffine.from_batchnorm(mixer, norm, act))
        setattr(parent, norm_name, nn.Identity())
        setattr(parent, act_name, nn.Identity())
    else:
        _fold_pair(parent, mixer_name, norm_name)


def fold_batchnorm(model: nn.Module, inplace: bool = False, fuse_relu: bool = True) -> nn.Module:
    """An eval-mode copy of ``model`` with every conv -> BatchNorm pair of its RedNet parts folded.

    Folded: the stem's two convs (``conv1``/``bn1``, ``conv2``/``bn3``), each bottleneck's
    ``conv1``/``bn1``, ``conv3``/``bn3`` and ``downsample``, each Involution2d's kernel branch
    (``reduce``/``norm``), and the conv twin's ``conv2``/``bn2``. Each involution followed by a
    BatchNorm and an activation (the stem's ``inv``/``bn2``/``act2``, a bottleneck's
    ``conv2``/``bn2``/``act2``) becomes an :class:`~involution.ops.Involution2dAffine` that
    applies them inside the fused inference op. Other modules are left as they are, so any model
    built from RedNet's blocks (classifier, ``features_only`` backbone, detection and
    segmentation backbones) folds.

    With ``fuse_relu`` (default), each folded stem and bottleneck (with ReLU activations) is
    replaced by an inference version whose convs apply their ReLU, and the last conv the
    residual add and ReLU, as :class:`ConvAct` post-ops.

    The result computes the same function as ``model.eval()`` within float rounding, with fewer
    passes over memory. It is meant for inference: its affine parameters no longer follow the
    batch statistics, so training it is not training the original model. ``inplace=False``
    (default) leaves ``model`` untouched.
    """
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    # Collect first: the folds replace children while the tree would be walked.
    modules = list(model.modules())
    for module in modules:
        if isinstance(module, RedNetStem):
            _fold_pair(module, "conv1", "bn1")
            _fold_mixer(module, "inv", "bn2", "act2")
            _fold_pair(module, "conv2", "bn3")
        elif isinstance(module, Bottleneck):
            _fold_pair(module, "conv1", "bn1")
            _fold_mixer(module, "conv2", "bn2", "act2")
            _fold_pair(module, "conv3", "bn3")
            downsample = module.downsample
            if isinstance(downsample, nn.Sequential) and len(downsample) == 2:
                _fold_pair(downsample, "0", "1")
    for module in modules:
        if isinstance(module, Involution2d) and _foldable(module.norm):
            module.reduce = fuse_conv_bn_eval(module.reduce, module.norm)
            module.norm = nn.Identity()
    if fuse_relu:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                fused = _fuse_block(child)
                if fused is not child:
                    setattr(parent, name, fused.eval())
    return model
