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


# ---------------------------------------------------------------------------------------------
# norm family: MEGABYTE's RMSNorm, optionally over the token-shifted input
# ---------------------------------------------------------------------------------------------


def token_shift_ref(x: Tensor) -> Tensor:
    """RWKV's token shift as MEGABYTE applies it: of the last axis split by ``chunk(2)`` (the
    first ceil(D / 2) features kept), the second part moves one position down axis -2; position
    0 of that part becomes zero. x: (..., S, D)."""
    keep = (x.shape[-1] + 1) // 2
    shifted = torch.nn.functional.pad(x[..., :-1, keep:], (0, 0, 1, 0))
    return torch.cat((x[..., :keep], shifted), dim=-1)


def rms_norm_ref(
    x: Tensor, g: Tensor, scale: float, eps: float, shift: bool
) -> tuple[Tensor, Tensor]:
    """MEGABYTE's RMSNorm (the RMS is clamped, not eps-added), optionally of ``token_shift(x)``.

    x: (..., D) ((..., S, D) with shift); g: (D,). With u = token_shift(x) if shift else x:
    ``rms = scale * ||u||_2`` over the last axis and ``y = u / max(rms, eps) * g``.
    Returns y in x's dtype and rms (x.shape[:-1], unclamped) in float32 (float64 for float64).
    """
    cdt = _compute_dtype(x)
    u = x.to(cdt)
    if shift:
        u = token_shift_ref(u)
    rms = torch.linalg.vector_norm(u, dim=-1) * scale
    y = u / rms.clamp(min=eps)[..., None] * g.to(cdt)
    return y.to(x.dtype), rms


# ---------------------------------------------------------------------------------------------
# loss family: per-row cross entropy
# ---------------------------------------------------------------------------------------------


