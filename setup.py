"""Builds the C++ CPU kernels (``involution._C``); everything else is in pyproject.toml."""

import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# OpenMP makes at::parallel_for (inlined from the ATen headers) actually run in parallel.
if sys.platform == "win32":
    compile_args, link_args = ["/O2", "/openmp"], []
elif sys.platform == "darwin":
    compile_args, link_args = ["-O3"], []
else:
    compile_args, link_args = ["-O3", "-fopenmp"], ["-fopenmp"]

setup(
    ext_modules=[
        CppExtension(
            "involution._C",
            [
                "src/involution/csrc/involution_cpu.cpp",
                "src/involution/csrc/involution_layer_cpu.cpp",
                "src/involution/csrc/involution_nd_cpu.cpp",
                "src/involution/csrc/involution_regen_cpu.cpp",
                "src/involution/csrc/pool_cpu.cpp",
            ],
            depends=["src/involution/csrc/common.h"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
