"""CUDA builds: ``__dp4a`` kernels for integer conv2d/dense, dlight for the rest, nvcc checks.

``build_cuda`` is what ``hago.build`` calls for a spec whose target kind is
``cuda``; ``cuda_source``/``nvcc_check``/``export_cuda`` let a machine without
a GPU still prove that the build compiles for the spec's architecture.
"""

from .build import NvccNotFound, build_cuda, cuda_source, export_cuda, kernel_sources, nvcc_check, sm_version
from .dp4a import KERNEL_PREFIX, apply_dp4a, conv2d_kernel, dense_kernel

__all__ = [
    "KERNEL_PREFIX",
    "NvccNotFound",
    "apply_dp4a",
    "build_cuda",
    "conv2d_kernel",
    "cuda_source",
    "dense_kernel",
    "export_cuda",
    "kernel_sources",
    "nvcc_check",
    "sm_version",
]
