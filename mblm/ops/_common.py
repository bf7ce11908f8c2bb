"""Shared rules of the op wrappers: when a kernel runs and the one-time fallback warning."""

from __future__ import annotations

import functools
import os
import warnings

import torch

from mblm.ops._loader import cuda_kernels_available

KERNEL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def warn_once(message: str) -> None:
    """Warns once per process and message (the fallback rule of design §3)."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)


# Op families whose CUDA kernels have passed their tests on a GPU (an H100 with torch 2.11): only
# these run by default on CUDA. The others are built but not trusted until a GPU session proves
# them (tools/gpu_check.sh runs them through MBLM_CUDA_UNPROVEN=1); until then their wrappers run
# the PyTorch fallback on CUDA, with a one-time warning that says so.
CUDA_PROVEN_FAMILIES = frozenset({"attention", "patch"})
CUDA_FAMILIES = (
    "attention", "attention_kv", "decode", "patch", "conv", "scan", "ssd", "norm", "loss", "gelu",
)  # fmt: skip


def cuda_family_enabled(family: str) -> bool:
    """Whether the wrappers of ``family`` use its CUDA kernels: proven ones always; the others
    when MBLM_CUDA_UNPROVEN is "1" or names the family (comma-separated)."""
    if family in CUDA_PROVEN_FAMILIES:
        return True
    opt_in = os.environ.get("MBLM_CUDA_UNPROVEN", "").strip()
    return opt_in == "1" or family in {f.strip() for f in opt_in.split(",")}


def kernel_device_ok(device: torch.device, family: str | None = None) -> bool:
    """True when a compiled kernel exists for ``device`` (CPU always; CUDA if it was built) and,
    for CUDA, ``family``'s kernels are enabled (see ``cuda_family_enabled``)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return cuda_kernels_available() and (family is None or cuda_family_enabled(family))
    return device.type == "meta"


def kernel_device_types(family: str) -> frozenset[str]:
    """The device types whose kernels ``family``'s wrappers use, decided once (at import): the
    wrappers then read only static properties of their inputs, so they trace under
    torch.compile(fullgraph=True)."""
    return frozenset(
        t for t in ("cpu", "cuda", "meta") if kernel_device_ok(torch.device(t), family)
    )


def no_kernel_reason(family: str, device: torch.device, dtype: torch.dtype) -> str:
    """Why ``family``'s wrapper falls back for a tensor on ``device`` of ``dtype``."""
    if device.type == "cuda" and cuda_kernels_available() and not cuda_family_enabled(family):
        return (
            f"the CUDA kernels of mblm.ops.{family} have not passed their tests on a GPU yet "
            f"(MBLM_CUDA_UNPROVEN={family} uses them)"
        )
    return f"no kernel for {dtype} on {device}"
