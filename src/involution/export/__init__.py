"""Models out of eager PyTorch.

- :mod:`~involution.export.onnx`: ONNX files with dynamic batch and size, checked through
  onnxruntime (``involution export``).

FX symbolic tracing, TorchScript and ``torch.onnx.export`` work on the models directly (see
:class:`involution.ops.Involution2d` and :mod:`involution.ops.lowering`); nothing here is
needed for them. Pictures of the kernels a model generates are in :mod:`involution.visualize`.
Submodules are imported on use: the ONNX one needs the ``onnx`` extra.
"""
