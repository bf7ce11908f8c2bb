"""Decode family: attention of a few new positions against a key/value cache.

``torch.ops.mblm.attn_decode`` appends S new positions per row (rotated keys and values) to a
(B, C, H, Dh) cache and returns their causal attention over everything cached in the row: the
Transformer stages' step during cached generation (S = 1), prompt prefill and chunked scoring
(S > 1). Rows may sit at different positions (``lens``) and a call may serve a subset of the
cache's rows (``rows``). Meaning: ``attn_decode_ref`` in ``mblm.ops.reference``.

The op is for inference: it mutates the caches and has no backward (the wrapper raises when q, k
or v require gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mblm.ops import reference
from mblm.ops._common import KERNEL_DTYPES, kernel_device_types, no_kernel_reason, warn_once

__all__ = ["attn_decode"]

_OP = torch.ops.mblm.attn_decode.default  # resolved once: the lookup costs microseconds
_CUDA_MAX_HEAD_DIM = 256  # csrc/cuda/decode.cu: up to 8 head dims per lane of a warp
_KERNEL_DEVICE_TYPES = kernel_device_types("decode")


def attn_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lens: Tensor,
    *,
    rows: Tensor | None = None,
    cos: Tensor | None = None,
    sin: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Writes ``rotary(k)`` and ``v`` (R, S, H, Dh) into the caches (B, C, H, Dh) at positions
    ``lens[r] .. lens[r] + S - 1`` of cache row ``rows[r]`` (row r when ``rows`` is None) and
    returns the attention of the S queries over the row's positions ``0 .. lens[r] + s`` (causal),
    (R, S, H, Dh) in q's dtype. ``lens``/``rows``: (R,) int64 (``lens`` is not updated);
    ``cos``/``sin``: (R, S, Dh) half-split rotary tables of the new positions, or None;
    ``scale`` defaults to ``Dh ** -0.5``. Devices and dtypes without a kernel run the reference
    (with a one-time warning).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(
            "mblm: attn_decode is an inference op (cached decoding) and has no backward; run it "
            "under torch.no_grad() / inference_mode(), or use mblm.ops.attention for training"
        )
    if q.device.type not in _KERNEL_DEVICE_TYPES or q.dtype not in KERNEL_DTYPES:
        reason = no_kernel_reason("decode", q.device, q.dtype)
        warn_once(f"mblm.ops.decode: {reason}; running the PyTorch reference")
        return reference.attn_decode_ref(q, k, v, k_cache, v_cache, lens, rows, cos, sin, scale)
    if q.device.type == "cuda" and q.shape[-1] > _CUDA_MAX_HEAD_DIM:
        warn_once(
            f"mblm.ops.decode: no CUDA attn_decode kernel for head dim {q.shape[-1]} (at most "
            f"{_CUDA_MAX_HEAD_DIM}); running the PyTorch reference"
        )
        return reference.attn_decode_ref(q, k, v, k_cache, v_cache, lens, rows, cos, sin, scale)
    return _OP(q, k, v, k_cache, v_cache, lens, rows, cos, sin, scale)


def _check_fake(q, k, v, k_cache, v_cache, lens, rows, cos, sin) -> None:
    torch._check(
        q.dim() == 4,
        lambda: f"mblm: attn_decode q must have 4 dims (R, S, H, Dh), got {tuple(q.shape)}",
    )
    for name, t in (("k", k), ("v", v)):
        torch._check(
            t.shape == q.shape and t.dtype == q.dtype,
            lambda name=name, t=t: (
                f"mblm: attn_decode {name} must have the shape and dtype of q "
                f"{tuple(q.shape)} {q.dtype}, got {tuple(t.shape)} {t.dtype}"
            ),
        )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        torch._check(
            t.dim() == 4 and t.shape[2:] == q.shape[2:] and t.dtype == q.dtype,
            lambda name=name, t=t: (
                f"mblm: attn_decode {name} must be (B, C, H, Dh) with the H, Dh and dtype of q, "
                f"got {tuple(t.shape)} {t.dtype}"
            ),
        )
    torch._check(
        lens.dim() == 1 and lens.shape[0] == q.shape[0],
        lambda: f"mblm: attn_decode lens must have shape (R,), got {tuple(lens.shape)}",
    )
    if rows is not None:
        torch._check(
            rows.dim() == 1 and rows.shape[0] == q.shape[0],
            lambda: f"mblm: attn_decode rows must have shape (R,), got {tuple(rows.shape)}",
        )
    torch._check(
        (cos is None) == (sin is None),
        lambda: "mblm: attn_decode cos and sin must be given together",
    )


@torch.library.register_fake("mblm::attn_decode")
def _attn_decode_fake(q, k, v, k_cache, v_cache, lens, rows, cos, sin, scale):
    _check_fake(q, k, v, k_cache, v_cache, lens, rows, cos, sin)
    return q.new_empty(q.shape)
