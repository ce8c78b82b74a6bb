"""Test-session setup shared by every test file."""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels are tested in Triton's CPU interpreter. ``triton.jit``
# decides between compiling and interpreting when a kernel is *defined*, i.e. when its module is
# first imported, so the variable must be set here, before any test module imports a kernel;
# it also makes the "triton" backend report itself available for CPU tensors. setdefault keeps
# an explicit choice (e.g. TRITON_INTERPRET=0) from the environment.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One fixed tiling per Triton kernel on a GPU: autotuning every random test shape over all
# candidate tilings would take minutes; the benchmarks exercise the autotuner.
os.environ.setdefault("INVOLUTION_TRITON_AUTOTUNE", "0")
