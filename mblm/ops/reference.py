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
import torch.utils.checkpoint
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
    if length == 0:
        y = xc.new_zeros(batch, channels, 0)
    else:
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
    uc, dt, Ac, Bc, Cc, h = _scan_inputs(
        u, delta, A, B, C, delta_bias, delta_softplus, initial_state
    )
    decay = torch.exp(dt[..., None] * Ac[:, None, :])
    drive = (dt * uc)[..., None] * Bc.transpose(1, 2)[:, None, :, :]
    batch, channels, length = u.shape
    ys = []
    for t in range(length):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, Cc[:, :, t]))
    y = torch.stack(ys, dim=2) if ys else uc.new_zeros(batch, channels, 0)
    return _scan_output(y, uc, D, z).to(u.dtype), h


def _scan_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    initial_state: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The scan's operands in the compute dtype: u, the step dt = softplus?(delta + bias), A, B,
    C, and the initial state (zeros if None)."""
    cdt = _compute_dtype(u)
    uc = u.to(cdt)
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = torch.nn.functional.softplus(dt)
    if initial_state is None:
        h = uc.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    else:
        h = initial_state.to(cdt)
    return uc, dt, A.to(cdt), B.to(cdt), C.to(cdt), h


def _scan_output(y: Tensor, uc: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """y (+ D skip) (* silu(z) gate), in uc's compute dtype."""
    if D is not None:
        y = y + D.to(uc.dtype)[:, None] * uc
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(uc.dtype))
    return y


def selective_scan_chunked_ref(
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
    chunk_size: int = 128,
) -> tuple[Tensor, Tensor]:
    """``selective_scan_ref`` computed chunk by chunk, each chunk by a parallel prefix scan: the
    steps h -> a_t * h + b_t compose as (a2, b2) o (a1, b1) = (a2 a1, a2 b1 + b2), so
    log2(chunk_size) doubling passes over a chunk's (B, D, T, N) tensors give every h_t of it
    from the state entering it. With gradients enabled each chunk is recomputed in backward
    (torch checkpoint), so memory stays that of the states between chunks. Same arguments and
    results as ``selective_scan_ref``; the scan's PyTorch fallback on GPUs, where a loop over
    steps would launch kernels per position."""
    uc, dt, Ac, Bc, Cc, h = _scan_inputs(
        u, delta, A, B, C, delta_bias, delta_softplus, initial_state
    )
    batch, channels, length = u.shape

    def chunk(h0: Tensor, dt_c: Tensor, u_c: Tensor, b_c: Tensor, c_c: Tensor):
        a = torch.exp(dt_c[..., None] * Ac[:, None, :])  # (B, D, T, N)
        b = (dt_c * u_c)[..., None] * b_c.transpose(1, 2)[:, None]
        step = 1
        while step < a.shape[2]:
            # compose every step with the span of `step` steps before it (identity before 0)
            a_prev = torch.nn.functional.pad(a[:, :, :-step], (0, 0, step, 0), value=1.0)
            b_prev = torch.nn.functional.pad(b[:, :, :-step], (0, 0, step, 0), value=0.0)
            b = a * b_prev + b
            a = a * a_prev
            step *= 2
        hs = a * h0[:, :, None, :] + b
        return torch.einsum("bdtn,bnt->bdt", hs, c_c), hs[:, :, -1]

    recompute = torch.is_grad_enabled()
    ys = []
    for start in range(0, length, chunk_size):
        part = slice(start, min(start + chunk_size, length))
        args = (h, dt[:, :, part], uc[:, :, part], Bc[:, :, part], Cc[:, :, part])
        if recompute:
            y_c, h = torch.utils.checkpoint.checkpoint(chunk, *args, use_reentrant=False)
        else:
            y_c, h = chunk(*args)
        ys.append(y_c)
    y = torch.cat(ys, dim=2) if ys else uc.new_zeros(batch, channels, 0)
    return _scan_output(y, uc, D, z).to(u.dtype), h


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


def _ssd_chunk_decays(log_decay: Tensor) -> Tensor:
    """Within-chunk decay matrix: log_decay (..., T) -> (..., T, T) with entry [i, j] =
    exp(log_decay[j + 1] + ... + log_decay[i]) for j <= i (1 on the diagonal) and 0 above it.

    The sums are taken directly (a masked cumulative sum down each column), not as differences
    of one running sum, so they keep full precision however large the running sum grows.
    """
    steps = log_decay.shape[-1]
    below = torch.ones(steps, steps, dtype=torch.bool, device=log_decay.device).tril(-1)
    terms = log_decay[..., :, None].expand(*log_decay.shape, steps).masked_fill(~below, 0.0)
    sums = terms.cumsum(dim=-2)
    causal = torch.ones(steps, steps, dtype=torch.bool, device=log_decay.device).tril()
    return sums.masked_fill(~causal, float("-inf")).exp()


