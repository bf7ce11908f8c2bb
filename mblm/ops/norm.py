"""Norm family: the public ``rms_norm`` wrapper, fake (meta) impls and the autograd formula.

``torch.ops.mblm.rms_norm_fwd`` / ``rms_norm_bwd`` compute MEGABYTE's RMSNorm, optionally over
the token-shifted input, in one memory pass each: the backward needs only x (alive anyway as the
residual stream) and the per-row RMS, never a shifted or normalised copy. Meaning:
``rms_norm_ref`` / ``token_shift_ref`` in ``mblm.ops.reference``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mblm.ops import reference
from mblm.ops._common import KERNEL_DTYPES, kernel_device_types, no_kernel_reason, warn_once

__all__ = ["rms_norm", "rms_norm_kernel_ok"]

_KERNEL_DEVICE_TYPES = kernel_device_types("norm")


def rms_norm_kernel_ok(x: Tensor, g: Tensor) -> bool:
    """True when ``rms_norm(x, g, ...)`` runs a kernel: a kernel device, a kernel dtype, and g
    of x's dtype."""
    return x.device.type in _KERNEL_DEVICE_TYPES and x.dtype in KERNEL_DTYPES and g.dtype == x.dtype


def rms_norm(
    x: Tensor, g: Tensor, *, scale: float | None = None, eps: float = 1e-8, shift: bool = False
) -> Tensor:
    """``u / max(scale * ||u||_2, eps) * g`` over the last axis, u = token_shift(x) if ``shift``
    else x (token shift: the last floor(D / 2) features move one position down axis -2).

    x: (..., D), at least (S, D) with shift; g: (D,) of x's dtype and device; ``scale``
    defaults to ``D ** -0.5``. Returns x's shape and dtype; differentiable in x and g. Devices
    without a kernel and other dtypes run the reference (with a one-time warning).
    """
    if scale is None:
        scale = x.shape[-1] ** -0.5
    if x.device.type not in _KERNEL_DEVICE_TYPES or x.dtype not in KERNEL_DTYPES:
        warn_once(
            f"mblm.ops.norm: {no_kernel_reason('norm', x.device, x.dtype)}; running the reference"
        )
        return reference.rms_norm_ref(x, g, scale, eps, shift)[0]
    return torch.ops.mblm.rms_norm_fwd.default(x, g, float(scale), float(eps), shift)[0]


def _check_fake(x: Tensor, g: Tensor, scale: float, eps: float, shift: bool) -> None:
    min_dims = 2 if shift else 1
    torch._check(
        x.dim() >= min_dims,
        lambda: f"mblm: rms_norm x must have at least {min_dims} dims, got shape {tuple(x.shape)}",
    )
    torch._check(
        x.dtype in KERNEL_DTYPES,
        lambda: f"mblm: rms_norm x must be float64/float32/float16/bfloat16, got dtype {x.dtype}",
    )
    torch._check(
        g.dim() == 1 and g.shape[0] == x.shape[-1],
        lambda: f"mblm: rms_norm g must have shape (D,) = ({x.shape[-1]},), got {tuple(g.shape)}",
    )
    torch._check(
        g.dtype == x.dtype,
        lambda: f"mblm: rms_norm g has dtype {g.dtype} but x has dtype {x.dtype}",
    )
    torch._check(
        g.device == x.device, lambda: f"mblm: rms_norm g is on {g.device} but x is on {x.device}"
    )
    torch._check(scale > 0, lambda: f"mblm: rms_norm scale must be finite and > 0, got {scale}")
    torch._check(eps >= 0, lambda: f"mblm: rms_norm eps must be finite and >= 0, got {eps}")


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("mblm::rms_norm_fwd")
def _rms_norm_fwd_fake(x, g, scale, eps, shift):
    _check_fake(x, g, scale, eps, shift)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, x.new_empty(x.shape[:-1], dtype=_stat_dtype(x.dtype))


@torch.library.register_fake("mblm::rms_norm_bwd")
def _rms_norm_bwd_fake(grad_y, x, g, rms, scale, eps, shift):
    _check_fake(x, g, scale, eps, shift)
    torch._check(
        grad_y.shape == x.shape,
        lambda: (
            f"mblm: rms_norm grad_y must have the shape of x {tuple(x.shape)}, got {tuple(grad_y.shape)}"
        ),
    )
    torch._check(
        grad_y.dtype == x.dtype,
        lambda: f"mblm: rms_norm grad_y has dtype {grad_y.dtype} but x has dtype {x.dtype}",
    )
    torch._check(
        rms.shape == x.shape[:-1] and rms.dtype == _stat_dtype(x.dtype),
        lambda: f"mblm: rms_norm rms must have shape x.shape[:-1] = {tuple(x.shape[:-1])}",
    )
    return torch.empty_like(x, memory_format=torch.contiguous_format), g.new_empty(g.shape)


def _setup_context_fwd(ctx, inputs, output):
    x, g, scale, eps, shift = inputs
    _, rms = output
    ctx.save_for_backward(x, g, rms)
    ctx.scale, ctx.eps, ctx.shift = scale, eps, shift
    ctx.mark_non_differentiable(rms)


def _backward_fwd(ctx, grad_y, grad_rms):
    """rms_norm_bwd (no double backward)."""
    x, g, rms = ctx.saved_tensors
    grad_x, grad_g = torch.ops.mblm.rms_norm_bwd.default(
        grad_y, x, g, rms, ctx.scale, ctx.eps, ctx.shift
    )
    needs = ctx.needs_input_grad
    return grad_x if needs[0] else None, grad_g if needs[1] else None, None, None, None


torch.library.register_autograd(
    "mblm::rms_norm_fwd", _backward_fwd, setup_context=_setup_context_fwd
)
