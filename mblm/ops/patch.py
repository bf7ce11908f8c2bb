"""Patch family: the public wrappers, fake (meta) impls and autograd formulas.

- ``patch_pad``: (B, L) byte ids -> (B, ceil(L / prod(inner)), *inner), right-padded (§2.2).
- ``stage_input``: one stage's input ``[start ; x (+ pos)] + [0 ; prev]`` (§2.4).
- ``patch_unpatch``: the local stage's (B, ..., 1 + P, D) outputs read back in flat byte order,
  start positions dropped (optionally the very first one kept) (§2.5, §2.6).

Each runs as one memory pass in ``torch.ops.mblm``. Meaning: ``patch_pad_ref``,
``stage_input_ref`` and ``patch_unpatch_ref`` in ``mblm.ops.reference``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mblm.ops import reference
from mblm.ops._common import KERNEL_DTYPES, kernel_device_ok, warn_once

__all__ = ["patch_pad", "patch_unpatch", "stage_input"]

ID_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

# Resolved once at import: torch.compile(fullgraph=True) cannot trace the extension's build_info.
_CUDA_KERNELS = kernel_device_ok(torch.device("cuda"), "patch")


def _has_kernel(device: torch.device) -> bool:
    return _CUDA_KERNELS if device.type == "cuda" else kernel_device_ok(device)


def _check_same_device(op: str, reference_name: str, ref: Tensor, **others: Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(
                f"mblm: {op} {name} is on {t.device} but {reference_name} is on {ref.device}"
            )


# ---------------------------------------------------------------------------------------------
# public wrappers
# ---------------------------------------------------------------------------------------------


def patch_pad(ids: Tensor, inner_sizes: Sequence[int], pad_id: int) -> Tensor:
    """Right-pads (B, L) integer ids with ``pad_id`` to a multiple of ``prod(inner_sizes)`` and
    lays them out as (B, ceil(L / prod(inner_sizes)), *inner_sizes), in ids' dtype.

    ``inner_sizes`` are the patch sizes of every stage below the global one (empty for a 1-stage
    model: the result is ids as a contiguous (B, L) tensor).
    """
    inner = [int(s) for s in inner_sizes]
    if not _has_kernel(ids.device):
        warn_once(
            f"mblm.ops.patch: no patch_pad kernel for device {ids.device}; running the PyTorch reference"
        )
        return reference.patch_pad_ref(ids, inner, pad_id)
    return torch.ops.mblm.patch_pad.default(ids, inner, int(pad_id))


def stage_input(
    x: Tensor, start: Tensor, pos: Tensor | None = None, prev: Tensor | None = None
) -> Tensor:
    """Assembles one stage's input: (N, 1 + S, D) from x (N, S, D), start (D,), pos (S, D) or
    None, prev (N, S, D) or None. Row 0 is ``start``; row j + 1 is ``(x[:, j] + pos[j]) +
    prev[:, j]``. x, start, pos and prev must share one dtype and device; differentiable in all
    four.
    """
    _check_same_device("stage_input", "x", x, start=start, pos=pos, prev=prev)
    if not _has_kernel(x.device) or x.dtype not in KERNEL_DTYPES:
        warn_once(
            f"mblm.ops.patch: no stage_input kernel for {x.dtype} on {x.device}; running the PyTorch reference"
        )
        return reference.stage_input_ref(x, start, pos, prev)
    return torch.ops.mblm.stage_input_fwd.default(x, start, pos, prev)


def patch_unpatch(y: Tensor, length: int, with_start: bool) -> Tensor:
    """Reads the local stage's outputs y (B, ..., 1 + P, D) back in flat byte order: drops the
    start position of every local sequence, flattens the middle dims row-major and, when
    ``with_start``, puts the very first start output in front. Returns the first ``length``
    rows, (B, length, D); ``length`` must not exceed the rows available. Differentiable in y.
    """
    if not _has_kernel(y.device) or y.dtype not in KERNEL_DTYPES:
        warn_once(
            f"mblm.ops.patch: no patch_unpatch kernel for {y.dtype} on {y.device}; running the PyTorch reference"
        )
        return reference.patch_unpatch_ref(y, length, with_start)
    return torch.ops.mblm.patch_unpatch_fwd.default(y, length, with_start)


# ---------------------------------------------------------------------------------------------
# fake (meta) impls: the same checks as csrc/ops/patch.cpp, expressed on (symbolic) shapes
# ---------------------------------------------------------------------------------------------


def _unpatch_rows(y_shape: Sequence, with_start: bool):
    groups = math.prod(y_shape[1:-2])
    rows = groups * (y_shape[-2] - 1)
    return rows + 1 if with_start and groups > 0 else rows


@torch.library.register_fake("mblm::patch_pad")
def _patch_pad_fake(ids: Tensor, inner_sizes: Sequence[int], pad_id: int) -> Tensor:
    torch._check(
        ids.dim() == 2,
        lambda: f"mblm: patch_pad ids must have 2 dims (B, L), got shape {tuple(ids.shape)}",
    )
    torch._check(
        ids.dtype in ID_DTYPES,
        lambda: (
            f"mblm: patch_pad ids must be an integer tensor (uint8/int8/int16/int32/int64), got dtype {ids.dtype}"
        ),
    )
    torch._check(
        all(s >= 1 for s in inner_sizes),
        lambda: f"mblm: patch_pad inner_sizes must all be >= 1, got {list(inner_sizes)}",
    )
    info = torch.iinfo(ids.dtype)
    torch._check(
        info.min <= pad_id <= info.max,
        lambda: f"mblm: patch_pad pad_id = {pad_id} does not fit ids of dtype {ids.dtype}",
    )
    batch, length = ids.shape
    inner = math.prod(inner_sizes)
    patches = (length + inner - 1) // inner
    return ids.new_empty((batch, patches, *inner_sizes))


def _check_stage_input_fake(
    x: Tensor, start: Tensor, pos: Tensor | None, prev: Tensor | None
) -> None:
    torch._check(
        x.dim() == 3,
        lambda: f"mblm: stage_input x must have 3 dims (N, S, D), got shape {tuple(x.shape)}",
    )
    torch._check(
        x.dtype in KERNEL_DTYPES,
        lambda: (
            f"mblm: stage_input x must be float64/float32/float16/bfloat16, got dtype {x.dtype}"
        ),
    )
    n, s, d = x.shape
    for name, t, shape in (("start", start, (d,)), ("pos", pos, (s, d)), ("prev", prev, (n, s, d))):
        if t is not None:
            _check_like_x(name, t, shape, x)


def _check_like_x(name: str, t: Tensor, shape: tuple, x: Tensor) -> None:
    torch._check(
        t.dtype == x.dtype,
        lambda: f"mblm: stage_input {name} has dtype {t.dtype} but x has dtype {x.dtype}",
    )
    torch._check(
        t.device == x.device,
        lambda: f"mblm: stage_input {name} is on {t.device} but x is on {x.device}",
    )
    torch._check(
        t.dim() == len(shape) and all(a == b for a, b in zip(t.shape, shape, strict=False)),
        lambda: f"mblm: stage_input {name} must have shape {tuple(shape)}, got {tuple(t.shape)}",
    )


@torch.library.register_fake("mblm::stage_input_fwd")
def _stage_input_fwd_fake(
    x: Tensor, start: Tensor, pos: Tensor | None, prev: Tensor | None
) -> Tensor:
    _check_stage_input_fake(x, start, pos, prev)
    n, s, d = x.shape
    return x.new_empty((n, s + 1, d))


@torch.library.register_fake("mblm::stage_input_bwd")
def _stage_input_bwd_fake(grad: Tensor, has_pos: bool, has_prev: bool):
    torch._check(
        grad.dim() == 3 and grad.shape[1] >= 1,
        lambda: (
            f"mblm: stage_input_bwd grad must have 3 dims (N, 1 + S, D), got shape {tuple(grad.shape)}"
        ),
    )
    torch._check(
        grad.dtype in KERNEL_DTYPES,
        lambda: (
            f"mblm: stage_input_bwd grad must be float64/float32/float16/bfloat16, got dtype {grad.dtype}"
        ),
    )
    n, rows, d = grad.shape
    s = rows - 1
    grad_x = grad.new_empty((n, s, d))
    grad_start = grad.new_empty((d,))
    grad_pos = grad.new_empty((s, d)) if has_pos else grad.new_empty((0,))
    grad_prev = grad.new_empty((n, s, d)) if has_prev else grad.new_empty((0,))
    return grad_x, grad_start, grad_pos, grad_prev


def _check_unpatch_fake(
    y_shape: Sequence, dtype: torch.dtype, length, with_start: bool, what: str
) -> None:
    torch._check(
        len(y_shape) >= 3,
        lambda: (
            f"mblm: patch_unpatch {what} must have at least 3 dims (B, ..., 1 + P, D), got {tuple(y_shape)}"
        ),
    )
    torch._check(
        dtype in KERNEL_DTYPES,
        lambda: f"mblm: patch_unpatch {what} must be float64/float32/float16/bfloat16, got {dtype}",
    )
    torch._check(
        y_shape[-2] >= 1,
        lambda: f"mblm: patch_unpatch y.size(-2) must be >= 1, got {tuple(y_shape)}",
    )
    torch._check(length >= 0, lambda: f"mblm: patch_unpatch length must be >= 0, got {length}")
    torch._check(
        length <= _unpatch_rows(y_shape, with_start),
        lambda: (
            f"mblm: patch_unpatch length = {length} exceeds the rows that y of shape {tuple(y_shape)} holds"
        ),
    )


@torch.library.register_fake("mblm::patch_unpatch_fwd")
def _patch_unpatch_fwd_fake(y: Tensor, length, with_start: bool) -> Tensor:
    _check_unpatch_fake(y.shape, y.dtype, length, with_start, "y")
    return y.new_empty((y.shape[0], length, y.shape[-1]))


@torch.library.register_fake("mblm::patch_unpatch_bwd")
def _patch_unpatch_bwd_fake(grad: Tensor, y_shape: Sequence, with_start: bool) -> Tensor:
    _check_unpatch_fake(
        y_shape, grad.dtype, grad.shape[1] if grad.dim() == 3 else 0, with_start, "grad"
    )
    torch._check(
        grad.dim() == 3 and grad.shape[0] == y_shape[0] and grad.shape[2] == y_shape[-1],
        lambda: (
            f"mblm: patch_unpatch_bwd grad must have shape (B, length, D) for y_shape {tuple(y_shape)}, "
            f"got {tuple(grad.shape)}"
        ),
    )
    return grad.new_empty(tuple(y_shape))


# ---------------------------------------------------------------------------------------------
# autograd: the backward of every *_fwd op is its *_bwd op, and each *_bwd op is linear in grad
# with the *_fwd op as its adjoint, which gives double backward at no extra cost.
# ---------------------------------------------------------------------------------------------


def _setup_stage_input_fwd(ctx, inputs, output) -> None:
    x, start, pos, prev = inputs
    ctx.has_pos = pos is not None
    ctx.has_prev = prev is not None


def _backward_stage_input_fwd(ctx, grad: Tensor):
    needs = ctx.needs_input_grad
    need_pos = ctx.has_pos and needs[2]
    # grad_prev equals grad_x: reuse it (autograd treats the shared tensor as read-only) rather
    # than having the kernel write a second copy.
    grad_x, grad_start, grad_pos, _ = torch.ops.mblm.stage_input_bwd.default(grad, need_pos, False)
    return (
        grad_x if needs[0] else None,
        grad_start if needs[1] else None,
        grad_pos if need_pos else None,
        grad_x if ctx.has_prev and needs[3] else None,
    )


torch.library.register_autograd(
    "mblm::stage_input_fwd", _backward_stage_input_fwd, setup_context=_setup_stage_input_fwd
)


def _setup_stage_input_bwd(ctx, inputs, output) -> None:
    grad, has_pos, has_prev = inputs
    ctx.has_pos, ctx.has_prev = has_pos, has_prev
    ctx.shape, ctx.dtype, ctx.device = grad.shape, grad.dtype, grad.device


def _backward_stage_input_bwd(
    ctx, gg_x: Tensor | None, gg_start: Tensor | None, gg_pos: Tensor | None, gg_prev
):
    if not ctx.needs_input_grad[0]:
        return None, None, None
    n, rows, d = ctx.shape
    if gg_x is None:
        gg_x = torch.zeros((n, rows - 1, d), dtype=ctx.dtype, device=ctx.device)
    if gg_start is None:
        gg_start = torch.zeros((d,), dtype=ctx.dtype, device=ctx.device)
    pos = gg_pos if ctx.has_pos else None
    prev = gg_prev if ctx.has_prev else None
    return torch.ops.mblm.stage_input_fwd.default(gg_x, gg_start, pos, prev), None, None


torch.library.register_autograd(
    "mblm::stage_input_bwd", _backward_stage_input_bwd, setup_context=_setup_stage_input_bwd
)


def _setup_patch_unpatch_fwd(ctx, inputs, output) -> None:
    y, length, with_start = inputs
    ctx.y_shape = list(y.shape)
    ctx.with_start = with_start


def _backward_patch_unpatch_fwd(ctx, grad: Tensor):
    if not ctx.needs_input_grad[0]:
        return None, None, None
    return torch.ops.mblm.patch_unpatch_bwd.default(grad, ctx.y_shape, ctx.with_start), None, None


torch.library.register_autograd(
    "mblm::patch_unpatch_fwd", _backward_patch_unpatch_fwd, setup_context=_setup_patch_unpatch_fwd
)


def _setup_patch_unpatch_bwd(ctx, inputs, output) -> None:
    grad, y_shape, with_start = inputs
    ctx.length = grad.shape[1]
    ctx.with_start = with_start


def _backward_patch_unpatch_bwd(ctx, gg: Tensor):
    if not ctx.needs_input_grad[0]:
        return None, None, None
    return torch.ops.mblm.patch_unpatch_fwd.default(gg, ctx.length, ctx.with_start), None, None


torch.library.register_autograd(
    "mblm::patch_unpatch_bwd", _backward_patch_unpatch_bwd, setup_context=_setup_patch_unpatch_bwd
)
