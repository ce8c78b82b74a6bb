"""Small RedNets for 28-32 px images (Fashion-MNIST, CIFAR), registered with timm.

``rednet_compact`` and ``rednet_compact_conv`` share every layer except the bottlenecks'
spatial mixer (a 7x7 involution vs a 3x3 convolution), so training both with one recipe
tests the paper's claim that involution beats convolution with fewer parameters (at this
scale and budget it did not: see the figures below). Both keep the RedNet stem's involution.

They use the "compact" stem (2x downsampling instead of the official 4x: 28x28 inputs enter
the stages at 14x14, then 7x7 and 4x4) and narrow stages (1/2/1 blocks, 16/32/64 wide,
64/128/256 out). With the default recipe (fashion_mnist.yaml: 3 epochs, no augmentation,
channels_last, one CPU thread) on Fashion-MNIST, measured on a 2-core CPU:

- ``rednet_compact`` (100,660 parameters): 89.55% top-1 / 99.84% top-5 test accuracy,
  891 images/s, 212 s of training;
- ``rednet_compact_conv`` (151,247 parameters): 90.52% / 99.86%, 1,044 images/s, 181 s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from timm.models import generate_default_cfgs, register_model

from involution.models.cfgs import rednet_cfg

if TYPE_CHECKING:
    from involution.models.rednet import RedNet

__all__ = ["COMPACT_ARCH"]

#: Architecture shared by the compact variants (any key can be overridden at creation).
COMPACT_ARCH: dict[str, Any] = {
    "layers": (1, 2, 1),
    "stage_widths": (16, 32, 64),
    "stem_width": 32,
    "stem_type": "compact",
    "in_chans": 1,
    "num_classes": 10,
}


#: The compact variants' timm config: Fashion-MNIST's 1 x 28 x 28 images and 10 classes.
COMPACT_CFG = rednet_cfg(
    num_classes=10,
    input_size=(1, 28, 28),
    pool_size=(4, 4),
    crop_pct=1.0,
    mean=(0.2860,),
    std=(0.3530,),
    origin_url=None,
)


default_cfgs = generate_default_cfgs(
    {"rednet_compact": dict(COMPACT_CFG), "rednet_compact_conv": dict(COMPACT_CFG)}
)


def _create(variant: str, pretrained: bool, mixer: str, **kwargs: Any) -> RedNet:
    # RedNet's builder: its pretrained files go through the project's safe loader. Imported
    # here: importing this module (to register it with timm) must not need rednet's.
    from involution.models.rednet import _create_rednet

    return _create_rednet(variant, pretrained, **{**COMPACT_ARCH, "mixer": mixer, **kwargs})


@register_model
def rednet_compact(pretrained: bool = False, **kwargs: Any) -> RedNet:
    """Compact RedNet for 28x28 grayscale images: (B, 1, 28, 28) -> (B, 10)."""
    return _create("rednet_compact", pretrained, "involution", **kwargs)


@register_model
def rednet_compact_conv(pretrained: bool = False, **kwargs: Any) -> RedNet:
    """The 3x3-convolution twin of :func:`rednet_compact` (same stem, widths and depth)."""
    return _create("rednet_compact_conv", pretrained, "conv", **kwargs)
