"""The one front door to a model with weights: a run, a weights file or a registered name.

:func:`load_model` is what ``eval``, ``predict``, ``export``, ``show-kernels`` and ``bench``
call. It sits at the config layer because a trained run's weights say how to build the model
only through the run's config and task (``CLI -> config -> builders -> engine``): a trained
model is built by its task (:func:`load_trained_model`), a name or an official/converted
checkpoint by :mod:`involution.models.loading`, which needs no training code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from involution.models.convert import CONVERTED_KEY
from involution.models.loading import LoadedModel, load_checkpoint_model, load_named_model
from involution.train import checkpoint as ckpt

if TYPE_CHECKING:
    from involution.train.config import Config

__all__ = ["LoadedModel", "load_model", "load_trained_model"]


def load_trained_model(
    weights: str | PathLike, config_path: str | PathLike | None, overrides: Sequence[str]
) -> tuple[nn.Module, Config, list[str] | None, int]:
    """A trained model with ``weights`` (a run's safetensors) loaded, in eval mode, its config,
    and (from the file's metadata when present) the class names and input channels.

    The config is ``config_path`` if given, else the one stored in the weights' metadata;
    ``overrides`` (``KEY=VALUE``) apply to it. Raises ``ValueError`` for weights that carry no
    config when none is given, or that do not fit the config's model; a pickle in place of the
    safetensors file is refused unread.
    """
    tensors, metadata = ckpt.load_weights(Path(weights))
    return _build_trained(weights, tensors, metadata, config_path, overrides)


def _build_trained(
    weights: str | PathLike,
    tensors: dict[str, Tensor],
    metadata: dict[str, str],
    config_path: str | PathLike | None,
    overrides: Sequence[str],
) -> tuple[nn.Module, Config, list[str] | None, int]:
    from involution.train.config import load_config
    from involution.train.tasks import get_task

    if config_path is not None:
        config = load_config(config_path, list(overrides))
    elif "config" in metadata:
        import yaml

        config = load_config(None, list(overrides), base=yaml.safe_load(metadata["config"]))
    else:
        raise ValueError(f"{weights} carries no training config: pass --config")
    classes = json.loads(metadata["classes"]) if "classes" in metadata else None
    in_chans = int(metadata.get("in_chans", 3))
    task = get_task(config["task"])
    if classes is None:
        classes = task.build_data(config, train=False).classes
    model = task.build_model(config, classes, in_chans)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not fit model {config['model']['name']!r}: missing keys "
            f"{missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    return model.eval(), config, classes, in_chans


def _load_weights_file(
    path: Path, config_path: str | PathLike | None, overrides: Sequence[str], **model_kwargs: Any
) -> LoadedModel:
    """A run's safetensors weights (with ``config_path`` or the config in their metadata), or a
    converted RedNet checkpoint (``involution convert``: the architecture in the metadata)."""
    tensors, metadata = ckpt.load_weights(path)
    if config_path is None and "config" not in metadata and CONVERTED_KEY in metadata:
        return load_checkpoint_model(path, **model_kwargs)
    model, config, classes, in_chans = _build_trained(
        path, tensors, metadata, config_path, overrides
    )
    size, transform = None, None
    if config["task"] == "classification":
        from involution.datasets.classification import build_transform

        side = config["data"]["image_size"]
        size, transform = (side, side), build_transform(config, train=False, channels=in_chans)
    name = config["model"]["name"]
    return LoadedModel(model, name, in_chans, size, transform, config, classes)


def load_model(
    *,
    run: str | PathLike | None = None,
    weights: str | PathLike | None = None,
    name: str | None = None,
    config: str | PathLike | None = None,
    overrides: Sequence[str] = (),
    **model_kwargs: Any,
) -> LoadedModel:
    """The model that ``run``, ``weights`` or ``name`` (+ ``weights``) names, in eval mode.

    Args:
        run: a training run directory: its final weights, config and class names.
        weights: alone, a safetensors file: a run's weights (with their config in the
            metadata, or ``config``) or a converted RedNet checkpoint (``involution
            convert``); a pickle is refused unread. With ``name``: that model's weights in
            any format of :func:`involution.models.loading.create_model` (an official mmcls
            ``.pth`` included).
        name: a registered model (timm, ``torchvision:NAME``, detection or segmentation
            model), see :func:`involution.models.loading.create_model`.
        config, overrides: the training config of a run's weights (default: the stored one)
            and ``KEY=VALUE`` overrides of it.
        model_kwargs: the builder's arguments for ``name`` (``num_classes``, ...), or RedNet
            arguments overriding what a converted checkpoint says.
    """
    given = (run is not None, name is not None, weights is not None and name is None)
    if sum(given) != 1:
        raise ValueError("give one of: a run directory, a weights file, a model name")
    if name is not None:
        return load_named_model(name, weights, **model_kwargs)
    if run is not None:
        run_dir = Path(run)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{run_dir} is not a training run directory")
        weights = run_dir / ckpt.WEIGHTS_NAME
    return _load_weights_file(Path(weights), config, overrides, **model_kwargs)
