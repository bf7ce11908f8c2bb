"""Per-stage inference caches: run a stage model over a sequence in pieces.

A cache holds, for each of B rows, the state a stage model needs to continue a sequence: the
keys and values of every attention layer (plus the token-shift inputs) for a Transformer stage,
the conv and SSM states of every layer for a Mamba stage. ``extend(x, rows)`` feeds the next S
positions of the selected rows and returns their outputs, so that feeding a sequence in pieces
gives the outputs of one full run (up to float rounding). Rows may sit at different positions.

``load_start(rows, template)`` puts rows at "start token fed" (position 1): every stage sequence
begins with the stage's start token and nothing else at position 0, so that state is the same
for every sequence and is computed once (``template``, a 1-row cache that was fed the start
token) and copied.

``rows`` is a (R,) int64 tensor of distinct row indices, or None for all rows in order.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from mblm.model.mamba1 import Mamba as Mamba1
from mblm.model.mamba2 import Mamba2Mixer
from mblm.model.transformer import TransformerDecoder
from mblm.ops.decode import attn_decode
from mblm.ops.norm import rms_norm_kernel_ok

__all__ = ["MambaCache", "StageCache", "TransformerCache", "make_stage_cache", "supports_cache"]


class StageCache(Protocol):
    def extend(self, x: Tensor, rows: Tensor | None) -> Tensor:
        """Feeds x (R, S, D) to the selected rows; returns the outputs (R, S, D)."""
        ...

    def load_start(self, rows: Tensor | None, template: StageCache) -> None:
        """Resets the selected rows to the state of ``template`` (a 1-row cache)."""
        ...


def supports_cache(stage_model: nn.Module) -> bool:
    """Whether cached decoding knows how to step this stage model."""
    return isinstance(stage_model, (TransformerDecoder, Mamba1, Mamba2Mixer))


def make_stage_cache(
    stage_model: nn.Module,
    batch: int,
    capacity: int,
    dim: int,
    device: torch.device,
    dtype: torch.dtype,
) -> StageCache:
    """An empty cache for ``batch`` rows of up to ``capacity`` positions (Transformer stages
    preallocate their key/value storage; Mamba states do not depend on the length)."""
    if isinstance(stage_model, TransformerDecoder):
        return TransformerCache(stage_model, batch, capacity, dim, device, dtype)
    if isinstance(stage_model, (Mamba1, Mamba2Mixer)):
        return MambaCache(stage_model, batch, dim, device, dtype)
    raise TypeError(f"no inference cache for stage model {type(stage_model).__name__}")


def _rms_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """The Transformer stages' ``RMSNorm`` (no token shift) in one kernel call: a decode step runs
    4 of these per layer, and the module's forward costs several times the kernel in overhead."""
    try:
        scale, eps, g = norm.scale, norm.eps, norm.g
    except AttributeError:  # a different norm module: its own forward
        return norm(x)
    if rms_norm_kernel_ok(x, g):
        return torch.ops.mblm.rms_norm_fwd.default(x, g, float(scale), float(eps), False)[0]
    rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True) * scale
    return x / rms.clamp(min=eps) * g


def _set_rows(dst: Tensor, rows: Tensor | None, src: Tensor) -> None:
    if rows is None:
        dst.copy_(src)
    else:
        dst[rows] = src


def _get_rows(src: Tensor, rows: Tensor | None) -> Tensor:
    return src if rows is None else src[rows]


