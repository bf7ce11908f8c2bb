"""SSD family: the Mamba2 state-space-dual scan (``ssd_scan``), its decode step (``ssd_step_`` /
``ssd_step``), fake (meta) impls and the autograd formula.

``torch.ops.mblm.ssd_fwd`` / ``ssd_bwd`` / ``ssd_update`` compute mamba_ssm's
``mamba_chunk_scan_combined`` (without z and seq_idx) and its ``selective_state_update``. Meaning:
``ssd_ref`` in ``mblm.ops.reference``. The forward saves the state entering every block of
``CHECKPOINT_STEPS`` steps; the backward recomputes from those, so memory stays
O(L / CHECKPOINT_STEPS * H * P * N).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mblm.ops import reference
from mblm.ops._common import KERNEL_DTYPES, kernel_device_types, no_kernel_reason, warn_once

__all__ = ["CHECKPOINT_STEPS", "ssd_scan", "ssd_step", "ssd_step_"]

# Steps between two saved states (kSsdCheckpointSteps in csrc/include/mblm/ssd.h).
CHECKPOINT_STEPS = 256

_KERNEL_DEVICE_TYPES = kernel_device_types("ssd")


def _fallback_reason(x: Tensor) -> str | None:
    if x.device.type not in _KERNEL_DEVICE_TYPES:
        return no_kernel_reason("ssd", x.device, x.dtype)
    if x.dtype not in KERNEL_DTYPES:
        return f"no kernel for dtype {x.dtype}"
    return None


# ---------------------------------------------------------------------------------------------
# public wrappers
# ---------------------------------------------------------------------------------------------


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The Mamba2 scan over a whole sequence; arguments and results as ``ssd_ref``.

    x (B, L, H, P); dt (B, L, H); A (H,); B, C (B, L, G, N), head h reading group
    h // (H / G); D (H,) or (H, P) or None; dt_bias (H,) or None; initial_state (B, H, P, N) or
    None. Per head: S_t = exp(d_t A) S_{t-1} + d_t x_t B_t^T, y_t = S_t C_t + D x_t with
    d = softplus?(dt + dt_bias). Returns y (B, L, H, P) in x's dtype and the final state
    (B, H, P, N) in float32 (float64 for float64 x). Differentiable w.r.t. every tensor,
    gradients of the final state included. Inputs may be strided views (a contiguous last
    dimension is read in place).
    """
    reason = _fallback_reason(x)
    if reason is not None:
        warn_once(f"mblm.ops.ssd: {reason}; running the PyTorch reference")
        # on a GPU, the chunked form (batched matrix products) rather than a loop over steps
        ref = reference.ssd_chunked_ref if x.device.type == "cuda" else reference.ssd_ref
        return ref(x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state)
    y, final_state, _ = torch.ops.mblm.ssd_fwd.default(
        x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state
    )
    return y, final_state


