"""RedNet (Li et al., CVPR 2021): a ResNet whose 3x3 convolutions are replaced by involutions.

The layout follows the official mmcls ``RedNet`` (d-li14/involution) so its checkpoints convert
by renaming keys (see :mod:`involution.models.convert`), and the class follows timm's model
interface so ``timm.create_model("rednet50", features_only=True, ...)`` works.

Annotations here are evaluated (no ``from __future__ import annotations``): torch.fx writes the
forward's argument annotations into the code it generates, and TorchScript (scripting a traced
model, as timm's FX feature extractor does) cannot resolve postponed, string annotations.
"""

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import create_classifier, is_exportable, register_notrace_module
from timm.models import (
    build_model_with_cfg,
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
)
from timm.models._features import feature_take_indices  # not re-exported by timm.models
from torch import Tensor, nn

from involution.models.cfgs import rednet_cfg
from involution.models.pooling import (
    StemMaxPool2d,
    norm_relu_max_pool,
    norm_relu_max_pool_applies,
)
from involution.ops.modules import OFFICIAL_KEY_PREFIXES as OFFICIAL_INVOLUTION_PREFIXES
from involution.ops.modules import Involution2d, relu_inplace
from involution.ops.regenerate_norm_act import involution_norm_act
from involution.ops.regenerate_stem import StemModules, involution_stem
from involution.serialization import load_tensor_file

__all__ = ["MODEL_DEPTHS", "Bottleneck", "RedNet", "RedNetArch", "RedNetStem", "conv3x3"]

# timm's FX tracers (features_only with feature_cls="fx", its FX model tests) keep each
# involution as one module call, so the traced model runs exactly the eager layer (including
# its fused inference op). Plain torch.fx and torchvision's tracers record the op as one call
# (torch.fx.wrap in involution.ops.modules) after the kernel branch.
register_notrace_module(Involution2d)

NormFactory = Callable[[int], nn.Module]
ActFactory = Callable[[], nn.Module]
#: A bottleneck's or the stem's spatial layer, called as ``mixer_layer(channels, stride=s)``
#: for a (B, C, H, W) -> (B, C, ceil(H / s), ceil(W / s)) module: e.g.
#: ``partial(Involution2d, kernel_size=7, group_channels=16)`` or :func:`conv3x3`.
MixerFactory = Callable[..., nn.Module]

#: Blocks per stage of the official RedNet depths.
MODEL_DEPTHS: dict[int, tuple[int, int, int, int]] = {
    26: (1, 2, 4, 1),
    38: (2, 3, 5, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}

#: Stages are named ``layer1`` .. ``layer4`` as in the official mmcls RedNet (1 to 4 stages).
MAX_STAGES = 4
STEM_TYPES = ("deep", "compact")
MIXERS = ("involution", "conv")

#: Official mmcls ``backbone.stem.<i>`` children (mmcv ``ConvModule`` = conv + bn) -> ours.
OFFICIAL_STEM_PREFIXES: dict[str, str] = {
    "stem.0.conv.": "stem.conv1.",
    "stem.0.bn.": "stem.bn1.",
    "stem.1.": "stem.inv.",
    "stem.2.": "stem.bn2.",
    "stem.4.conv.": "stem.conv2.",
    "stem.4.bn.": "stem.bn3.",
}
_OFFICIAL_BLOCK_KEY = re.compile(
    r"layer\d+\.\d+\.(conv[13]|bn[123]|downsample\.[01])\.\w+"
    r"|layer\d+\.\d+\.conv2\.(?P<inv>.+)"
)


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def official_key_to_ours(key: str) -> str | None:
    """Our state-dict key for an official mmcls RedNet key, or ``None`` if it has none.

    ``backbone.`` is dropped, the stem's Sequential indices become names, ``head.fc`` becomes
    ``fc``, and each involution's ``conv1.conv``/``conv1.bn``/``conv2.conv`` become
    ``reduce``/``norm``/``span`` (blocks keep the official ``conv1``/``bn1``/.../``downsample``).
    """
    if key.startswith("head.fc."):
        return key[len("head.") :]
    if not key.startswith("backbone."):
        return None
    key = key[len("backbone.") :]
    for official, ours in OFFICIAL_STEM_PREFIXES.items():
        if key.startswith(official):
            key = ours + key[len(official) :]
            return _rename_involution(key, "stem.inv.") if ours == "stem.inv." else key
    match = _OFFICIAL_BLOCK_KEY.fullmatch(key)
    if match is None:
        return None
    if match.group("inv") is None:
        return key
    return _rename_involution(key, key[: match.start("inv")])


def _rename_involution(key: str, module_prefix: str) -> str | None:
    """``<module_prefix>conv1.conv.weight`` -> ``<module_prefix>reduce.weight`` and so on."""
    rest = key[len(module_prefix) :]
    for official, ours in OFFICIAL_INVOLUTION_PREFIXES.items():
        if rest.startswith(official):
            return module_prefix + ours + rest[len(official) :]
    return None


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """timm ``pretrained_filter_fn``: accept official mmcls checkpoints as well as ours.

    Official keys (``backbone.*``, ``head.fc.*``) are renamed; keys without a counterpart are
    kept unchanged so that timm's strict loading reports them.
    """
    if not any(key.startswith(("backbone.", "head.")) for key in state_dict):
        return state_dict
    return {official_key_to_ours(key) or key: value for key, value in state_dict.items()}


def conv3x3(channels: int, stride: int = 1) -> nn.Conv2d:
    """The convolution twin's spatial layer: a bias-free 3x3 conv, ``channels`` in and out."""
    return nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)