class TransformerCache:
    """Keys/values (B, C, H, Dh) and the token-shift inputs (B, D) of every layer of a
    ``TransformerDecoder``, and the number of cached positions of every row."""

    def __init__(
        self,
        stack: TransformerDecoder,
        batch: int,
        capacity: int,
        dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.stack = stack
        self.layers = [(layer[0], layer[1]) for layer in stack.layers]
        heads = self.layers[0][0].heads if self.layers else 1
        head_dim = self.layers[0][0].to_q.out_features // heads if self.layers else 1
        self.heads, self.head_dim = heads, head_dim
        # one projection for q, k and v (to_q and to_kv have no bias): one matmul per layer
        self.w_qkv = [
            torch.cat((attn.to_q.weight, attn.to_kv.weight), dim=0) for attn, _ in self.layers
        ]
        # token_shift moves the second chunk(2) half of the features: the last D - ceil(D/2)
        self.keep = (dim + 1) // 2
        shape = (batch, capacity, heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        self.shift_attn = [torch.zeros(batch, dim, device=device, dtype=dtype) for _ in self.layers]
        self.shift_ff = [torch.zeros(batch, dim, device=device, dtype=dtype) for _ in self.layers]
        self.lens = torch.zeros(batch, dtype=torch.long, device=device)
        # positions held by every row while all rows are fed together (None once they differ):
        # read on the host without synchronising with the device
        self.uniform_len: int | None = 0
        self.tables: tuple[Tensor, Tensor] | None = None
        self._build_tables(capacity, dtype, device)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1] if self.k else 0

    def _build_tables(self, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        """cos/sin (capacity, Dh) of every position, as ``RotaryEmbedding`` computes them (the
        angle of position p is p * inv_freq in the table dtype whatever the length)."""
        rotary = self.stack.rotary_emb
        if rotary is None:
            return
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        freqs = rotary(capacity, table_dtype).to(device)
        self.tables = (freqs.cos(), freqs.sin())

    def _shifted(self, x: Tensor, prev: Tensor, rows: Tensor | None) -> Tensor:
        """token_shift(x) continuing a sequence whose previous input was ``prev`` (rows)."""
        keep = self.keep
        before = _get_rows(prev, rows)[:, None, keep:]
        if x.shape[1] > 1:
            before = torch.cat((before, x[:, :-1, keep:]), dim=1)
        shifted = torch.cat((x[..., :keep], before), dim=-1)  # before prev is overwritten
        _set_rows(prev, rows, x[:, -1])
        return shifted

    def extend(self, x: Tensor, rows: Tensor | None) -> Tensor:
        seq = x.shape[1]
        lens = _get_rows(self.lens, rows)
        cos = sin = None
        if self.tables is not None:
            positions = lens[:, None]
            if seq > 1:
                positions = positions + torch.arange(seq, device=lens.device)
            cos, sin = self.tables[0][positions], self.tables[1][positions]
        h, inner = self.heads, self.heads * self.head_dim
        for i, (attn, ff) in enumerate(self.layers):
            normed = _rms_norm(attn.norm, self._shifted(x, self.shift_attn[i], rows))
            qkv = F.linear(normed, self.w_qkv[i])
            out = attn_decode(
                qkv[..., :inner].unflatten(-1, (h, -1)),
                qkv[..., inner : 2 * inner].unflatten(-1, (h, -1)),
                qkv[..., 2 * inner :].unflatten(-1, (h, -1)),
                self.k[i],
                self.v[i],
                lens,
                rows=rows,
                cos=cos,
                sin=sin,
                scale=self.head_dim**-0.5,
            )
            x = F.linear(out.flatten(-2), attn.to_out.weight) + x
            norm, up, act, drop, down = ff
            hidden = act(
                F.linear(
                    _rms_norm(norm, self._shifted(x, self.shift_ff[i], rows)), up.weight, up.bias
                )
            )
            if drop.training and drop.p > 0:
                hidden = drop(hidden)
            x = F.linear(hidden, down.weight, down.bias) + x
        if rows is None:
            self.lens += seq
            self.uniform_len = None if self.uniform_len is None else self.uniform_len + seq
        else:
            self.lens[rows] = lens + seq
            self.uniform_len = None
        return _rms_norm(self.stack.norm, x)

    def reserve(self, capacity: int) -> None:
        """Makes room for ``capacity`` positions per row (callers know the lengths they feed:
        the kernel refuses, or on CUDA returns NaN for, rows that would overflow)."""
        if capacity <= self.capacity:
            return
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                grown = t.new_zeros(t.shape[0], capacity, *t.shape[2:])
                grown[:, : t.shape[1]] = t
                store[i] = grown
        if self.tables is not None:
            self._build_tables(capacity, self.k[0].dtype, self.k[0].device)

    def load_start(self, rows: Tensor | None, template: StageCache) -> None:
        assert isinstance(template, TransformerCache)
        n = template.uniform_len if template.uniform_len is not None else int(template.lens[0])
        for i in range(len(self.layers)):
            for dst, src in ((self.k[i], template.k[i]), (self.v[i], template.v[i])):
                if rows is None:
                    dst[:, :n] = src[:, :n]
                else:
                    dst[rows, :n] = src[0, :n]
            for dst, src in ((self.shift_attn[i], template.shift_attn[i]),
                             (self.shift_ff[i], template.shift_ff[i])):  # fmt: skip
                if rows is None:
                    dst.copy_(src.expand_as(dst))
                else:
                    dst[rows] = src
        if rows is None:
            self.lens.fill_(n)
            self.uniform_len = n
        else:
            self.lens[rows] = n
            self.uniform_len = None


class MambaCache:
    """The (conv_state, ssm_state) of every layer of a Mamba1 or Mamba2 stage, (B, ...) each."""

    def __init__(
        self, model: nn.Module, batch: int, dim: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.model = model
        # the shapes and dtypes of the states, from one position run from the zero state
        _, probe = model.forward_with_state(torch.zeros(1, 1, dim, device=device, dtype=dtype))
        self.state: list[tuple[Tensor, Tensor]] = [
            (c.new_zeros(batch, *c.shape[1:]), s.new_zeros(batch, *s.shape[1:])) for c, s in probe
        ]

    def extend(self, x: Tensor, rows: Tensor | None) -> Tensor:
        state = [(_get_rows(c, rows), _get_rows(s, rows)) for c, s in self.state]
        y, new_state = self.model.forward_with_state(x, state)
        if rows is None:
            self.state = [(c, s) for c, s in new_state]
        else:
            for (c, s), (nc, ns) in zip(self.state, new_state, strict=True):
                c[rows] = nc.to(c.dtype)
                s[rows] = ns.to(s.dtype)
        return y

    def load_start(self, rows: Tensor | None, template: StageCache) -> None:
        assert isinstance(template, MambaCache)
        for (c, s), (tc, ts) in zip(self.state, template.state, strict=True):
            if rows is None:
                c.copy_(tc.expand_as(c))
                s.copy_(ts.expand_as(s))
            else:
                c[rows] = tc.to(c.dtype)
                s[rows] = ts.to(s.dtype)
