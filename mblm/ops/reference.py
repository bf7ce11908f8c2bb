"""Plain-PyTorch definitions of every ``torch.ops.mblm`` operator: the meaning of correct.

Written for clarity, not speed. Tests compare the C++/CUDA kernels against these functions,
and the op wrappers fall back to them (with a one-time warning) for cases no kernel covers.
float64 inputs are computed in float64; every other floating dtype is computed in float32 and
returned in the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# patch family: hierarchical padding / reshaping and stage-input assembly
# ---------------------------------------------------------------------------------------------


def patch_pad_ref(ids: Tensor, inner_sizes: Sequence[int], pad_id: int) -> Tensor:
    """Right-pads flat byte ids and lays them out as patches.

    ids: (B, L) integer tensor. inner_sizes: the patch sizes of every stage below the global
    one, (P_1, ..., P_{n-1}) (empty for a 1-stage model). Returns (B, P0', P_1, ..., P_{n-1})
    with P0' = ceil(L / prod(inner_sizes)), padded on the right with ``pad_id``.
    """
    batch, length = ids.shape
    inner = math.prod(inner_sizes)
    num_patches = -(-length // inner)
    padded = torch.full((batch, num_patches * inner), pad_id, dtype=ids.dtype, device=ids.device)
    padded[:, :length] = ids
    return padded.reshape(batch, num_patches, *inner_sizes)


def stage_input_ref(x: Tensor, start: Tensor, pos: Tensor | None, prev: Tensor | None) -> Tensor:
    """Assembles one stage's input sequence.

    x: (N, S, D) embedded patches; start: (D,) the stage's start token; pos: (S, D) positional
    embeddings added to x (or None); prev: (N, S, D) the previous stage's projected output (or
    None). Returns (N, 1 + S, D): row 0 is ``start``, row j + 1 is ``(x[:, j] + pos[j]) +
    prev[:, j]`` (additions in that order).
    """
    h = x if pos is None else x + pos
    out = torch.cat((start.expand(x.shape[0], 1, x.shape[2]), h), dim=1)
    if prev is not None:
        out = out + torch.nn.functional.pad(prev, (0, 0, 1, 0))
    return out


def patch_unpatch_ref(y: Tensor, length: int, with_start: bool) -> Tensor:
    """Reads the local stage's output back into flat byte order.

    y: (B, ..., 1 + P, D) local-stage outputs, position 0 of every local sequence being its start
    token. Drops every start position, flattens the patches in row-major order and, when
    ``with_start``, puts the very first start output (y[:, 0, ..., 0]) in front. Returns the first
    ``length`` rows: (B, length, D). ``length`` must not exceed the rows available.
    """
    batch, dim = y.shape[0], y.shape[-1]
    flat = y[..., 1:, :].reshape(batch, -1, dim)
    if with_start:
        first = y.reshape(batch, -1, y.shape[-2], dim)[:, 0, 0]
        flat = torch.cat((first[:, None], flat), dim=1)
    return flat[:, :length]


# ---------------------------------------------------------------------------------------------
# attention family: multi-head attention with per-head K and V, optional half-split rotary
# ---------------------------------------------------------------------------------------------


def rotary_half_ref(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-split rotary embedding (MEGABYTE / GPT-NeoX layout).

    t: (N, S, H, Dh); cos, sin: (S, Dh) with the frequencies duplicated over both halves.
    ``t * cos + rotate_half(t) * sin`` with ``rotate_half([a, b]) = [-b, a]``, computed in the
    compute dtype of ``t``.
    """
    ct = t.to(_compute_dtype(t))
    a, b = ct.chunk(2, dim=-1)
    rotated = torch.cat((-b, a), dim=-1)
    c = cos.to(ct.dtype)[None, :, None, :]
    s = sin.to(ct.dtype)[None, :, None, :]
    return ct * c + rotated * s


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor | None,
    sin: Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Multi-head attention; every head has its own K and V.

    q, k, v: (N, S, H, Dh); cos, sin: (S, Dh) or both None (no rotary; applied to q and k
    only); causal: position i attends to positions <= i; scale: multiplies q.k.
    Returns out (N, S, H, Dh) in the input dtype and lse (N, H, S) float32 (float64 for float64
    input): the log-sum-exp of the scaled scores of every query row.
    """
    cdt = _compute_dtype(q)
    qc, kc, vc = (t.to(cdt) for t in (q, k, v))
    if cos is not None and sin is not None:
        qc, kc = rotary_half_ref(qc, cos, sin), rotary_half_ref(kc, cos, sin)
    scores = torch.einsum("nihd,njhd->nhij", qc, kc) * scale
    if causal:
        s = scores.shape[-1]
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    out = torch.einsum("nhij,njhd->nihd", probs, vc)
    return out.to(q.dtype), lse
