"""Models out of eager PyTorch, and a look inside them.

- :mod:`~involution.export.onnx`: ONNX files with dynamic batch and size, checked through
  onnxruntime (``involution export``);
- :mod:`~involution.export.kernels`: the per-pixel kernels an involution model generates on an
  image, and the paper's picture of them (``involution show-kernels``).

FX symbolic tracing, TorchScript and ``torch.onnx.export`` work on the models directly (see
:class:`involution.ops.Involution2d` and :mod:`involution.ops.lowering`); nothing here is
needed for them. Submodules are imported on use: the ONNX one needs the ``onnx`` extra.
"""
