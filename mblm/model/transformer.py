"""Transformer stage blocks: the MEGABYTE-pytorch layer tree with attention on ``mblm.ops``.

Module names, parameter shapes, creation order (and therefore seeded initial weights) and the
numerics follow MEGABYTE-pytorch 0.3.6, which the original mblm builds its Transformer stages
from: pre-norm RMSNorm (the norm is clamped, not eps-added), token shift, full multi-head
attention (every head has its own K and V) with a half-split rotary embedding on q and k, GELU
feed-forward. Attention runs through the fused ``mblm.ops.attention`` kernel; only an explicit
key mask (MBLMEncoder with padding) takes the plain-PyTorch path of the original.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import wraps
from typing import Any, cast

import torch
import torch.nn.functional as F  # noqa: N812
import torch.utils.checkpoint
from pydantic import Field, model_validator
from torch import nn
from torch.nn.attention import SDPBackend

from mblm.model.block import StageBlock
from mblm.ops.attention import attention, attention_kv
from mblm.ops.gelu import gelu_bwd, gelu_kernel_ok
from mblm.ops.norm import rms_norm, rms_norm_kernel_ok

RotaryArg = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None


def once(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wraps a one-argument function so that only its first call runs."""
    called = False

    @wraps(fn)
    def inner(x: Any) -> Any:
        nonlocal called
        if called:
            return None
        called = True
        return fn(x)

    return inner


print_once = once(print)


def exists(val: Any) -> bool:
    return val is not None


# ---------------------------------------------------------------------------------------------
# MEGABYTE-pytorch building blocks
# ---------------------------------------------------------------------------------------------


def token_shift(t: torch.Tensor) -> torch.Tensor:
    """Shifts the second half of the features (``chunk(2)``) one position down the sequence
    axis (RWKV's token shift); position 0 of that half becomes zero."""
    keep, shift = t.chunk(2, dim=-1)
    shift = F.pad(shift, (0, 0, 1, -1))
    return torch.cat((keep, shift), dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[a, b] -> [-b, a]`` on the two halves of the last axis."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rotary_pos_emb(pos: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Half-split rotary embedding of ``t`` by the angles ``pos`` (in ``pos``'s precision)."""
    with torch.autocast("cuda", enabled=False):
        return t * pos.cos() + rotate_half(t) * pos.sin()


class RotaryEmbedding(nn.Module):
    """Rotary frequencies of one Transformer stage (MEGABYTE layout, persistent ``inv_freq``).

    ``forward(seq_len)`` returns the angles ``p * inv_freq`` of positions 0..seq_len-1,
    duplicated over both halves: (seq_len, 2 * len(inv_freq)).
    """

    inv_freq: torch.Tensor

    def __init__(self, dim: int, theta: int = 10000) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)

    @property
    def device(self) -> torch.device:
        return self.inv_freq.device

    def forward(self, seq_len: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Angles (seq_len, dim); ``dtype`` defaults to that of ``inv_freq``."""
        dtype = dtype or self.inv_freq.dtype
        positions = torch.arange(seq_len, device=self.inv_freq.device, dtype=dtype)
        freqs = torch.outer(positions, self.inv_freq.to(dtype))
        return torch.cat((freqs, freqs), dim=-1)

    def cos_sin(self, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) tables (seq_len, dim) for queries of ``dtype``: float64 for float64
        queries, else float32 (the original applies rotary with autocast disabled)."""
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        freqs = self.forward(seq_len, table_dtype)
        return freqs.cos(), freqs.sin()


def _token_shift_adjoint(grad: torch.Tensor) -> torch.Tensor:
    """Gradient of ``token_shift``: the shifted half flows back one position up."""
    keep = (grad.shape[-1] + 1) // 2
    shifted = F.pad(grad[..., 1:, keep:], (0, 0, 0, 1))
    return torch.cat((grad[..., :keep], shifted), dim=-1)


class _RMSNormFunction(torch.autograd.Function):
    """``rmsnorm(token_shift(x) if shift else x)`` that saves only ``x`` (alive anyway as the
    residual) and the per-row clamped RMS: no shifted copy and no normalised copy are kept for
    backward. Forward arithmetic is exactly ``RMSNorm``'s."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: torch.Tensor, scale: float, eps: float, shift: bool):
        u = token_shift(x) if shift else x
        rms = torch.norm(u, dim=-1, keepdim=True) * scale
        clamped = rms.clamp(min=eps)
        ctx.save_for_backward(x, g, clamped, rms < eps)
        ctx.scale, ctx.shift = scale, shift
        return u / clamped * g

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        x, g, clamped, below_eps = ctx.saved_tensors
        u = token_shift(x) if ctx.shift else x
        normed = u / clamped
        grad_g = (grad_y * normed).sum_to_size(g.shape) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            a = grad_y * g
            # d(u / (scale * |u|)): project out the radial component; a clamped RMS is constant.
            radial = normed * (a * normed).sum(-1, keepdim=True) * ctx.scale**2
            grad_u = torch.where(below_eps, a, a - radial) / clamped
            grad_x = _token_shift_adjoint(grad_u) if ctx.shift else grad_u
        return grad_x, grad_g, None, None, None


class RMSNorm(nn.Module):
    """MEGABYTE's RMSNorm: ``x / max(||x||_2 / sqrt(dim), eps) * g`` (eps clamps the RMS).
    ``shift=True`` normalises ``token_shift(x)`` instead, fused so that backward keeps no copy.
    Runs the ``mblm.ops.rms_norm`` kernel; x of another dtype than g (autocast) takes the
    PyTorch path, whose result is in the promoted dtype as the original's."""

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.eps = eps
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, shift: bool = False) -> torch.Tensor:
        if rms_norm_kernel_ok(x, self.g) and (x.dim() >= 2 or not shift):
            return rms_norm(x, self.g, scale=self.scale, eps=self.eps, shift=shift)
        if torch.is_grad_enabled() and (x.requires_grad or self.g.requires_grad):
            return _RMSNormFunction.apply(x, self.g, self.scale, self.eps, shift)
        u = token_shift(x) if shift else x
        norm = torch.norm(u, dim=-1, keepdim=True) * self.scale
        return u / norm.clamp(min=self.eps) * self.g


