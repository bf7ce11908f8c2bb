"""Scan family (Mamba1 selective scan): public wrappers, fake (meta) impls and the autograd formula.

``torch.ops.mblm.scan_fwd`` runs the recurrence of ``selective_scan_ref`` and also returns the
state at the start of every chunk of ``SCAN_CHUNK`` steps; ``scan_bwd`` recomputes each chunk's
states from those checkpoints, so what backward keeps is O(L / SCAN_CHUNK * D * N) per sequence
rather than O(L * D * N). ``scan_update`` advances a state by one step, in place (decoding).

Layout: any strides are accepted. Outputs shaped like a (B, X, L) input are laid out like it:
(B, L, X)-contiguous and returned transposed when the input is channel-contiguous
(``stride(1) < stride(2)``, the transposes of (B, L, X) activations the Mamba block passes), else
(B, X, L)-contiguous; the channel-contiguous case is read and written without copies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mblm.ops import reference
from mblm.ops._common import KERNEL_DTYPES, kernel_device_types, no_kernel_reason, warn_once

__all__ = ["SCAN_CHUNK", "selective_scan", "selective_scan_step", "selective_scan_step_"]

# Steps per checkpoint of scan_fwd (csrc/include/mblm/scan.h: kScanChunk).
SCAN_CHUNK = 64

# Largest state size N the CUDA kernels take (csrc/include/mblm/scan_params.h: kScanMaxStateCuda).
_CUDA_MAX_STATE = 64

_KERNEL_DEVICE_TYPES = kernel_device_types("scan")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fallback_reason(u: Tensor, A: Tensor) -> str | None:
    if u.device.type not in _KERNEL_DEVICE_TYPES:
        return no_kernel_reason("scan", u.device, u.dtype)
    if u.dtype not in KERNEL_DTYPES:
        return f"no kernel for dtype {u.dtype}"
    if u.device.type == "cuda":
        if u.dtype == torch.float64:
            return "the CUDA kernels take float32/float16/bfloat16"
        if A.dim() == 2 and A.shape[1] > _CUDA_MAX_STATE:
            return f"the CUDA kernels take state sizes N <= {_CUDA_MAX_STATE}"
    return None


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mamba1 selective scan (mamba_ssm's ``selective_scan_fn``); meaning: ``selective_scan_ref``.

    u, delta, z: (B, D, L); A: (D, N); B, C: (B, N, L); D, delta_bias: (D,); initial_state:
    (B, D, N) or None for zeros. u, delta, z, B, C share one dtype; A, D, delta_bias are float32
    (or float64 with float64 u). Returns y (B, D, L) in u's dtype and the final state (B, D, N) in
    the compute dtype (float32; float64 for float64 u). Differentiable w.r.t. every tensor,
    including initial_state; gradients flow into the final state too (chunked training).
    """
    reason = _fallback_reason(u, A)
    if reason is not None:
        warn_once(f"mblm.ops.scan: {reason}; running the PyTorch reference")
        # on a GPU, the chunked parallel form rather than a loop over steps
        ref = (
            reference.selective_scan_chunked_ref
            if u.device.type == "cuda"
            else reference.selective_scan_ref
        )
        return ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    y, final_state, _ = torch.ops.mblm.scan_fwd.default(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state
    )
    return y, final_state


