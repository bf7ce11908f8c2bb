"""Conv family: depthwise causal conv1d (the Mamba mixers' short convolution) and its decode step.

``torch.ops.mblm.conv1d_fwd`` / ``conv1d_bwd`` compute ``causal_conv1d_ref`` of
``mblm.ops.reference`` and its gradients; ``conv1d_update`` advances one step from a rolling
state in place. y and grad_x come back as transposes of (B, L, C)-contiguous tensors (the layout
the models continue in); see csrc/include/mblm/conv.h.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mblm.ops import reference
from mblm.ops._common import KERNEL_DTYPES, kernel_device_types, no_kernel_reason, warn_once

__all__ = ["causal_conv1d", "causal_conv1d_step", "causal_conv1d_step_"]

_KERNEL_DEVICE_TYPES = kernel_device_types("conv")


def _has_kernel(x: Tensor) -> bool:
    return x.device.type in _KERNEL_DEVICE_TYPES and x.dtype in KERNEL_DTYPES


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_state: Tensor | None = None,
    activation: bool = False,
) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv of x (B, C, L) with weight (C, K), optional bias (C,), SiLU when
    ``activation``; ``initial_state`` (B, C, K - 1) holds the inputs before x (zeros if None).

    Returns (y (B, C, L), final_state (B, C, K - 1)), both in x's dtype; final_state is the
    initial_state that continues the sequence. Differentiable w.r.t. x, weight, bias and
    initial_state (gradients flow from y and final_state).
    """
    if not _has_kernel(x):
        warn_once(
            f"mblm.ops.conv: {no_kernel_reason('conv', x.device, x.dtype)}; running the reference"
        )
        return reference.causal_conv1d_ref(x, weight, bias, initial_state, activation)
    y, final_state = torch.ops.mblm.conv1d_fwd.default(x, weight, bias, initial_state, activation)
    return y, final_state


def causal_conv1d_step_(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: bool = False,
) -> Tensor:
    """One decode step in place: x (B, C); conv_state (B, C, K - 1) drops its oldest input and
    appends x. Returns y (B, C), equal to ``causal_conv1d`` of that one step from the state."""
    if not _has_kernel(x):
        warn_once(
            f"mblm.ops.conv: {no_kernel_reason('conv', x.device, x.dtype)}; running the reference"
        )
        y, new_state = reference.causal_conv1d_ref(
            x[:, :, None], weight, bias, conv_state, activation
        )
        conv_state.copy_(new_state)
        return y[:, :, 0]
    return torch.ops.mblm.conv1d_update.default(x, conv_state, weight, bias, activation)


def causal_conv1d_step(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: bool = False,
) -> tuple[Tensor, Tensor]:
    """``causal_conv1d_step_`` without mutating ``conv_state``: returns (y, new_state)."""
    new_state = conv_state.clone()
    return causal_conv1d_step_(x, new_state, weight, bias, activation), new_state


# ---------------------------------------------------------------------------------------------
# fake (meta) implementations: the same checks as csrc/ops/conv.cpp, the same output layouts
# ---------------------------------------------------------------------------------------------


def _output_like(x: Tensor) -> Tensor:
    batch, channels, length = x.shape
    return x.new_empty((batch, length, channels)).transpose(1, 2)


def _check_fake(
    x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None, op: str
) -> None:
    torch._check(
        x.dim() == 3, lambda: f"mblm: {op} x must have 3 dims (B, C, L), got {tuple(x.shape)}"
    )
    torch._check(
        x.dtype in KERNEL_DTYPES,
        lambda: f"mblm: {op} x must be float64/float32/float16/bfloat16, got {x.dtype}",
    )
    for name, t in (("weight", weight), ("bias", bias), ("initial_state", state)):
        torch._check(
            t is None or t.device == x.device,
            lambda name=name, t=t: f"mblm: {op} {name} is on {t.device} but x is on {x.device}",
        )
    channels = x.shape[1]
    torch._check(
        weight.dim() == 2 and weight.shape[0] == channels and weight.shape[1] >= 1,
        lambda: (
            f"mblm: {op} weight must have shape (C, K) with C = {channels} (x's channels), "
            f"got {tuple(weight.shape)}"
        ),
    )
    for name, t in (("weight", weight), ("bias", bias)):
        torch._check(
            t is None or t.dtype in (x.dtype, torch.float32),
            lambda name=name: f"mblm: {op} {name} must have x's dtype ({x.dtype}) or float32",
        )
    if bias is not None:
        torch._check(
            tuple(bias.shape) == (channels,),
            lambda: (
                f"mblm: {op} bias must have shape (C,) = ({channels},), got {tuple(bias.shape)}"
            ),
        )
    if state is not None:
        want = (x.shape[0], channels, weight.shape[1] - 1)
        torch._check(
            tuple(state.shape) == want and state.dtype == x.dtype,
            lambda: f"mblm: {op} initial_state must have shape (B, C, K - 1) = {want}",
        )


@torch.library.register_fake("mblm::conv1d_fwd")
def _conv1d_fwd_fake(x, weight, bias, initial_state, activation):
    _check_fake(x, weight, bias, initial_state, "conv1d")
    state = x.new_empty((x.shape[0], x.shape[1], weight.shape[1] - 1))
    return _output_like(x), state


@torch.library.register_fake("mblm::conv1d_bwd")
def _conv1d_bwd_fake(grad_y, grad_final_state, x, weight, bias, initial_state, activation):
    _check_fake(x, weight, bias, initial_state, "conv1d_bwd")
    torch._check(
        grad_y.shape == x.shape,
        lambda: f"mblm: conv1d_bwd grad_y must have x's shape {tuple(x.shape)}",
    )
    grad_bias = bias.new_empty(bias.shape) if bias is not None else weight.new_empty((0,))
    grad_init = x.new_empty((x.shape[0], x.shape[1], weight.shape[1] - 1))
    return _output_like(x), weight.new_empty(weight.shape), grad_bias, grad_init


@torch.library.register_fake("mblm::conv1d_update")
def _conv1d_update_fake(x, conv_state, weight, bias, activation):
    torch._check(
        x.dim() == 2, lambda: f"mblm: conv1d_update x must have 2 dims (B, C), got {tuple(x.shape)}"
    )
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------------------------
# autograd: conv1d_fwd's backward is conv1d_bwd (recomputes the pre-activation; saves inputs only)
# ---------------------------------------------------------------------------------------------


def _setup_conv1d_fwd(ctx, inputs, output) -> None:
    x, weight, bias, initial_state, activation = inputs
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.has_state = initial_state is not None
    ctx.save_for_backward(x, weight, bias, initial_state)


def _backward_conv1d_fwd(ctx, grad_y: Tensor | None, grad_final: Tensor | None):
    x, weight, bias, initial_state = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    gx, gw, gb, gi = torch.ops.mblm.conv1d_bwd.default(
        grad_y, grad_final, x, weight, bias, initial_state, ctx.activation
    )
    return gx, gw, (gb if ctx.has_bias else None), (gi if ctx.has_state else None), None


torch.library.register_autograd(
    "mblm::conv1d_fwd", _backward_conv1d_fwd, setup_context=_setup_conv1d_fwd
)


def _backward_conv1d_bwd(ctx, *grads):
    raise RuntimeError(
        "mblm: double backward through causal_conv1d (conv1d_bwd) is not supported; "
        "use the reference mblm.ops.reference.causal_conv1d_ref for higher-order gradients"
    )


torch.library.register_autograd("mblm::conv1d_bwd", _backward_conv1d_bwd)