def ssd_step_(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> Tensor:
    """One decode step, advancing ``state`` (B, H, P, N) in place.

    x (B, H, P); dt (B, H); B, C (B, G, N); A, D, dt_bias as ``ssd_scan``. ``state`` is float32
    (float64 for float64 x) or x's dtype. Returns y (B, H, P) in x's dtype; equals one step of
    ``ssd_scan`` from ``state``. Not differentiable (use ``ssd_step``).
    """
    reason = _fallback_reason(x)
    if reason is not None:
        warn_once(f"mblm.ops.ssd: {reason}; running the PyTorch reference")
        y, new_state = reference.ssd_ref(
            x[:, None], dt[:, None], A, B[:, None], C[:, None], D, dt_bias, dt_softplus, state
        )
        state.copy_(new_state)
        return y[:, 0]
    return torch.ops.mblm.ssd_update.default(state, x, dt, A, B, C, D, dt_bias, dt_softplus)


def ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """Functional ``ssd_step_``: returns (y (B, H, P), new_state in state's dtype) and leaves
    ``state`` unchanged. Differentiable (through a one-step ``ssd_scan``) when any input requires
    grad."""
    tensors = (state, x, dt, A, B, C, D, dt_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y, new_state = ssd_scan(
            x[:, None], dt[:, None], A, B[:, None], C[:, None], D, dt_bias, dt_softplus, state
        )
        return y[:, 0], new_state.to(state.dtype)
    new_state = state.clone(memory_format=torch.contiguous_format)
    y = ssd_step_(new_state, x, dt, A, B, C, D, dt_bias, dt_softplus)
    return y, new_state


# ---------------------------------------------------------------------------------------------
# fake (meta) implementations
# ---------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_fake_scan(x, dt, A, B, C, D, dt_bias, initial_state) -> None:
    torch._check(
        x.dim() == 4, lambda: f"mblm: ssd x must have 4 dims (B, L, H, P), got {tuple(x.shape)}"
    )
    batch, length, heads, headdim = x.shape
    torch._check(
        dt.shape == (batch, length, heads),
        lambda: f"mblm: ssd dt must have shape (B, L, H), got {tuple(dt.shape)}",
    )
    torch._check(
        A.shape == (heads,), lambda: f"mblm: ssd A must have shape (H,), got {tuple(A.shape)}"
    )
    torch._check(
        B.dim() == 4 and B.shape[:2] == (batch, length),
        lambda: f"mblm: ssd B must have shape (B, L, G, N), got {tuple(B.shape)}",
    )
    torch._check(
        C.shape == B.shape, lambda: f"mblm: ssd C must have the shape of B, got {tuple(C.shape)}"
    )
    torch._check(
        B.dtype == x.dtype and C.dtype == x.dtype,
        lambda: f"mblm: ssd B and C must have x's dtype {x.dtype}",
    )
    torch._check(
        B.shape[2] >= 1 and heads % B.shape[2] == 0,
        lambda: f"mblm: ssd the number of groups G = B.size(2) must divide H = {heads}",
    )
    if D is not None:
        torch._check(
            D.shape == (heads,) or D.shape == (heads, headdim),
            lambda: f"mblm: ssd D must have shape (H,) or (H, P), got {tuple(D.shape)}",
        )
    if dt_bias is not None:
        torch._check(
            dt_bias.shape == (heads,),
            lambda: f"mblm: ssd dt_bias must have shape (H,), got {tuple(dt_bias.shape)}",
        )
    if initial_state is not None:
        torch._check(
            initial_state.shape == (batch, heads, headdim, B.shape[3]),
            lambda: (
                f"mblm: ssd initial_state must have shape (B, H, P, N), got "
                f"{tuple(initial_state.shape)}"
            ),
        )


@torch.library.register_fake("mblm::ssd_fwd")
def _ssd_fwd_fake(x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state):
    _check_fake_scan(x, dt, A, B, C, D, dt_bias, initial_state)
    batch, length, heads, headdim = x.shape
    dstate = B.shape[3]
    cdt = _compute_dtype(x.dtype)
    chunks = (length + CHECKPOINT_STEPS - 1) // CHECKPOINT_STEPS
    y = x.new_empty(x.shape)
    final_state = x.new_empty((batch, heads, headdim, dstate), dtype=cdt)
    checkpoints = x.new_empty((batch, heads, chunks, headdim, dstate), dtype=cdt)
    return y, final_state, checkpoints


@torch.library.register_fake("mblm::ssd_bwd")
def _ssd_bwd_fake(
    grad_y, grad_final_state, x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state, checkpoints
):
    _check_fake_scan(x, dt, A, B, C, D, dt_bias, initial_state)
    torch._check(
        grad_y.shape == x.shape,
        lambda: f"mblm: ssd grad_y must have the shape of x, got {tuple(grad_y.shape)}",
    )
    cdt = _compute_dtype(x.dtype)

    def like(t: Tensor | None) -> Tensor:
        return x.new_empty((0,), dtype=cdt) if t is None else t.new_empty(t.shape)

    return (
        x.new_empty(x.shape),
        dt.new_empty(dt.shape),
        A.new_empty(A.shape),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        like(D),
        like(dt_bias),
        like(initial_state),
    )


@torch.library.register_fake("mblm::ssd_update")
def _ssd_update_fake(state, x, dt, A, B, C, D, dt_bias, dt_softplus):
    torch._check(
        x.dim() == 3, lambda: f"mblm: ssd x must have 3 dims (B, H, P), got {tuple(x.shape)}"
    )
    torch._check(
        state.shape == (*x.shape, B.shape[-1]),
        lambda: f"mblm: ssd state must have shape (B, H, P, N), got {tuple(state.shape)}",
    )
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------


def _setup_context_ssd_fwd(ctx, inputs, output):
    x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state = inputs
    _, _, checkpoints = output
    ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, initial_state, checkpoints)
    ctx.dt_softplus = dt_softplus
    ctx.mark_non_differentiable(checkpoints)
    ctx.set_materialize_grads(False)


def _backward_ssd_fwd(ctx, grad_y, grad_final_state, _grad_checkpoints):
    """ssd_bwd (no double backward); a final state (or y) nobody used counts as zero gradient."""
    x, dt, A, B, C, D, dt_bias, initial_state, checkpoints = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    grads = torch.ops.mblm.ssd_bwd.default(
        grad_y,
        grad_final_state,
        x,
        dt,
        A,
        B,
        C,
        D,
        dt_bias,
        ctx.dt_softplus,
        initial_state,
        checkpoints,
    )
    gx, gdt, gA, gB, gC, gD, gbias, ginit = grads
    needs = ctx.needs_input_grad
    return (
        gx if needs[0] else None,
        gdt if needs[1] else None,
        gA if needs[2] else None,
        gB if needs[3] else None,
        gC if needs[4] else None,
        gD if D is not None and needs[5] else None,
        gbias if dt_bias is not None and needs[6] else None,
        None,
        ginit if initial_state is not None and needs[8] else None,
    )


torch.library.register_autograd(
    "mblm::ssd_fwd", _backward_ssd_fwd, setup_context=_setup_context_ssd_fwd
)