def _involution(channels: int, exportable: bool, **kwargs: Any) -> Involution2d:
    """An :class:`Involution2d` (``kwargs``: its arguments) with its ``exportable`` switch set."""
    layer = Involution2d(channels, **kwargs)
    layer.exportable = exportable
    return layer


class RedNetStem(nn.Module):
    """conv3x3 -> BN -> ReLU -> involution -> BN -> ReLU -> conv3x3 -> BN -> ReLU.

    The first conv has stride 2 in both stem types; only the "deep" (official) stem is followed
    by a max-pool. The max-pool that follows the official stem lives in
    ``RedNet.maxpool`` so that this module's output is the official ``backbone.stem`` output.

    Args:
        in_chans, stem_width: input channels and output channels.
        mixer_layer: factory of the middle layer (RedNet's: an :class:`Involution2d`), called
            as ``mixer_layer(stem_width // 2, stride=1)``.
        stride: of the first conv.
        norm_layer, act_layer: normalisation and activation factories (BatchNorm2d, in-place
            ReLU).

    Shape:
        (B, in_chans, H, W) -> (B, stem_width, H / 2, W / 2).
    """

    def __init__(
        self,
        in_chans: int,
        stem_width: int,
        mixer_layer: MixerFactory,
        stride: int = 2,
        norm_layer: NormFactory = nn.BatchNorm2d,
        act_layer: ActFactory = relu_inplace,
    ) -> None:
        super().__init__()
        mid = stem_width // 2
        self.conv1 = nn.Conv2d(in_chans, mid, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(mid)
        self.act1 = act_layer()
        self.inv = mixer_layer(mid, stride=1)
        self.bn2 = norm_layer(mid)
        self.act2 = act_layer()
        self.conv2 = nn.Conv2d(mid, stem_width, 3, padding=1, bias=False)
        self.bn3 = norm_layer(stem_width)
        self.act3 = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        return self.act3(self.bn3(self._convolved(x)))

    def _convolved(self, x: Tensor) -> Tensor:
        """conv1 .. conv2: in training, in one op that keeps only the stem's input for backward
        where that applies (involution_stem), else the involution's BatchNorm + ReLU in its own
        (involution_norm_act)."""
        # TorchScript compiles only the modules (a bare is_scripting() test skips the rest).
        if torch.jit.is_scripting():
            x = self.act2(self.bn2(self.inv(self.act1(self.bn1(self.conv1(x))))))
            return self.conv2(x)
        modules = (self.conv1, self.bn1, self.act1, self.inv, self.bn2, self.act2)
        return involution_stem(StemModules(*modules, self.conv2), x)

    @torch.jit.unused
    def forward_pooled(self, x: Tensor, pool: nn.Module) -> Tensor:
        """``pool(self(x))``, in ``x``'s layout. Where
        :func:`~involution.models.pooling.norm_relu_max_pool_applies` (CPU training), the stem
        has no hooks and its involution fuses its own BatchNorm + ReLU (``regenerate_kernels``
        and ``fuse_norm_act``: the switches of the stem's other training ops turn this off
        too), the stem runs in channels_last, whose convs and involution kernels are faster on
        CPU, and ``bn3``, ``act3`` and the pool in one op that returns ``x``'s layout."""
        fused = (
            getattr(self.inv, "regenerate_kernels", False)
            and getattr(self.inv, "fuse_norm_act", False)
            and not (self._forward_hooks or self._forward_pre_hooks)
            # A first check on the image, before the convs; the op's input is checked below.
            and norm_relu_max_pool_applies(self.bn3, self.act3, pool, x)
        )
        if not fused:
            return pool(self(x))
        layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last
        z = self._convolved(x.contiguous(memory_format=torch.channels_last))
        if norm_relu_max_pool_applies(self.bn3, self.act3, pool, z):
            return norm_relu_max_pool(self.bn3, pool, z, layout == torch.channels_last)
        return pool(self.act3(self.bn3(z))).contiguous(memory_format=layout)


class Bottleneck(nn.Module):
    """ResNet bottleneck (expansion 4) with the spatial layer as ``conv2``: an involution or a conv.

    Args:
        in_chs: input channels.
        width: channels of the spatial layer; the block outputs ``4 * width``.
        stride: of the spatial layer and the shortcut.
        mixer_layer: factory of the spatial layer, called as ``mixer_layer(width, stride=s)``:
            an involution (the default, :class:`Involution2d` with its defaults) or
            :func:`conv3x3` for the convolution twin.
        norm_layer, act_layer: normalisation and activation factories (BatchNorm2d, in-place
            ReLU).

    Shape:
        (B, in_chs, H, W) -> (B, 4 * width, ceil(H / stride), ceil(W / stride)).
    """

    expansion = 4

    def __init__(
        self,
        in_chs: int,
        width: int,
        stride: int = 1,
        mixer_layer: MixerFactory = Involution2d,
        norm_layer: NormFactory = nn.BatchNorm2d,
        act_layer: ActFactory = relu_inplace,
    ) -> None:
        super().__init__()
        out_chs = width * self.expansion
        self.conv1 = nn.Conv2d(in_chs, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.act1 = act_layer()
        self.conv2 = mixer_layer(width, stride=stride)
        self.bn2 = norm_layer(width)
        self.act2 = act_layer()
        self.conv3 = nn.Conv2d(width, out_chs, 1, bias=False)
        self.bn3 = norm_layer(out_chs)
        self.act3 = act_layer()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), norm_layer(out_chs)
            )

    def zero_init_last(self) -> None:
        """Start the residual branch at zero so each block begins as (nearly) the identity; not
        with a frozen norm (e.g. FrozenBatchNorm2d: a weight that is a buffer would stay 0)."""
        if isinstance(getattr(self.bn3, "weight", None), nn.Parameter):
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        if torch.jit.is_scripting():  # as in RedNetStem.forward
            x = self.act2(self.bn2(self.conv2(x)))
        else:
            x = involution_norm_act(self.conv2, self.bn2, self.act2, x)
        x = self.bn3(self.conv3(x))
        x += shortcut  # in place, like the ReLUs: one activation-sized allocation less per block
        return self.act3(x)