class _GeluLinearFunction(torch.autograd.Function):
    """``linear(gelu(h), weight, bias)`` that keeps only h (not the GELU output) for backward and
    recomputes the GELU there, without re-running the matmul as checkpointing would."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        h, weight = ctx.saved_tensors
        rows_out = grad_out.reshape(-1, grad_out.shape[-1])
        rows_h = h.reshape(-1, h.shape[-1])
        need_h, need_w, need_b = ctx.needs_input_grad
        grad_h = grad_w = grad_b = act = None
        if need_h:
            grad_act = rows_out.mm(weight)
            if gelu_kernel_ok(rows_h):
                # one pass: the gradient and the recomputed GELU output
                grad_h, act = gelu_bwd(grad_act, rows_h)
            else:
                grad_h = torch.ops.aten.gelu_backward(grad_act, rows_h)
            grad_h = grad_h.view(h.shape)
        if need_w:
            grad_w = rows_out.t().mm(F.gelu(rows_h) if act is None else act)
        if need_b and ctx.has_bias:
            grad_b = rows_out.sum(0)
        return grad_h, grad_w, grad_b


class _FeedForward(nn.Sequential):
    """``Sequential(RMSNorm, Linear, GELU, Dropout, Linear)`` (MEGABYTE's indices and keys) whose
    forward takes the token-shift flag and, when training without dropout, recomputes the GELU in
    backward instead of keeping its output."""

    def forward(self, x: torch.Tensor, shift: bool = False) -> torch.Tensor:  # type: ignore[override]
        norm, up, act, drop, down = self
        h = up(norm(x, shift=shift))
        if torch.is_grad_enabled() and h.requires_grad and (drop.p == 0 or not self.training):
            if (
                type(act) is nn.GELU
                and act.approximate == "none"
                and type(down) is nn.Linear
                and not torch.is_autocast_enabled(h.device.type)
            ):
                return _GeluLinearFunction.apply(h, down.weight, down.bias)
            return torch.utils.checkpoint.checkpoint(
                lambda t: down(drop(act(t))), h, use_reentrant=False
            )
        return down(drop(act(h)))


def FeedForward(*, dim: int, mult: int = 4, dropout: float = 0.0) -> nn.Sequential:  # noqa: N802
    """Pre-norm GELU MLP: ``RMSNorm, Linear(dim, dim*mult), GELU, Dropout, Linear(dim*mult, dim)``."""
    return _FeedForward(
        RMSNorm(dim),
        nn.Linear(dim, dim * mult),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(dim * mult, dim),
    )


def _sdpa_backends(flash: bool) -> list[SDPBackend]:
    """The SDPA backends MEGABYTE's Attend allows (only the explicit-mask path uses SDPA)."""
    if torch.cuda.is_available() and flash:
        props = torch.cuda.get_device_properties(torch.device("cuda"))
        if (props.major, props.minor) == (8, 0):
            return [SDPBackend.FLASH_ATTENTION]
        return [SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION]


class Attend(nn.Module):
    """Scaled dot-product attention over (b, h, n, d) tensors, causal or not, with dropout on
    the probabilities in training. Runs the fused ``mblm.ops.attention`` kernel; ``flash`` is
    kept for config compatibility (both of the original's paths compute the same function)."""

    def __init__(self, causal: bool = False, dropout: float = 0.0, flash: bool = False) -> None:
        super().__init__()
        self.dropout = dropout
        self.attn_dropout = nn.Dropout(dropout)
        self.causal = causal
        self.flash = flash
        self.attn_cfg = _sdpa_backends(flash)

    # torch's SDPBackend values cannot be pickled (so torch.save(model) fails in the original):
    # they are left out and rebuilt from ``flash`` on load.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["attn_cfg"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.attn_cfg = _sdpa_backends(self.flash)

    def get_mask(self, i: int, j: int, device: torch.device) -> torch.Tensor:
        """True where query i may not see key j (strictly upper triangle, bottom-aligned)."""
        return torch.ones((i, j), device=device, dtype=torch.bool).triu(j - i + 1)

    def attend_heads_last(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """q, k, v: (N, S, H, Dh) (views with a contiguous last axis); rotary: (cos, sin)
        (S, Dh) applied to q and k. Returns (N, S, H, Dh)."""
        cos, sin = rotary if rotary is not None else (None, None)
        return attention(
            q,
            k,
            v,
            causal=self.causal,
            scale=q.shape[-1] ** -0.5,
            cos=cos,
            sin=sin,
            dropout_p=self.dropout,
            training=self.training,
        )

    def attend_packed_kv(
        self,
        q: torch.Tensor,
        kv: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``attend_heads_last`` with k and v packed as kv (N, S, 2, H, Dh): kv's gradient comes
        as one tensor (no concatenation for the ``to_kv`` projection)."""
        cos, sin = rotary if rotary is not None else (None, None)
        return attention_kv(
            q,
            kv,
            causal=self.causal,
            scale=q.shape[-1] ** -0.5,
            cos=cos,
            sin=sin,
            dropout_p=self.dropout,
            training=self.training,
        )

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q, k, v: (b, h, n, d); mask: optional key mask (b, j) or (b, 1|h, i, j), True =
        attend. Returns (b, h, n, d)."""
        if mask is not None:
            return _masked_attention(self, q, k, v, mask)
        out = self.attend_heads_last(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)


def _masked_attention(
    attend: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The original's attention with an explicit key mask (plain PyTorch; no kernel takes a
    mask). Non-flash: masked scores are filled with ``-finfo.max``; flash: SDPA."""
    heads, q_len, k_len = q.shape[1], q.shape[-2], k.shape[-2]
    if attend.flash:
        is_causal = attend.causal
        if mask.ndim != 4:
            mask = mask[:, None, None, :].expand(-1, heads, q_len, -1)
        if attend.causal:
            causal = torch.ones((q_len, k_len), device=q.device, dtype=torch.bool).tril()
            mask = mask & causal
            is_causal = False
        with torch.nn.attention.sdpa_kernel(attend.attn_cfg):
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=attend.dropout if attend.training else 0.0,
                is_causal=is_causal,
            )
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    if mask.ndim == 2:
        mask = mask[:, None, None, :]
    sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    if attend.causal:
        sim = sim.masked_fill(attend.get_mask(q_len, k_len, q.device), -torch.finfo(sim.dtype).max)
    probs = attend.attn_dropout(sim.softmax(dim=-1))
    return torch.einsum("bhij,bhjd->bhid", probs, v)


def _rotary_tables(
    rotary_emb: RotaryArg, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Accepts the original's angle tensor (S, Dh) or precomputed (cos, sin)."""
    if rotary_emb is None or isinstance(rotary_emb, tuple):
        return rotary_emb
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    angles = rotary_emb.to(table_dtype)
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    """Pre-norm multi-head causal attention of one layer (MEGABYTE's ``Attention``)."""

    def __init__(
        self,
        *,
        dim: int,
        dim_head: int = 64,
        heads: int = 8,
        dropout: float = 0.0,
        flash: bool = False,
    ) -> None:
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        inner_dim = dim_head * heads
        self.attend = self._make_attend(dropout=dropout, flash=flash)
        # Unused in forward (as in MEGABYTE); kept for the module tree.
        self.dropout = nn.Dropout(dropout)
        self.norm = RMSNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def _make_attend(self, *, dropout: float, flash: bool) -> Attend:
        return Attend(causal=True, flash=flash, dropout=dropout)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, S, D) -> q, k, v as (N, S, H, Dh) views of the projections (no copies)."""
        h = self.heads
        q = self.to_q(x).unflatten(-1, (h, -1))
        k, v = self.to_kv(x).chunk(2, dim=-1)
        return q, k.unflatten(-1, (h, -1)), v.unflatten(-1, (h, -1))

    def forward(
        self, x: torch.Tensor, rotary_emb: RotaryArg = None, shift: bool = False
    ) -> torch.Tensor:
        """x: (N, S, D); rotary_emb: angles (S, Dh) as ``RotaryEmbedding`` returns them, or
        precomputed (cos, sin) tables; shift: attend over ``token_shift(x)`` (fused into the
        norm). Returns (N, S, D)."""
        x = self.norm(x, shift=shift)
        h = self.heads
        q = self.to_q(x).unflatten(-1, (h, -1))
        kv = self.to_kv(x).unflatten(-1, (2, h, -1))  # [k | v], as chunk(2) splits it
        out = self.attend.attend_packed_kv(q, kv, _rotary_tables(rotary_emb, q.dtype))
        return self.to_out(out.flatten(-2))


class AttendWithMask(Attend):
    """``Attend`` that also takes a key mask (MBLMEncoder's padding mask)."""


class AttentionEncoder(Attention):
    """Bidirectional attention of the encoder stages, optionally with a key mask (N, S)."""

    def _make_attend(self, *, dropout: float, flash: bool) -> Attend:
        return AttendWithMask(causal=False, flash=flash, dropout=dropout)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: RotaryArg = None,
    ) -> torch.Tensor:
        """x: (N, S, D); attention_mask: (N, S) bool, False = key not attended."""
        if attention_mask is None:
            return super().forward(x, rotary_emb=rotary_emb)
        x = self.norm(x)
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x))
        rotary = _rotary_tables(rotary_emb, q.dtype)
        if rotary is not None:
            # fp32 tables (fp64 for fp64 q): bf16 q/k are promoted, as in the original
            cos, sin = rotary
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        out = self.attend(q, k, v, mask=attention_mask)
        return self.to_out(out.transpose(1, 2).flatten(-2))


