"""Attention family: the public ``attention`` wrapper, fake (meta) impls and the autograd formula.

``torch.ops.mblm.attn_fwd`` / ``attn_bwd`` compute multi-head attention where every head has its
own K and V (the MEGABYTE stages), with an optional half-split rotary embedding applied to q and
k, causal or bidirectional. Meaning: ``attention_ref`` / ``rotary_half_ref`` in
``mblm.ops.reference``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mblm.ops import reference
from mblm.ops._common import KERNEL_DTYPES, kernel_device_types, no_kernel_reason, warn_once

__all__ = ["attention", "attention_kv"]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    cos: Tensor | None = None,
    sin: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Multi-head attention of (N, S, H, Dh) q, k, v; returns (N, S, H, Dh) in q's dtype.

    q, k, v may be any views with a contiguous last dimension (e.g. k and v the two halves of
    one ``to_kv`` output). ``scale`` defaults to ``Dh ** -0.5``. ``cos``/``sin`` (S, Dh) apply
    the half-split rotary embedding to q and k. With ``dropout_p > 0`` and ``training``, dropout
    is applied to the attention probabilities (MEGABYTE's ``Attend``); that case, devices
    without a kernel and unsupported dtypes run the reference (with a one-time warning).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if dropout_p > 0.0 and training:
        warn_once("mblm.ops.attention: attention dropout runs the PyTorch reference (no kernel)")
        return _attention_dropout_ref(q, k, v, cos, sin, causal, scale, dropout_p)
    reason = _fallback_reason(q, cos, sin)
    if reason is not None:
        warn_once(f"mblm.ops.attention: {reason}; running the PyTorch reference")
        return reference.attention_ref(q, k, v, cos, sin, causal, scale)[0]
    out, _ = torch.ops.mblm.attn_fwd.default(q, k, v, cos, sin, causal, scale)
    return out


def attention_kv(
    q: Tensor,
    kv: Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    cos: Tensor | None = None,
    sin: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """``attention(q, kv[:, :, 0], kv[:, :, 1], ...)`` with k and v packed as kv (N, S, 2, H, Dh)
    (e.g. ``to_kv(x).unflatten(-1, (2, H, Dh))``, a view). The same result; the gradient of kv
    comes as one packed tensor, so the projection's gradient needs no concatenation.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if (
        (dropout_p > 0.0 and training)
        or q.device.type not in _KV_KERNEL_DEVICE_TYPES
        or _fallback_reason(q, cos, sin) is not None
    ):
        return attention(
            q,
            kv.select(2, 0),
            kv.select(2, 1),
            causal=causal,
            scale=scale,
            cos=cos,
            sin=sin,
            dropout_p=dropout_p,
            training=training,
        )
    out, _ = torch.ops.mblm.attn_kv_fwd.default(q, kv, cos, sin, causal, scale)
    return out


_KERNEL_DEVICE_TYPES = kernel_device_types("attention")
# The packed-kv kernels (attn_kv_*) are their own family on CUDA: until proven there,
# attention_kv runs the proven attn_* kernels on views of kv.
_KV_KERNEL_DEVICE_TYPES = kernel_device_types("attention_kv")


def _fallback_reason(q: Tensor, cos: Tensor | None, sin: Tensor | None) -> str | None:
    if q.device.type not in _KERNEL_DEVICE_TYPES or q.dtype not in KERNEL_DTYPES:
        return no_kernel_reason("attention", q.device, q.dtype)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (cos, sin)):
        return "gradients w.r.t. cos/sin are not computed by the kernel"
    return None


