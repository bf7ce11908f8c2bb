"""Shared rules of the op wrappers: when a kernel runs and the one-time fallback warning."""

from __future__ import annotations

import functools
import warnings

import torch

from mblm.ops._loader import cuda_kernels_available

KERNEL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def warn_once(message: str) -> None:
    """Warns once per process and message (the fallback rule of design §3)."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def kernel_device_ok(device: torch.device) -> bool:
    """True when a compiled kernel exists for ``device`` (CPU always; CUDA if it was built)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return cuda_kernels_available()
    return device.type == "meta"