def ssd_chunked_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """``ssd_ref`` computed by the chunked state-space-dual algorithm (Dao & Gu 2024, §6-7, the
    "SSD minimal" listing): the sequence is cut into chunks of ``chunk_size`` steps and

    1. inside a chunk the scan is a masked "attention": y_i += sum_{j <= i} (C_i . B_j)
       exp(a_{j+1} + ... + a_i) d_j x_j, with a_t = d_t A the per-step log-decay;
    2. each chunk's own contribution to the state at its end: sum_j exp(a_{j+1} + ... + a_end)
       d_j x_j (outer) B_j;
    3. the states entering every chunk follow from a recurrence over chunks (initial_state at
       the first);
    4. the state entering a chunk reaches each output y_i of it through C_i, decayed by
       exp(a_first + ... + a_i).

    Arguments and results as ``ssd_ref`` (same meaning, differentiable with torch autograd); the
    work is batched matrix products, which is why it serves as the speed peer of the kernels.
    A length that is not a multiple of ``chunk_size`` is padded with steps of dt = 0 (decay 1,
    no input), which leave the state unchanged.
    """
    cdt = _compute_dtype(x)
    batch, length, heads, headdim = x.shape
    groups, state = B.shape[2], B.shape[3]
    per_group = heads // groups
    d = dt.to(cdt)
    if dt_bias is not None:
        d = d + dt_bias.to(cdt)
    if dt_softplus:
        d = torch.nn.functional.softplus(d)
    xc = x.to(cdt)
    dx = d[..., None] * xc
    log_decay = d * A.to(cdt)

    steps = chunk_size
    chunks = -(-length // steps)
    pad = chunks * steps - length

    def chunked(t: Tensor) -> Tensor:  # (b, L, ...) -> (b, c, T, ...), zero-padded in time
        t = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, chunks, steps, *t.shape[2:])

    # heads split as (group, head within group): B and C are shared within a group
    xs = chunked(dx).reshape(batch, chunks, steps, groups, per_group, headdim)
    Bs = chunked(B.to(cdt))  # (b, c, T, g, n)
    Cs = chunked(C.to(cdt))
    a = chunked(log_decay).permute(0, 3, 1, 2)  # (b, h, c, T)
    a = a.reshape(batch, groups, per_group, chunks, steps)
    run = a.cumsum(dim=-1)  # log-decay from the chunk start to each step (inclusive)

    # 1. within-chunk outputs
    mix = torch.einsum("bclgn,bcsgn->bgcls", Cs, Bs)[:, :, None] * _ssd_chunk_decays(a)
    y = torch.einsum("bgrcls,bcsgrp->bclgrp", mix, xs)
    # 2. each chunk's contribution to the state at its end
    to_end = torch.exp(run[..., -1:] - run).permute(0, 3, 4, 1, 2)  # (b, c, T, g, r)
    own = torch.einsum("bcsgn,bcsgrp->bcgrpn", Bs, xs * to_end[..., None])
    # 3. states entering each chunk
    through = torch.exp(run[..., -1])  # (b, g, r, c): decay across a whole chunk
    if initial_state is None:
        s = xc.new_zeros(batch, groups, per_group, headdim, state)
    else:
        s = initial_state.to(cdt).reshape(batch, groups, per_group, headdim, state)
    entering = []
    for across, added in zip(through.unbind(-1), own.unbind(1), strict=True):
        entering.append(s)
        s = across[..., None, None] * s + added
    # 4. entering states to the chunk's outputs
    if chunks:
        states = torch.stack(entering, dim=1)  # (b, c, g, r, p, n)
        from_start = torch.exp(run).permute(0, 3, 4, 1, 2)[..., None]  # (b, c, T, g, r, 1)
        y = y + torch.einsum("bclgn,bcgrpn->bclgrp", Cs, states) * from_start
    y = y.reshape(batch, chunks * steps, heads, headdim)[:, :length]
    if D is not None:
        Dc = D.to(cdt)
        y = y + (Dc[:, None] if Dc.dim() == 1 else Dc) * xc
    return y.to(x.dtype), s.reshape(batch, heads, headdim, state)


# ---------------------------------------------------------------------------------------------
# decode family: attention of a few new positions against a key/value cache (cached generation)
# ---------------------------------------------------------------------------------------------


def attn_decode_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lens: Tensor,
    rows: Tensor | None,
    cos: Tensor | None,
    sin: Tensor | None,
    scale: float,
) -> Tensor:
    """Appends S new positions to a key/value cache and attends from them (causal).

    q, k, v: (R, S, H, Dh), the new positions' queries, keys and values (k and q un-rotated).
    k_cache, v_cache: (B, C, H, Dh); query row r uses cache row ``rows[r]`` (``r`` when rows is
    None, then R == B), which holds ``lens[r]`` earlier positions. cos, sin: (R, S, Dh) half-split
    rotary tables of the new positions (both None: no rotary).

    Writes ``rotary(k)`` and ``v`` into positions ``lens[r] .. lens[r] + S - 1`` of the cache row
    (in place, in the cache dtype); query s of row r, at position ``lens[r] + s``, attends to the
    cached keys ``0 .. lens[r] + s``. Returns (R, S, H, Dh) in q's dtype.
    """
    cdt = _compute_dtype(q)
    num_rows, seq = q.shape[0], q.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    qc, kc = q.to(cdt), k.to(cdt)
    if cos is not None and sin is not None:

        def rotate(t: Tensor) -> Tensor:
            a, b = t.chunk(2, dim=-1)
            c, s = cos.to(cdt)[:, :, None, :], sin.to(cdt)[:, :, None, :]
            return t * c + torch.cat((-b, a), dim=-1) * s

        qc, kc = rotate(qc), rotate(kc)
    for r in range(num_rows):
        row = int(rows[r]) if rows is not None else r
        start = int(lens[r])
        k_cache[row, start : start + seq] = kc[r].to(k_cache.dtype)
        v_cache[row, start : start + seq] = v[r].to(v_cache.dtype)
        keys = k_cache[row, : start + seq].to(cdt)
        values = v_cache[row, : start + seq].to(cdt)
        scores = torch.einsum("shd,jhd->hsj", qc[r], keys) * scale
        visible = torch.arange(start + seq, device=q.device)[None, :] <= (
            start + torch.arange(seq, device=q.device)[:, None]
        )
        scores = scores.masked_fill(~visible, float("-inf"))
        out[r] = torch.einsum("hsj,jhd->shd", scores.softmax(dim=-1), values).to(q.dtype)
    return out
