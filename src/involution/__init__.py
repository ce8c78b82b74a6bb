"""Involution (Li et al., CVPR 2021) and RedNet backbones.

The operator (:mod:`involution.ops`) needs only PyTorch. The RedNet models
(:mod:`involution.models`) need timm and are imported, and registered with timm's model
registry (``timm.create_model("rednet50")``), only when timm is installed.
"""

import importlib.util

from involution.ops import Involution2d, functional, involution2d

__all__ = ["Involution2d", "functional", "involution2d"]
__version__ = "0.1.0"

if importlib.util.find_spec("timm") is not None:
    from involution import models  # registers the RedNets with timm

    __all__ += ["models"]