# ---------------------------------------------------------------------------------------------
# Stage models and their configs
# ---------------------------------------------------------------------------------------------


class _TransformerStack(nn.Module):
    """Rotary frequencies, ``num_layers`` x [attention, feed-forward], final RMSNorm."""

    def __init__(
        self,
        *,
        model_dim: int,
        num_layers: int,
        attn_head_dim: int = 64,
        attn_num_heads: int = 8,
        attn_dropout: float = 0.0,
        attn_use_rot_embs: bool = True,
        ff_dropout: float = 0.0,
        ff_mult: int = 4,
        use_flash_attn: bool = False,
    ) -> None:
        super().__init__()
        self.rotary_emb = RotaryEmbedding(attn_head_dim) if attn_use_rot_embs else None
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    self._attention_cls(
                        dim=model_dim,
                        dim_head=attn_head_dim,
                        heads=attn_num_heads,
                        dropout=attn_dropout,
                        flash=use_flash_attn,
                    ),
                    FeedForward(dim=model_dim, mult=ff_mult, dropout=ff_dropout),
                ]
            )
            for _ in range(num_layers)
        )
        self.norm = RMSNorm(model_dim)

    _attention_cls: type[Attention] = Attention

    def _rotary(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.rotary_emb is None:
            return None
        return self.rotary_emb.cos_sin(x.shape[-2], x.dtype)

    def _layers(self) -> Iterable[tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]]:
        return cast(
            Iterable[tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]], self.layers
        )


