"""One way to build a model by name and fill it with weights from a file.

:func:`create_model` builds a registered name: a timm model (the RedNets are registered with
timm), ``torchvision:NAME`` (or ``torchvision.NAME``) for a torchvision classifier, or one of
the detection and segmentation models by name (``fasterrcnn_rednet50_fpn``,
``upernet_rednet50``, ...). With ``weights`` it reads a state dict (safetensors, an official
mmcls RedNet checkpoint or a converted one, a ``torch.save`` state dict), sizes a timm model's
classifier and input channels from it, checks every key and shape and loads it.
:func:`load_named_model` does the same and also returns what the model's input looks like
(:class:`LoadedModel`).

A trained run (its config says how the model was built) is loaded one layer up, by
:func:`involution.train.loading.load_model`, which comes back here for names and checkpoints:
models never import the training code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from involution.models.convert import (
    check_state_dict,
    read_rednet_state_dict,
    rednet_from_checkpoint,
)

__all__ = [
    "TORCHVISION_PREFIXES",
    "LoadedModel",
    "create_model",
    "is_known_model",
    "load_checkpoint_model",
    "load_named_model",
    "task_models",
]

#: Prefixes that select a torchvision model instead of a timm one (``torchvision:resnet50``).
TORCHVISION_PREFIXES = ("torchvision:", "torchvision.")


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode, with what its input looks like.

    ``transform`` maps a PIL image to the model's normalised (in_chans, H, W) input, as the
    model was trained or configured; ``input_size`` is that (H, W). Both are ``None`` for a
    model that takes no single fixed-size image (a trained detector or segmenter). ``config``
    and ``classes`` are a trained run's (``None`` for a model built by name).
    """

    model: nn.Module
    name: str
    in_chans: int
    input_size: tuple[int, int] | None
    transform: Callable[[Any], Tensor] | None
    config: Mapping[str, Any] | None = None
    classes: list[str] | None = None


def task_models() -> dict[str, Callable[..., nn.Module]]:
    """The detection and segmentation builders by name: ``builder(num_classes=...)``.

    Imported on call: torchvision's detection package takes a second to import.
    """
    from involution.models.detection import DETECTION_MODELS
    from involution.models.segmentation import SEGMENTATION_MODELS

    return {**SEGMENTATION_MODELS, **DETECTION_MODELS}


def _torchvision_name(name: str) -> str | None:
    """``NAME`` of ``torchvision:NAME`` / ``torchvision.NAME``, else ``None``."""
    for prefix in TORCHVISION_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return None


def is_known_model(name: str) -> bool:
    """A timm model, a torchvision classifier (``torchvision:NAME``) or a task model's name."""
    import timm
    import torchvision

    tv_name = _torchvision_name(name)
    if tv_name is not None:
        return tv_name in torchvision.models.list_models(module=torchvision.models)
    return timm.is_model(name) or name in task_models()


def _sized_from_weights(name: str, state: Mapping[str, Tensor]) -> dict[str, int]:
    """``num_classes`` and ``in_chans`` of timm model ``name`` that fit ``state``'s classifier
    and first conv (no classifier in ``state``: ``num_classes=0``)."""
    import timm

    classifier = timm.models.get_pretrained_cfg_value(name, "classifier") or "fc"
    first_conv = timm.models.get_pretrained_cfg_value(name, "first_conv")
    head = state.get(f"{classifier}.weight")
    sized = {"num_classes": 0 if head is None else head.shape[0]}
    if first_conv and f"{first_conv}.weight" in state:
        sized["in_chans"] = state[f"{first_conv}.weight"].shape[1]
    return sized


def create_model(name: str, weights: str | PathLike | None = None, **kwargs: Any) -> nn.Module:
    """Build registered model ``name`` (in training mode) and load ``weights`` into it.

    Args:
        name: a timm model, ``torchvision:NAME`` / ``torchvision.NAME``, or a detection or
            segmentation model (:func:`task_models`).
        weights: a state-dict file (safetensors, official or converted RedNet checkpoint,
            ``torch.save`` state dict); a timm model's ``num_classes`` and ``in_chans`` are
            read off it unless given in ``kwargs``.
        kwargs: the builder's arguments (``num_classes``, ``in_chans``, ...).

    Raises ``ValueError`` for an unknown name, :class:`~involution.models.convert.
    CheckpointMismatchError` (a ``ValueError``) for weights that do not fit, and
    ``FileNotFoundError`` for a missing file.
    """
    import timm

    state = None if weights is None else read_rednet_state_dict(weights)
    tv_name = _torchvision_name(name)
    if tv_name is not None:
        import torchvision

        if not is_known_model(name):
            raise ValueError(f"unknown model {name!r} (not a torchvision classifier)")
        model = torchvision.models.get_model(tv_name, **kwargs)
    elif timm.is_model(name):
        sized = {} if state is None else _sized_from_weights(name, state)
        model = timm.create_model(name, **{**sized, **kwargs})
    elif name in task_models():
        model = task_models()[name](**kwargs)
    else:
        raise ValueError(
            f"unknown model {name!r} (not a timm, torchvision:NAME or detection/segmentation "
            f"model); RedNets: {', '.join(timm.list_models('rednet*'))}"
        )
    if state is not None:
        check_state_dict(state, model)
        model.load_state_dict(state)
    return model


def _timm_input(
    model: nn.Module, in_chans: int | None = None
) -> tuple[int, tuple[int, int], Callable[[Any], Tensor]]:
    """(in_chans, (H, W), evaluation transform) of a timm model, from its pretrained config
    (a model built without one: timm's defaults, with ``in_chans`` channels when given)."""
    import timm.data

    args = {} if in_chans is None else {"in_chans": in_chans}
    data_config = timm.data.resolve_data_config(args, model=model)
    in_chans, height, width = data_config["input_size"]
    return in_chans, (height, width), timm.data.create_transform(**data_config)


def load_named_model(
    name: str, weights: str | PathLike | None = None, **kwargs: Any
) -> LoadedModel:
    """:func:`create_model` in eval mode, with its input (from timm's data config for a timm
    model; other models are taken to read 3-channel images of no fixed size)."""
    import timm

    model = create_model(name, weights, **kwargs).eval()
    if _torchvision_name(name) is None and timm.is_model(name):
        in_chans, size, transform = _timm_input(model)
        return LoadedModel(model, name, in_chans, size, transform)
    return LoadedModel(model, name, kwargs.get("in_chans", 3), None, None)


def load_checkpoint_model(path: str | PathLike, **kwargs: Any) -> LoadedModel:
    """The RedNet an official or converted checkpoint describes, loaded, in eval mode
    (:func:`~involution.models.convert.rednet_from_checkpoint`; ``kwargs`` override the
    architecture read off the tensors)."""
    model = rednet_from_checkpoint(path, **kwargs).eval()
    in_chans, size, transform = _timm_input(model, model.stem.conv1.in_channels)
    return LoadedModel(model, Path(path).stem, in_chans, size, transform)