@dataclass(frozen=True)
class RedNetArch:
    """A RedNet's architecture: its stages, stem and spatial layers.

    The fields are the flat keyword arguments that ``timm.create_model("rednet50", ...)``, the
    det/seg backbones, the converted checkpoints' metadata and run configs use; they are checked
    here, once. :meth:`split` takes them out of such a mapping.

    Args:
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for RedNet-50 (1 to 4 stages).
        stage_widths: bottleneck widths per stage; stage outputs are 4x these.
        stem_width: stem output channels (the stem involution has ``stem_width // 2``).
        stem_type: "deep" (official: stride-2 conv and 3x3/2 max-pool, 4x downsampling) or
            "compact" (stride-2 conv, no max-pool: 2x downsampling, for 28-32 px images).
        stem_kernel_size: K of the stem involution (3 in the classifier, 7 in det/seg backbones).
        mixer: "involution", or "conv" for the 3x3-convolution twin (a plain ResNet; the stem
            keeps its involution).
        kernel_size, group_channels, reduction_ratio: of the bottleneck involutions.
        backend: involution backend, see :func:`involution.ops.involution2d`.
        fused: fuse each involution's span conv into the aggregation (opt-in), see
            :class:`involution.Involution2d`; same state dict.
        exportable: involutions in standard operators only (``Involution2d.exportable``);
            ``None`` follows timm's layer config (``timm.layers.set_layer_config(exportable=True)``)
            when the model is built.
    """

    layers: tuple[int, ...]
    stage_widths: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: int = 64
    stem_type: str = "deep"
    stem_kernel_size: int = 3
    mixer: str = "involution"
    kernel_size: int = 7
    group_channels: int = 16
    reduction_ratio: int = 4
    backend: str = "auto"
    fused: bool = False
    exportable: bool | None = None

    def __post_init__(self) -> None:
        layers, widths = tuple(self.layers), tuple(self.stage_widths)
        if not layers or not all(_is_int(n, 1) for n in layers + widths):
            raise ValueError(
                "layers and stage_widths must be non-empty sequences of positive ints, "
                f"got {layers} and {widths}"
            )
        if len(layers) > MAX_STAGES:
            raise ValueError(f"RedNet has 1 to {MAX_STAGES} stages, got layers={layers}")
        if len(layers) != len(widths):
            raise ValueError(f"layers has {len(layers)} stages but stage_widths has {len(widths)}")
        if self.stem_type not in STEM_TYPES:
            raise ValueError(f"stem_type must be one of {STEM_TYPES}, got {self.stem_type!r}")
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {self.mixer!r}")
        if not _is_int(self.stem_width, 2) or self.stem_width % 2:
            raise ValueError(f"stem_width must be an even int >= 2, got {self.stem_width}")
        # Lists from YAML/JSON configs: tuples, so that the frozen architecture hashes.
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "stage_widths", widths)

    @classmethod
    def split(cls, kwargs: Mapping[str, Any]) -> tuple["RedNetArch", dict[str, Any]]:
        """(the architecture, the other arguments) of flat keyword arguments, ``layers``
        required: e.g. ``dict(layers=(3, 4, 6, 3), stem_width=32, num_classes=10)`` ->
        ``(RedNetArch((3, 4, 6, 3), stem_width=32), dict(num_classes=10))``."""
        if "layers" not in kwargs:
            raise ValueError(f"RedNet needs layers (blocks per stage), got {sorted(kwargs)}")
        names = {field.name for field in fields(cls)}
        arch = cls(**{key: value for key, value in kwargs.items() if key in names})
        return arch, {key: value for key, value in kwargs.items() if key not in names}


