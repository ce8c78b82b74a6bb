"""Involution (Li et al., CVPR 2021) and RedNet backbones.

The operator (:mod:`involution.ops`) needs only PyTorch. The RedNet models
(:mod:`involution.models`) need timm and are registered with timm's model registry
(``timm.create_model("rednet50")``) when this package is imported and timm is installed.

Both are imported on first use: ``import involution`` (and the ``involution`` command line,
whose ``--help`` runs in about the time ``import torch`` takes) costs next to nothing until
an attribute is read. The registration with timm happens at once if timm is already
imported, else when timm is imported (a hook on Python's import system that removes itself).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from involution.lazy import lazy_getattr

if TYPE_CHECKING:  # for type checkers and the API reference; imported on first read below
    from involution import models
    from involution.ops import Involution2d, functional, involution2d

__all__ = [
    "Involution1d",
    "Involution2d",
    "Involution3d",
    "functional",
    "involution1d",
    "involution2d",
    "involution3d",
    "models",
]
__version__ = "0.1.0"

# Public names by the module that defines them, imported when first read.
__getattr__ = lazy_getattr(
    __name__,
    {
        "involution.ops": (
            "Involution1d",
            "Involution2d",
            "Involution3d",
            "involution1d",
            "involution2d",
            "involution3d",
        ),
        "involution.ops.functional": ("functional",),
        "involution.models": ("models",),
    },
    globals(),
)


class _RegisterWithTimm(importlib.abc.MetaPathFinder):
    """Registers the RedNets (:func:`involution.models.register_with_timm`) right after timm
    is imported."""

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    """timm's own loader, then the RedNets' registration; timm keeps its loader afterwards."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        importlib.import_module("involution.models").register_with_timm()


if sys.modules.get("timm") is not None:  # None: timm blocked (an import of it fails)
    importlib.import_module("involution.models").register_with_timm()
elif importlib.util.find_spec("timm") is not None:
    sys.meta_path.insert(0, _RegisterWithTimm())
