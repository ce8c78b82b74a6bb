"""Pictures of what a model computes.

- :mod:`~involution.visualize.kernels`: the per-pixel kernels an involution model generates on
  an image, and the paper's picture of them (``involution show-kernels``).

Submodules are imported on use: they need matplotlib.
"""
