"""Involution (Li et al., CVPR 2021) and RedNet backbones."""

from involution import functional, models
from involution.functional import involution2d
from involution.modules import Involution2d

__all__ = ["Involution2d", "functional", "involution2d", "models"]
__version__ = "0.1.0"