class TransformerDecoder(_TransformerStack):
    """Causal Transformer stage: ``x = attn(shift(x)) + x; x = ff(shift(x)) + x`` per layer,
    then RMSNorm. forward: (N, S, D) -> (N, S, D)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = input_ids
        rotary = self._rotary(x)
        for attn, ff in self._layers():
            x = attn(x, rotary_emb=rotary, shift=True) + x
            x = ff(x, shift=True) + x
        return self.norm(x)


class TransformerEncoder(_TransformerStack):
    """Bidirectional Transformer stage (no token shift), optionally with a key mask (N, S)."""

    _attention_cls = AttentionEncoder

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = input_ids
        rotary = self._rotary(x)
        for attn, ff in self._layers():
            x = attn(x, rotary_emb=rotary, attention_mask=attention_mask) + x
            x = ff(x) + x
        return self.norm(x)


class _TransformerStageFields(StageBlock):
    """The fields both Transformer stage configs share (the original spells them out twice)."""

    attn_head_dims: int
    attn_num_heads: int
    attn_use_rot_embs: bool
    attn_dropout: float = 0.0
    ff_multiplier: int = 2
    ff_dropout: float = 0.0
    use_flash_attn: bool = False

    def _stack_kwargs(self) -> dict[str, Any]:
        return dict(
            attn_head_dim=self.attn_head_dims,
            attn_num_heads=self.attn_num_heads,
            attn_dropout=self.attn_dropout,
            attn_use_rot_embs=self.attn_use_rot_embs,
            ff_dropout=self.ff_dropout,
            ff_mult=self.ff_multiplier,
            use_flash_attn=self.use_flash_attn,
        )


class TransformerBlock(_TransformerStageFields):
    """Config of a causal Transformer (decoder) stage inside MBLM."""

    block_type: str = Field(init=False, default="transformer")

    def to_model(self, model_dim: int, num_layers: int) -> TransformerDecoder:
        return TransformerDecoder(
            model_dim=model_dim, num_layers=num_layers, **self._stack_kwargs()
        )

    @model_validator(mode="after")
    def validate_block_type(self) -> TransformerBlock:
        if self.block_type != "transformer":
            raise ValueError("This model is a transformer")
        return self


class TransformerEncoderBlock(_TransformerStageFields):
    """Config of a bidirectional Transformer (encoder) stage (for MBLMEncoder)."""

    block_type: str = Field(init=False, default="transformerEncoder")

    def to_model(self, model_dim: int, num_layers: int) -> TransformerEncoder:
        return TransformerEncoder(
            model_dim=model_dim, num_layers=num_layers, **self._stack_kwargs()
        )

    @model_validator(mode="after")
    def validate_block_type(self) -> TransformerEncoderBlock:
        if self.block_type != "transformerEncoder":
            raise ValueError("This model is a transformerEncoder")
        return self