def selective_scan_step_(
    state: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """One step of the scan, updating ``state`` (B, D, N) in place; returns y (B, D) in u's dtype.

    u, delta, z: (B, D); B, C: (B, N); A, D, delta_bias as in ``selective_scan``. The state may be
    any floating dtype (math in float32, float64 for float64 u). Not differentiable.
    """
    reason = _fallback_reason(u, A)
    if reason is not None:
        warn_once(f"mblm.ops.scan: {reason}; running the PyTorch reference")
        y, new_state = _step_ref(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        state.copy_(new_state)
        return y
    return torch.ops.mblm.scan_update.default(
        state, u, delta, A, B, C, D, z, delta_bias, delta_softplus
    )


def selective_scan_step(
    state: Tensor | None,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """Functional step: returns (y (B, D) in u's dtype, new state (B, D, N) in the compute dtype);
    ``state`` (None = zeros) is left unchanged. Differentiable (through ``selective_scan`` with
    L = 1) when grad mode is on and any input requires grad."""
    tensors = (state, u, delta, A, B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _one_step(selective_scan, state, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    cdt = _compute_dtype(u.dtype)
    if state is None:
        new_state = u.new_zeros((u.shape[0], u.shape[1], A.shape[1]), dtype=cdt)
    else:
        new_state = state.to(dtype=cdt, copy=True, memory_format=torch.contiguous_format)
    y = selective_scan_step_(new_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return y, new_state


def _one_step(scan, state, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """``scan`` (``selective_scan`` or its reference) over the single step of (B, D) / (B, N)
    inputs, as a sequence of length 1; returns (y (B, D), final state)."""
    y, new_state = scan(
        u[..., None],
        delta[..., None],
        A,
        B[..., None],
        C[..., None],
        D,
        None if z is None else z[..., None],
        delta_bias,
        delta_softplus,
        state,
    )
    return y[..., 0], new_state


def _step_ref(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return _one_step(
        reference.selective_scan_ref, state, u, delta, A, B, C, D, z, delta_bias, delta_softplus
    )


# ---------------------------------------------------------------------------------------------
# fakes
# ---------------------------------------------------------------------------------------------


def _empty_like_layout(t: Tensor, dtype: torch.dtype) -> Tensor:
    """The kernels' output layout for a (B, X, L) input (csrc/ops/scan.cpp: scan_empty_like)."""
    b, x, length = t.shape
    if t.stride(1) < t.stride(2):
        return t.new_empty((b, length, x), dtype=dtype).transpose(1, 2)
    return t.new_empty((b, x, length), dtype=dtype)


def _check_fake(u, delta, A, B, C, D, z, delta_bias, initial_state):
    torch._check(u.dim() == 3, lambda: f"mblm: scan u must have 3 dims (B, D, L), got {u.shape}")
    torch._check(A.dim() == 2, lambda: f"mblm: scan A must have 2 dims (D, N), got {A.shape}")
    named = (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z))
    for name, t in (*named, ("delta_bias", delta_bias), ("initial_state", initial_state)):
        if t is not None:
            torch._check(
                t.device == u.device,
                lambda name=name, t=t: f"mblm: scan {name} is on {t.device} but u is on {u.device}",
            )
    b, d, length = u.shape
    n = A.shape[1]
    torch._check(A.shape[0] == d, lambda: f"mblm: scan A must have shape (D, N), got {A.shape}")
    for name, t in (("delta", delta), ("z", z)):
        if t is not None:
            torch._check(
                t.shape == u.shape and t.dtype == u.dtype,
                lambda name=name, t=t: (
                    f"mblm: scan {name} must match u {u.shape} {u.dtype}, got {t.shape} {t.dtype}"
                ),
            )
    for name, t in (("B", B), ("C", C)):
        torch._check(
            t.shape == (b, n, length) and t.dtype == u.dtype,
            lambda name=name, t=t: (
                f"mblm: scan {name} must have shape (B, N, L) = "
                f"{(b, n, length)} and dtype {u.dtype}, got {t.shape} {t.dtype}"
            ),
        )
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            torch._check(
                t.shape == (d,), lambda name=name, t=t: f"mblm: scan {name} must be (D,), {t.shape}"
            )
    if initial_state is not None:
        torch._check(
            initial_state.shape == (b, d, n),
            lambda: f"mblm: scan initial_state must be (B, D, N), got {initial_state.shape}",
        )


@torch.library.register_fake("mblm::scan_fwd")
def _scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    _check_fake(u, delta, A, B, C, D, z, delta_bias, initial_state)
    b, d, length = u.shape
    n = A.shape[1]
    cdt = _compute_dtype(u.dtype)
    chunks = (length + SCAN_CHUNK - 1) // SCAN_CHUNK
    y = _empty_like_layout(u, u.dtype)
    return y, u.new_empty((b, d, n), dtype=cdt), u.new_empty((b, chunks, n, d), dtype=cdt)


@torch.library.register_fake("mblm::scan_bwd")
def _scan_bwd_fake(
    grad_y,
    grad_final_state,
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    delta_softplus,
    initial_state,
    checkpoints,
):
    _check_fake(u, delta, A, B, C, D, z, delta_bias, initial_state)
    torch._check(grad_y.shape == u.shape, lambda: "mblm: scan_bwd grad_y must have u's shape")

    def none_grad():
        return u.new_empty((0,))

    return (
        _empty_like_layout(u, u.dtype),
        _empty_like_layout(delta, u.dtype),
        A.new_empty(A.shape),
        _empty_like_layout(B, u.dtype),
        _empty_like_layout(C, u.dtype),
        none_grad() if D is None else D.new_empty(D.shape),
        none_grad() if z is None else _empty_like_layout(z, u.dtype),
        none_grad() if delta_bias is None else delta_bias.new_empty(delta_bias.shape),
        none_grad() if initial_state is None else initial_state.new_empty(initial_state.shape),
    )


@torch.library.register_fake("mblm::scan_update")
def _scan_update_fake(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    torch._check(u.dim() == 2, lambda: f"mblm: scan_update u must be (B, D), got {u.shape}")
    torch._check(
        state.dim() == 3 and state.shape[:2] == u.shape,
        lambda: f"mblm: scan_update state must be (B, D, N), got {state.shape}",
    )
    return u.new_empty(u.shape)


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------


def _setup_context_scan_fwd(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state = inputs
    _, _, checkpoints = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints)
    ctx.delta_softplus = delta_softplus
    ctx.mark_non_differentiable(checkpoints)


def _backward_scan_fwd(ctx, grad_y, grad_final_state, grad_checkpoints):
    """scan_bwd (no double backward)."""
    u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(u)
    elif grad_y.dtype != u.dtype:
        grad_y = grad_y.to(u.dtype)
    if grad_final_state is not None:
        grad_final_state = grad_final_state.to(_compute_dtype(u.dtype))
    grads = torch.ops.mblm.scan_bwd.default(
        grad_y,
        grad_final_state,
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        ctx.delta_softplus,
        initial_state,
        checkpoints,
    )
    g_u, g_delta, g_A, g_B, g_C, g_D, g_z, g_bias, g_init = grads
    needs = ctx.needs_input_grad
    return (
        g_u if needs[0] else None,
        g_delta if needs[1] else None,
        g_A if needs[2] else None,
        g_B if needs[3] else None,
        g_C if needs[4] else None,
        g_D if D is not None and needs[5] else None,
        g_z if z is not None and needs[6] else None,
        g_bias if delta_bias is not None and needs[7] else None,
        None,
        g_init if initial_state is not None and needs[9] else None,
    )


torch.library.register_autograd(
    "mblm::scan_fwd", _backward_scan_fwd, setup_context=_setup_context_scan_fwd
)
