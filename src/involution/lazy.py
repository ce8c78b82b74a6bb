"""Module attributes imported on first read (PEP 562), for the package ``__init__`` files.

A package lists its public names by the module that defines them; reading one imports that
module then, not when the package is imported, so that ``import involution`` and the command
line's ``--help`` stay quick. This module imports nothing from the package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

__all__ = ["lazy_getattr"]


def lazy_getattr(
    package: str, exports: Mapping[str, tuple[str, ...]], namespace: MutableMapping[str, Any]
) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps a module to the names it
    defines; a name that is the module's own last component is the module itself
    (``{"involution.models": ("models",)}``). The value read is stored in ``namespace`` (the
    package's ``globals()``), so each name is looked up once."""
    modules = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        loaded = importlib.import_module(module)
        value = loaded if module.endswith(f".{name}") else getattr(loaded, name)
        namespace[name] = value
        return value

    return __getattr__
