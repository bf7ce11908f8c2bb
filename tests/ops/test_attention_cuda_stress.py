"""GPU-only stress tests of the attention CUDA kernels (``torch.ops.mblm.attn_fwd`` / ``attn_bwd``).

The shapes the model really runs: the local stages' huge batches of very short sequences (more
(sequence, head) pairs than any grid dimension holds in one launch of a naive kernel) and the
global stages' long sequences. Values and gradients are compared with ``attention_ref`` computed in
float32 from the same (rounded) inputs, in chunks so that the reference fits in memory. Every case
checks the forward (out, lse) and the backward (grad q, k, v). Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

import mblm.ops  # noqa: F401  (registers torch.ops.mblm)
from mblm.ops.reference import attention_ref

pytestmark = pytest.mark.cuda

# max |kernel - reference| <= TOL * max |reference|, per chunk and tensor (bf16/fp16 kernels round
# P and dS to the input type for the tensor cores, as flash attention does)
TOL = {torch.bfloat16: 4e-2, torch.float16: 6e-3, torch.float32: 1e-4}


def _rotary(seq: int, dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float64, device=device), inv)
    freqs = torch.cat((freqs, freqs), dim=-1)
    return freqs.cos().float(), freqs.sin().float()


def _inputs(n: int, s: int, h: int, d: int, dtype: torch.dtype, seed: int):
    """q (N, S, H, Dh) and k, v as the two halves of one (N, S, 2 H Dh) tensor, like to_kv."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(n, s, h, d, device="cuda", generator=gen, dtype=dtype)
    kv = torch.randn(n, s, 2 * h * d, device="cuda", generator=gen, dtype=dtype)
    k, v = (t.view(n, s, h, d) for t in kv.chunk(2, dim=-1))
    grad_out = torch.randn(n, s, h, d, device="cuda", generator=gen, dtype=dtype)
    return q, k, v, grad_out


def _close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float, where: str) -> None:
    got, ref = got.float(), ref.float()
    assert torch.isfinite(got).all(), f"{name} has non-finite values ({where})"
    err = (got - ref).abs().max().item()
    bound = tol * max(ref.abs().max().item(), 1e-3)
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e} ({where})"


def _reference(q, k, v, grad_out, cos, sin, causal, scale):
    """attention_ref in float32 with autograd: out, lse, grad q, k, v."""
    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    out, lse = attention_ref(qf, kf, vf, cos, sin, causal, scale)
    out.backward(grad_out.float())
    return out.detach(), lse.detach(), qf.grad, kf.grad, vf.grad


def _check(q, k, v, grad_out, cos, sin, causal, scale, chunk_dim: int, chunk: int) -> None:
    """Runs the kernels once on everything, then the reference chunk by chunk along chunk_dim
    (0: sequences, 2: heads; both are independent problems)."""
    tol = TOL[q.dtype]
    out, lse = torch.ops.mblm.attn_fwd(q, k, v, cos, sin, causal, scale)
    dq, dk, dv = torch.ops.mblm.attn_bwd(grad_out, q, k, v, out, lse, cos, sin, causal, scale)
    torch.cuda.synchronize()
    size = q.shape[chunk_dim]
    for start in range(0, size, chunk):
        sl = [slice(None)] * 4
        sl[chunk_dim] = slice(start, min(size, start + chunk))
        sl = tuple(sl)
        lse_sl = (sl[0], sl[2], sl[1])  # lse is (N, H, S)
        ref = _reference(q[sl], k[sl], v[sl], grad_out[sl], cos, sin, causal, scale)
        where = f"{tuple(q.shape)} {q.dtype} causal={causal} rotary={cos is not None} chunk {start}"
        _close("out", out[sl], ref[0], tol, where)
        _close("lse", lse[lse_sl], ref[1], tol / 4, where)
        _close("grad_q", dq[sl], ref[2], tol, where)
        _close("grad_k", dk[sl], ref[3], tol, where)
        _close("grad_v", dv[sl], ref[4], tol, where)
        del ref


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    torch.cuda.empty_cache()


@pytest.mark.parametrize(
    "seq, rotary",
    [(9, False), (17, False), (17, True)],
)
def test_many_short_sequences(seq: int, rotary: bool) -> None:
    """131072 sequences x 16 heads (2M (sequence, head) pairs), Dh 64, bf16, causal."""
    n, h, d = 131072, 16, 64
    q, k, v, grad_out = _inputs(n, seq, h, d, torch.bfloat16, seed=seq)
    cos, sin = _rotary(seq, d, "cuda") if rotary else (None, None)
    _check(q, k, v, grad_out, cos, sin, True, d**-0.5, chunk_dim=0, chunk=8192)


@pytest.mark.parametrize("seq", [9, 33, 65, 100, 128])
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_short_sequences_shapes(seq: int, dim: int) -> None:
    """Every local-regime block shape (1..8 warps), bidirectional, fp16, with rotary."""
    q, k, v, grad_out = _inputs(4096, seq, 4, dim, torch.float16, seed=seq + dim)
    cos, sin = _rotary(seq, dim, "cuda")
    _check(q, k, v, grad_out, cos, sin, False, dim**-0.5, chunk_dim=0, chunk=1024)


@pytest.mark.parametrize("seq", [4096, 8192])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_long_sequences(seq: int, dim: int, causal: bool) -> None:
    """Long sequences (the global stage), bf16, with rotary; reference one head at a time."""
    q, k, v, grad_out = _inputs(2, seq, 4, dim, torch.bfloat16, seed=seq + dim)
    cos, sin = _rotary(seq, dim, "cuda")
    _check(q, k, v, grad_out, cos, sin, causal, dim**-0.5, chunk_dim=2, chunk=1)


@pytest.mark.parametrize(
    "dtype, dim",
    [(torch.float16, 64), (torch.float32, 64), (torch.bfloat16, 256), (torch.float32, 136)],
)
def test_long_sequences_other_paths(dtype: torch.dtype, dim: int) -> None:
    """The CUDA-core path (float32, Dh > 128) and float16 on a long causal sequence."""
    q, k, v, grad_out = _inputs(1, 3000, 2, dim, dtype, seed=dim)
    cos, sin = _rotary(3000, dim, "cuda")
    _check(q, k, v, grad_out, cos, sin, True, dim**-0.5, chunk_dim=2, chunk=1)


def test_many_sequences_long_grid() -> None:
    """More (sequence, head) pairs than 2^24 in one call: int64 tile indices, no grid overflow."""
    n, s, h, d = 1 << 21, 9, 9, 16  # 18.9M pairs, Dh 16 (padded to the 32 bucket)
    q, k, v, grad_out = _inputs(n, s, h, d, torch.bfloat16, seed=3)
    _check(q, k, v, grad_out, None, None, True, 0.25, chunk_dim=0, chunk=1 << 18)