def _attention_dropout_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor | None,
    sin: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
) -> Tensor:
    """``attention_ref`` with dropout on the probabilities (after the softmax, before P.V)."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = (t.to(cdt) for t in (q, k, v))
    if cos is not None and sin is not None:
        qc, kc = reference.rotary_half_ref(qc, cos, sin), reference.rotary_half_ref(kc, cos, sin)
    scores = torch.einsum("nihd,njhd->nhij", qc, kc) * scale
    if causal:
        s = scores.shape[-1]
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.nn.functional.dropout(scores.softmax(dim=-1), p=dropout_p, training=True)
    return torch.einsum("nhij,njhd->nihd", probs, vc).to(q.dtype)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_fake_like_q(name: str, t: Tensor, q: Tensor) -> None:
    torch._check(
        t.dim() == 4, lambda: f"mblm: attention {name} must have 4 dims, got {tuple(t.shape)}"
    )
    torch._check(
        t.dtype == q.dtype,
        lambda: f"mblm: attention {name} has dtype {t.dtype} but q has {q.dtype}",
    )
    torch._check(
        t.shape == q.shape,
        lambda: (
            f"mblm: attention {name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}"
        ),
    )


def _check_fake_qkv(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor | None, sin: Tensor | None
) -> None:
    torch._check(
        q.dim() == 4,
        lambda: f"mblm: attention q must have 4 dims (N, S, H, Dh), got {tuple(q.shape)}",
    )
    _check_fake_like_q("k", k, q)
    _check_fake_like_q("v", v, q)
    torch._check(
        (cos is None) == (sin is None), lambda: "mblm: attention cos and sin must be given together"
    )
    if cos is not None and sin is not None:
        for t in (cos, sin):
            torch._check(
                t.shape == (q.shape[1], q.shape[3]),
                lambda: (
                    f"mblm: attention cos/sin must have shape (S, Dh), got {tuple(cos.shape)}, {tuple(sin.shape)}"
                ),
            )


@torch.library.register_fake("mblm::attn_fwd")
def _attn_fwd_fake(q, k, v, cos, sin, causal, scale):
    _check_fake_qkv(q, k, v, cos, sin)
    n, s, h, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((n, h, s), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("mblm::attn_bwd")
def _attn_bwd_fake(grad_out, q, k, v, out, lse, cos, sin, causal, scale):
    _check_fake_qkv(q, k, v, cos, sin)
    _check_fake_like_q("grad_out", grad_out, q)
    _check_fake_like_q("out", out, q)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context_attn_fwd(ctx, inputs, output):
    q, k, v, cos, sin, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cos, sin)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward_attn_fwd(ctx, grad_out, grad_lse):
    """attn_bwd (no double backward); cos and sin get no gradient (the wrapper falls back to the
    reference when they require one)."""
    q, k, v, out, lse, cos, sin = ctx.saved_tensors
    grad_q, grad_k, grad_v = torch.ops.mblm.attn_bwd.default(
        grad_out.contiguous(), q, k, v, out, lse, cos, sin, ctx.causal, ctx.scale
    )
    needs = ctx.needs_input_grad
    return (
        grad_q if needs[0] else None,
        grad_k if needs[1] else None,
        grad_v if needs[2] else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "mblm::attn_fwd", _backward_attn_fwd, setup_context=_setup_context_attn_fwd
)


def _check_fake_kv(q: Tensor, kv: Tensor) -> None:
    torch._check(
        kv.dim() == 5 and kv.shape[2] == 2,
        lambda: f"mblm: attention kv must have 5 dims (N, S, 2, H, Dh), got {tuple(kv.shape)}",
    )
    torch._check(
        q.dim() == 4 and kv.shape[:2] == q.shape[:2] and kv.shape[3:] == q.shape[2:],
        lambda: (
            f"mblm: attention kv must have shape (N, S, 2, H, Dh) for q of shape {tuple(q.shape)}, "
            f"got {tuple(kv.shape)}"
        ),
    )


@torch.library.register_fake("mblm::attn_kv_fwd")
def _attn_kv_fwd_fake(q, kv, cos, sin, causal, scale):
    _check_fake_kv(q, kv)
    return _attn_fwd_fake(q, kv.select(2, 0), kv.select(2, 1), cos, sin, causal, scale)


@torch.library.register_fake("mblm::attn_kv_bwd")
def _attn_kv_bwd_fake(grad_out, q, kv, out, lse, cos, sin, causal, scale):
    _check_fake_kv(q, kv)
    _check_fake_qkv(q, kv.select(2, 0), kv.select(2, 1), cos, sin)
    _check_fake_like_q("grad_out", grad_out, q)
    _check_fake_like_q("out", out, q)
    return q.new_empty(q.shape), kv.new_empty(kv.shape)


def _setup_context_attn_kv_fwd(ctx, inputs, output):
    q, kv, cos, sin, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, kv, out, lse, cos, sin)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward_attn_kv_fwd(ctx, grad_out, grad_lse):
    """attn_kv_bwd (no double backward); cos and sin get no gradient."""
    q, kv, out, lse, cos, sin = ctx.saved_tensors
    grad_q, grad_kv = torch.ops.mblm.attn_kv_bwd.default(
        grad_out.contiguous(), q, kv, out, lse, cos, sin, ctx.causal, ctx.scale
    )
    needs = ctx.needs_input_grad
    return (
        grad_q if needs[0] else None,
        grad_kv if needs[1] else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "mblm::attn_kv_fwd", _backward_attn_kv_fwd, setup_context=_setup_context_attn_kv_fwd
)