def cross_entropy_ref(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Per-row cross entropy (``F.cross_entropy(..., reduction="none")``) and its log-sum-exp.

    logits: (R, V); target: (R,) int64 in [0, V) or ``ignore_index`` (loss 0, no gradient).
    Returns loss (R,) in logits' dtype and lse (R,) float32 (float64 for float64 logits).
    """
    lc = logits.to(_compute_dtype(logits))
    lse = torch.logsumexp(lc, dim=-1)
    ignored = target == ignore_index
    picked = lc.gather(1, target.masked_fill(ignored, 0)[:, None])[:, 0]
    loss = torch.where(ignored, torch.zeros_like(lse), lse - picked)
    return loss.to(logits.dtype), lse


# ---------------------------------------------------------------------------------------------
# gelu family: the backward of an (exact, erf-based) GELU that recomputes its output
# ---------------------------------------------------------------------------------------------


def gelu_bwd_ref(grad_act: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """Given h and the gradient of ``act = gelu(h)``: (grad_h, act), both in h's dtype.
    ``grad_h = grad_act * (Phi(h) + h * phi(h))``, ``act = h * Phi(h)``."""
    cdt = _compute_dtype(h)
    hc, gc = h.to(cdt), grad_act.to(cdt)
    act = torch.nn.functional.gelu(hc)
    grad_h = torch.ops.aten.gelu_backward(gc, hc)
    return grad_h.to(h.dtype), act.to(h.dtype)


# ---------------------------------------------------------------------------------------------
# conv / scan / ssd families: the Mamba primitives (causal depthwise conv1d, Mamba1 selective
# scan, Mamba2 state-space-dual scan). All three return the state needed to continue the sequence
# later, so that running a sequence in pieces (or one step at a time) equals one full run.
# ---------------------------------------------------------------------------------------------


def causal_conv1d_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    initial_state: Tensor | None,
    activation: bool,
) -> tuple[Tensor, Tensor]:
    """Depthwise causal convolution over time (the causal-conv1d package's semantics).

    x: (B, C, L); weight: (C, K); bias: (C,) or None; initial_state: (B, C, K-1), the K-1 inputs
    that precede x[:, :, 0] (oldest first), or None for zeros; activation: apply SiLU.
    ``y[b, c, t] = bias[c] + sum_k weight[c, k] * xx[b, c, t + k]`` where ``xx`` is
    ``initial_state`` followed by ``x`` (a cross-correlation, as torch's conv1d).
    Returns y (B, C, L) in x's dtype and final_state (B, C, K-1) in x's dtype: the last K-1
    inputs of ``xx``, i.e. the initial_state of the continuation.
    """
    cdt = _compute_dtype(x)
    batch, channels, length = x.shape
    width = weight.shape[1]
    xc = x.to(cdt)
    if initial_state is None:
        prefix = xc.new_zeros(batch, channels, width - 1)
    else:
        prefix = initial_state.to(cdt)
    xx = torch.cat((prefix, xc), dim=2)
    windows = xx.unfold(2, width, 1)
    y = (windows * weight.to(cdt)[:, None, :]).sum(-1)
    if bias is not None:
        y = y + bias.to(cdt)[:, None]
    if activation:
        y = torch.nn.functional.silu(y)
    final_state = xx[:, :, length:]
    return y.to(x.dtype), final_state.to(x.dtype)


def selective_scan_ref(
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
    """Mamba1 selective scan (mamba_ssm's ``selective_scan_fn``), as a sequential recurrence.

    u, delta: (B, D, L); A: (D, N) (real, normally negative); B, C: (B, N, L), shared by all
    channels; D: (D,) skip or None; z: (B, D, L) gate or None; delta_bias: (D,) or None;
    initial_state: (B, D, N) or None for zeros. With ``dt = delta (+ delta_bias)`` (then
    softplus when ``delta_softplus``), per channel d and step t:

        h_t = exp(dt_t A[d]) * h_{t-1} + dt_t * B_t * u_t         (zero-order hold A, Euler B)
        y_t = <h_t, C_t> + D[d] * u_t;   y_t *= silu(z_t) if z is given

    Math in float32 (float64 for float64 u). Returns y (B, D, L) in u's dtype and the last state
    h_{L-1} (B, D, N) in the compute dtype (the initial_state of the continuation).
    """
    cdt = _compute_dtype(u)
    uc = u.to(cdt)
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = torch.nn.functional.softplus(dt)
    Ac, Bc, Cc = A.to(cdt), B.to(cdt), C.to(cdt)
    decay = torch.exp(dt[..., None] * Ac[:, None, :])
    drive = (dt * uc)[..., None] * Bc.transpose(1, 2)[:, None, :, :]
    batch, channels, length = u.shape
    if initial_state is None:
        h = uc.new_zeros(batch, channels, A.shape[1])
    else:
        h = initial_state.to(cdt)
    ys = []
    for t in range(length):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, Cc[:, :, t]))
    y = torch.stack(ys, dim=2) if ys else uc.new_zeros(batch, channels, 0)
    if D is not None:
        y = y + D.to(cdt)[:, None] * uc
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(cdt))
    return y.to(u.dtype), h


def ssd_ref(
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
    """Mamba2 scan (mamba_ssm's ``mamba_chunk_scan_combined``), as a sequential recurrence.

    x: (B, L, H, P); dt: (B, L, H); A: (H,) one scalar per head; B, C: (B, L, G, N) with G
    dividing H (head h reads group h // (H / G)); D: (H,) or (H, P) skip, or None; dt_bias: (H,)
    or None; initial_state: (B, H, P, N) or None for zeros. With ``d = dt (+ dt_bias)`` (then
    softplus when ``dt_softplus``), per head h and step t:

        S_t = exp(d_t A[h]) * S_{t-1} + d_t * x_t (outer) B_t        S_t: (P, N)
        y_t = S_t C_t + D[h] * x_t

    The chunked SSD algorithm computes the same quantity up to reassociation. Math in float32
    (float64 for float64 x). Returns y (B, L, H, P) in x's dtype and the last state S_{L-1}
    (B, H, P, N) in the compute dtype.
    """
    cdt = _compute_dtype(x)
    batch, length, heads, headdim = x.shape
    groups, state = B.shape[2], B.shape[3]
    xc = x.to(cdt)
    d = dt.to(cdt)
    if dt_bias is not None:
        d = d + dt_bias.to(cdt)
    if dt_softplus:
        d = torch.nn.functional.softplus(d)
    Bh = B.to(cdt).repeat_interleave(heads // groups, dim=2)
    Ch = C.to(cdt).repeat_interleave(heads // groups, dim=2)
    decay = torch.exp(d * A.to(cdt))
    dx = d[..., None] * xc
    if initial_state is None:
        s = xc.new_zeros(batch, heads, headdim, state)
    else:
        s = initial_state.to(cdt)
    ys = []
    for t in range(length):
        s = decay[:, t, :, None, None] * s + dx[:, t, :, :, None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", s, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else xc.new_zeros(batch, 0, heads, headdim)
    if D is not None:
        Dc = D.to(cdt)
        y = y + (Dc[:, None] if Dc.dim() == 1 else Dc) * xc
    return y.to(x.dtype), s