class RedNet(nn.Module):
    """RedNet classifier / backbone with timm's model interface.

    Children, in forward order (timm's ``FeatureListNet`` relies on it): ``stem``
    (:class:`RedNetStem`), ``maxpool``, ``layer1`` .. ``layer4``, ``global_pool``, ``fc``.

    Args:
        arch: the architecture (:class:`RedNetArch`), or just its ``layers``, blocks per stage
            (e.g. ``MODEL_DEPTHS[50]``), with the other fields at their defaults.
            ``timm.create_model`` and :meth:`from_kwargs` take its fields as flat keyword
            arguments.
        num_classes: classifier outputs; 0 gives a backbone whose ``fc`` is the identity.
        in_chans: input image channels.
        drop_rate: dropout before the classifier.
        global_pool: timm pooling type ("avg", "max", "avgmax", "" for none, ...).
        norm_layer, act_layer: normalisation and activation factories (BatchNorm2d, in-place
            ReLU).
        zero_init_last: zero-initialise each block's last BN.

    Works with ``torch.jit.script``, ``torch.fx`` symbolic tracing (timm's and torchvision's
    feature extraction), ``torch.compile``, ``torch.export`` and ``torch.onnx.export``.

    Shape:
        (B, in_chans, H, W) -> logits (B, num_classes); ``forward_features`` gives
        (B, 4 * stage_widths[-1], H / 32, W / 32) with the deep stem (H / 16 compact).
    """

    def __init__(
        self,
        arch: RedNetArch | Sequence[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        norm_layer: NormFactory = nn.BatchNorm2d,
        act_layer: ActFactory = relu_inplace,
        zero_init_last: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(arch, RedNetArch):
            arch = RedNetArch(tuple(arch))
        if not _is_int(num_classes, 0):
            raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")

        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        deep = arch.stem_type == "deep"
        # The layer factories, built once: the stem keeps an involution in the conv twin too.
        involution = partial(
            _involution,
            exportable=is_exportable() if arch.exportable is None else arch.exportable,
            group_channels=arch.group_channels,
            reduction_ratio=arch.reduction_ratio,
            norm_layer=norm_layer,
            act_layer=act_layer,
            backend=arch.backend,
            fused=arch.fused,
        )
        mixer_layer = (
            partial(involution, kernel_size=arch.kernel_size)
            if arch.mixer == "involution"
            else conv3x3
        )
        block = partial(
            Bottleneck, mixer_layer=mixer_layer, norm_layer=norm_layer, act_layer=act_layer
        )
        stem_width = arch.stem_width
        self.stem = RedNetStem(
            in_chans,
            stem_width,
            partial(involution, kernel_size=arch.stem_kernel_size),
            norm_layer=norm_layer,
            act_layer=act_layer,
        )
        reduction = 2
        self.feature_info: list[dict[str, Any]] = [
            dict(num_chs=stem_width, reduction=reduction, module="stem")
        ]
        self.maxpool = StemMaxPool2d() if deep else nn.Identity()
        reduction *= 2 if deep else 1

        in_chs = stem_width
        for index, (depth, width) in enumerate(zip(arch.layers, arch.stage_widths, strict=True)):
            stride = 1 if index == 0 else 2
            reduction *= stride
            blocks = []
            for block_index in range(depth):
                blocks.append(block(in_chs, width, stride=stride if block_index == 0 else 1))
                in_chs = width * Bottleneck.expansion
            name = f"layer{index + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=name))
        self.stage_names = [f"layer{i + 1}" for i in range(len(arch.layers))]

        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(in_chs, num_classes, pool_type=global_pool)
        self.init_weights(zero_init_last=zero_init_last)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> "RedNet":
        """A RedNet from flat keyword arguments: :class:`RedNetArch`'s fields (``layers``
        required) and this class's other arguments."""
        arch, rest = RedNetArch.split(kwargs)
        return cls(arch, **rest)

    def init_weights(self, zero_init_last: bool = True) -> None:
        """Kaiming-normal (fan_out) convs with zero bias, BN weight 1 / bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_last:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    module.zero_init_last()

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Parameter groups for timm's layer-wise tools (stem, then stages or blocks)."""
        return dict(
            stem=r"^stem|^maxpool",
            blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)",
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass to save memory."""
        self.grad_checkpointing = enable

    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh ``num_classes``-way linear layer (0: identity)."""
        if not _is_int(num_classes, 0):
            raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        parameter = next(self.parameters())
        self.global_pool, self.fc = create_classifier(
            self.num_features,
            num_classes,
            pool_type=global_pool,
            device=parameter.device,
            dtype=parameter.dtype,
        )
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def _stage(self, name: str, x: Tensor) -> Tensor:
        stage = getattr(self, name)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)
        return stage(x)

    @torch.jit.unused
    def _stem_pooled(self, x: Tensor) -> Tensor:
        """``maxpool(stem(x))``; in training the stem's tail and the pool in one op
        (:meth:`RedNetStem.forward_pooled`) unless the stem was replaced (e.g. folded for
        inference)."""
        if isinstance(self.stem, RedNetStem):
            return self.stem.forward_pooled(x, self.maxpool)
        return self.maxpool(self.stem(x))

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> last-stage feature map (B, num_features, H / 32, W / 32)."""
        # TorchScript runs the modules (_stem_pooled is not compiled).
        x = self.maxpool(self.stem(x)) if torch.jit.is_scripting() else self._stem_pooled(x)
        if torch.jit.is_scripting():
            # TorchScript cannot getattr a computed name: the (at most four) stages by name.
            x = self.layer1(x)
            if hasattr(self, "layer2"):
                x = self.layer2(x)
            if hasattr(self, "layer3"):
                x = self.layer3(x)
            if hasattr(self, "layer4"):
                x = self.layer4(x)
        else:
            for name in self.stage_names:
                x = self._stage(name, x)
        return x

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's intermediate-feature API: the outputs of ``feature_info``'s modules.

        Index 0 is the stem (before the max-pool), 1..N the stages. ``indices``: all if
        ``None``, the last n if an int, else the listed ones. ``norm`` is accepted for timm
        compatibility (RedNet has no final norm). Returns the intermediates, preceded by the
        final feature map unless ``intermediates_only``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"RedNet only produces NCHW features, got output_fmt={output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        x = self.stem(x)
        intermediates = [x] if 0 in take_indices else []
        x = self.maxpool(x)
        names = self.stage_names[:max_index] if stop_early else self.stage_names
        for index, name in enumerate(names, start=1):
            x = self._stage(name, x)
            if index in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last one :meth:`forward_intermediates` returns for
        ``indices`` (and the head), for timm's ``features_only`` getter; returns the indices.

        ``prune_norm`` is accepted for timm compatibility (RedNet has no final norm).
        """
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for name in self.stage_names[max_index:]:
            setattr(self, name, nn.Identity())
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool, dropout and classify: (B, num_features, h, w) -> (B, num_classes)."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _create_rednet(variant: str, pretrained: bool = False, **kwargs: Any) -> RedNet:
    """Build a registered variant through timm (pretrained loading, ``features_only``).

    A ``pretrained_cfg_overlay`` file is first read with the project's loader (weights only,
    or safetensors), so a pickle carrying code is refused with its message whatever timm's
    own loader allows (timm 1.0 reads it with ``weights_only=True`` afterwards).
    """
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and overlay.get("file"):
        load_tensor_file(overlay["file"])
    arch, kwargs = RedNetArch.split(kwargs)
    # features_only: the stem and every stage by default (timm's default, 0..4, assumes four).
    feature_cfg = {
        "out_indices": tuple(range(len(arch.layers) + 1)),
        **(kwargs.pop("feature_cfg", None) or {}),
    }
    return build_model_with_cfg(
        RedNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        arch=arch,
        **kwargs,
    )


# No hosted weights: convert the official checkpoints with ``involution convert`` and load the
# result with ``pretrained=True, pretrained_cfg_overlay=dict(file=...)``.
default_cfgs = generate_default_cfgs({f"rednet{depth}": rednet_cfg() for depth in MODEL_DEPTHS})


#: Parameters (millions, 1000 classes) of each official depth, for its entrypoint's docstring.
PARAMS_M = {26: 9.23, 38: 12.39, 50: 15.54, 101: 25.65, 152: 33.98}


def _register_depth(depth: int) -> Callable[..., RedNet]:
    """Register timm entrypoint ``rednet{depth}`` (timm needs a function per model name: this
    makes one per row of :data:`MODEL_DEPTHS`, as a ``@register_model`` function would be)."""
    variant = f"rednet{depth}"

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> RedNet:
        return _create_rednet(variant, pretrained, layers=MODEL_DEPTHS[depth], **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__doc__ = f"RedNet-{depth}, {PARAMS_M[depth]:.2f}M parameters."
    return register_model(entrypoint)


# rednet26, rednet38, rednet50, rednet101, rednet152 (timm reads default_cfgs[name] above).
globals().update({f"rednet{depth}": _register_depth(depth) for depth in MODEL_DEPTHS})
