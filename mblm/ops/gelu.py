"""GELU family: ``gelu_bwd``, the backward of a GELU whose output was not kept for backward.

``torch.ops.mblm.gelu_bwd(grad_act, h) -> (grad_h, act)`` gives in one pass the gradient of h
and the recomputed ``act = gelu(h)`` (exact, erf-based GELU), which a following Linear's weight
gradient needs. Meaning: ``gelu_bwd_ref`` in ``mblm.ops.reference``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mblm.ops import reference
from mblm.ops._common import KERNEL_DTYPES, kernel_device_types, no_kernel_reason, warn_once

__all__ = ["gelu_bwd", "gelu_kernel_ok"]

_KERNEL_DEVICE_TYPES = kernel_device_types("gelu")


def gelu_kernel_ok(h: Tensor) -> bool:
    """True when ``gelu_bwd(..., h)`` runs a kernel (device and dtype)."""
    return h.device.type in _KERNEL_DEVICE_TYPES and h.dtype in KERNEL_DTYPES


def gelu_bwd(grad_act: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_h, act) for ``act = gelu(h)``: ``grad_act * gelu'(h)`` and ``gelu(h)``, h's shape
    and dtype. Not differentiable itself. Devices without a kernel and other dtypes run the
    reference (with a one-time warning)."""
    if not gelu_kernel_ok(h):
        warn_once(
            f"mblm.ops.gelu: {no_kernel_reason('gelu', h.device, h.dtype)}; running the reference"
        )
        return reference.gelu_bwd_ref(grad_act, h)
    return torch.ops.mblm.gelu_bwd.default(grad_act, h)


@torch.library.register_fake("mblm::gelu_bwd")
def _gelu_bwd_fake(grad_act, h):
    torch._check(
        h.dtype in KERNEL_DTYPES,
        lambda: f"mblm: gelu_bwd h must be float64/float32/float16/bfloat16, got dtype {h.dtype}",
    )
    torch._check(
        grad_act.shape == h.shape and grad_act.dtype == h.dtype,
        lambda: f"mblm: gelu_bwd grad_act must have the shape and dtype of h {tuple(h.shape)}",
    )
    out = torch.empty_like(h, memory_format=torch.contiguous_format)
    return out, torch.empty_like(h, memory_format=torch.contiguous_format)
