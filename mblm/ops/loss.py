"""Loss family: the public ``cross_entropy`` wrapper, fake (meta) impls and the autograd formula.

``torch.ops.mblm.cross_entropy_fwd`` / ``cross_entropy_bwd``: per-row cross entropy of (R, V)
logits, one pass over the logits each way; only the per-row log-sum-exp is kept for backward.
Meaning: ``cross_entropy_ref`` in ``mblm.ops.reference``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mblm.ops import reference
from mblm.ops._common import KERNEL_DTYPES, kernel_device_types, no_kernel_reason, warn_once

__all__ = ["cross_entropy", "cross_entropy_kernel_ok"]

_KERNEL_DEVICE_TYPES = kernel_device_types("loss")


def cross_entropy_kernel_ok(logits: Tensor) -> bool:
    """True when ``cross_entropy(logits, ...)`` runs a kernel (device and dtype)."""
    return logits.device.type in _KERNEL_DEVICE_TYPES and logits.dtype in KERNEL_DTYPES


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100) -> Tensor:
    """``F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")`` for
    (R, V) logits and (R,) int64 targets: (R,) in logits' dtype, 0 on ignored rows.
    Differentiable in logits. Devices without a kernel and other dtypes run the reference (with
    a one-time warning)."""
    if not cross_entropy_kernel_ok(logits):
        reason = no_kernel_reason("loss", logits.device, logits.dtype)
        warn_once(f"mblm.ops.loss: {reason}; running the reference")
        return reference.cross_entropy_ref(logits, target, ignore_index)[0]
    return torch.ops.mblm.cross_entropy_fwd.default(logits, target, int(ignore_index))[0]


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_fake(logits: Tensor, target: Tensor) -> None:
    torch._check(
        logits.dim() == 2,
        lambda: f"mblm: cross_entropy logits must have 2 dims (R, V), got {tuple(logits.shape)}",
    )
    torch._check(
        logits.dtype in KERNEL_DTYPES,
        lambda: (
            f"mblm: cross_entropy logits must be float64/float32/float16/bfloat16, got {logits.dtype}"
        ),
    )
    torch._check(
        target.dim() == 1 and target.shape[0] == logits.shape[0],
        lambda: (
            f"mblm: cross_entropy target must have shape (R,) = ({logits.shape[0]},), got {tuple(target.shape)}"
        ),
    )
    torch._check(
        target.dtype == torch.int64,
        lambda: f"mblm: cross_entropy target must be int64, got {target.dtype}",
    )


@torch.library.register_fake("mblm::cross_entropy_fwd")
def _cross_entropy_fwd_fake(logits, target, ignore_index):
    _check_fake(logits, target)
    rows = logits.shape[0]
    return logits.new_empty((rows,)), logits.new_empty((rows,), dtype=_stat_dtype(logits.dtype))


@torch.library.register_fake("mblm::cross_entropy_bwd")
def _cross_entropy_bwd_fake(grad_loss, logits, target, lse, ignore_index):
    _check_fake(logits, target)
    torch._check(
        grad_loss.shape == (logits.shape[0],) and lse.shape == (logits.shape[0],),
        lambda: (
            f"mblm: cross_entropy grad_loss and lse must have shape (R,) = ({logits.shape[0]},)"
        ),
    )
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context_fwd(ctx, inputs, output):
    logits, target, ignore_index = inputs
    _, lse = output
    ctx.save_for_backward(logits, target, lse)
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(lse)


def _backward_fwd(ctx, grad_loss, grad_lse):
    """cross_entropy_bwd (no double backward)."""
    logits, target, lse = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    grad = torch.ops.mblm.cross_entropy_bwd.default(
        grad_loss, logits, target, lse, ctx.ignore_index
    )
    return grad, None, None


torch.library.register_autograd(
    "mblm::cross_entropy_fwd", _backward_fwd, setup_context=_setup_context_fwd
)
