"""attn_kv_fwd / attn_kv_bwd (``attention_kv``): attention with k and v packed as one
(N, S, 2, H, Dh) tensor, whose gradient comes packed. Checked against ``attention`` on the two
views (same kernels: bitwise equal), the reference, opcheck, gradcheck, bad inputs, fakes and
compile."""

from __future__ import annotations

import pytest
import torch
from test_attention import make_rotary, table_dtype
from tolerances import GRAD_TOL

import mblm.ops  # noqa: F401
from mblm.ops.attention import attention, attention_kv
from mblm.ops.reference import attention_ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def make_q_kv(n, s, h, d, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    xq = torch.randn(n, s, h * d, generator=gen, dtype=torch.float64).to(device, dtype)
    xkv = torch.randn(n, s, 2 * h * d, generator=gen, dtype=torch.float64).to(device, dtype)
    return xq.requires_grad_(), xkv.requires_grad_()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "s, causal, rotary", [(9, True, True), (17, False, False), (130, True, True), (1, True, False)]
)
def test_equals_attention_on_views(device, dtype, s, causal, rotary):
    n, h, d = 3, 2, 16
    xq, xkv = make_q_kv(n, s, h, d, dtype, device, seed=s)
    cos, sin = make_rotary(s, d, table_dtype(dtype), device) if rotary else (None, None)
    grad = torch.randn(n, s, h, d, dtype=torch.float64).to(device, dtype)
    q = xq.view(n, s, h, d)
    out = attention_kv(q, xkv.view(n, s, 2, h, d), causal=causal, cos=cos, sin=sin)
    got = torch.autograd.grad(out, (xq, xkv), grad)
    k, v = (t.view(n, s, h, d) for t in xkv.chunk(2, dim=-1))
    ref = attention(q, k, v, causal=causal, cos=cos, sin=sin)
    exp = torch.autograd.grad(ref, (xq, xkv), grad)
    assert torch.equal(out, ref)
    for a, b in zip(got, exp, strict=True):
        assert torch.equal(a, b)
    if dtype == torch.float64:
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out_ref, _ = attention_ref(qq, kk, vv, cos, sin, causal, d**-0.5)
        gq, gk, gv = torch.autograd.grad(out_ref, (qq, kk, vv), grad)
        torch.testing.assert_close(got[0].view(n, s, h, d), gq, **GRAD_TOL[dtype])
        torch.testing.assert_close(
            got[1], torch.cat((gk, gv), dim=2).view(n, s, -1), **GRAD_TOL[dtype]
        )


def test_packed_gradient_layout_and_strided_kv():
    n, s, h, d = 2, 7, 2, 8
    base = torch.randn(n, s, 3, h, d, dtype=torch.float64)
    q = base[:, :, 0].detach().requires_grad_()
    kv = base[:, :, 1:].detach().requires_grad_()  # a non-contiguous (N, S, 2, H, Dh) view
    assert not kv.is_contiguous()
    out, lse = torch.ops.mblm.attn_kv_fwd(q, kv, None, None, True, 0.3)
    gq, gkv = torch.ops.mblm.attn_kv_bwd(
        torch.ones_like(out), q, kv, out, lse, None, None, True, 0.3
    )
    assert gkv.shape == kv.shape and gkv.is_contiguous()
    gq2, gk, gv = torch.ops.mblm.attn_bwd(
        torch.ones_like(out), q, kv[:, :, 0], kv[:, :, 1], out, lse, None, None, True, 0.3
    )
    assert torch.equal(gq, gq2) and torch.equal(gkv[:, :, 0], gk) and torch.equal(gkv[:, :, 1], gv)


def test_gradcheck_float64():
    n, s, h, d = 2, 5, 2, 4
    xq, xkv = make_q_kv(n, s, h, d, torch.float64, seed=3)
    cos, sin = make_rotary(s, d, torch.float64)
    torch.autograd.gradcheck(
        lambda a, b: attention_kv(
            a.view(n, s, h, d), b.view(n, s, 2, h, d), causal=True, cos=cos, sin=sin
        ),
        (xq, xkv),
    )


def test_dropout_takes_the_reference_path():
    xq, xkv = make_q_kv(2, 5, 2, 4, seed=4)
    torch.manual_seed(0)
    out = attention_kv(
        xq.view(2, 5, 2, 4), xkv.view(2, 5, 2, 2, 4), causal=True, dropout_p=0.5, training=True
    )
    out.sum().backward()
    assert xkv.grad is not None and xkv.grad.shape == xkv.shape


@pytest.mark.parametrize(
    "kv_shape, match",
    [
        ((2, 5, 2, 2), "kv must have 5 dims"),
        ((2, 5, 3, 2, 4), r"kv.size\(2\) must be 2"),
        ((2, 6, 2, 2, 4), "kv must have shape"),
        ((2, 5, 2, 2, 8), "kv must have shape"),
    ],
)
def test_bad_kv(kv_shape, match):
    q = torch.randn(2, 5, 2, 4)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mblm.attn_kv_fwd(q, torch.randn(kv_shape), None, None, True, 0.5)
    out, lse = torch.ops.mblm.attn_fwd(q, q, q, None, None, True, 0.5)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mblm.attn_kv_bwd(out, q, torch.randn(kv_shape), out, lse, None, None, True, 0.5)


def test_bad_dtype_and_last_stride():
    q = torch.randn(2, 5, 2, 4)
    with pytest.raises(RuntimeError, match="has dtype"):
        torch.ops.mblm.attn_kv_fwd(q, torch.randn(2, 5, 2, 2, 4).double(), None, None, True, 0.5)
    kv = torch.randn(2, 5, 2, 2, 8)[..., ::2]
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        torch.ops.mblm.attn_kv_fwd(q, kv, None, None, True, 0.5)


def test_meta_shapes():
    q = torch.empty(3, 7, 2, 8, device="meta")
    kv = torch.empty(3, 7, 2, 2, 8, device="meta")
    out, lse = torch.ops.mblm.attn_kv_fwd(q, kv, None, None, True, 0.5)
    assert out.shape == q.shape and lse.shape == (3, 2, 7)
    gq, gkv = torch.ops.mblm.attn_kv_bwd(out, q, kv, out, lse, None, None, True, 0.5)
    assert gq.shape == q.shape and gkv.shape == kv.shape


FAST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for i, (s, rotary, dtype) in enumerate([(9, True, torch.float32), (17, False, torch.float64)]):
        n, h, d = 2, 2, 8
        xq, xkv = make_q_kv(n, s, h, d, dtype, device, seed=i)
        q, kv = xq.view(n, s, h, d), xkv.view(n, s, 2, h, d)
        cos, sin = make_rotary(s, d, table_dtype(dtype), device) if rotary else (None, None)
        kwargs = {} if i == 0 else {"test_utils": FAST_UTILS}
        torch.library.opcheck(
            torch.ops.mblm.attn_kv_fwd.default, (q, kv, cos, sin, True, 0.3), **kwargs
        )
        out, lse = torch.ops.mblm.attn_kv_fwd(q.detach(), kv.detach(), cos, sin, True, 0.3)
        torch.library.opcheck(
            torch.ops.mblm.attn_kv_bwd.default,
            (torch.randn_like(out), q.detach(), kv.detach(), out, lse, cos, sin, True, 0.3),
            **kwargs,
        )


def test_compile_fullgraph_equals_eager():
    n, s, h, d = 2, 9, 2, 8

    def fn(xq, xkv):
        return attention_kv(xq.view(n, s, h, d), xkv.view(n, s, 2, h, d), causal=True) * 2

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    xq, xkv = make_q_kv(n, s, h, d, seed=5)
    out = compiled(xq, xkv)
    torch.testing.assert_close(out, fn(xq, xkv), rtol=0, atol=0)
    got = torch.autograd.grad(out.sum(), (xq, xkv))
    exp = torch.autograd.grad(fn(xq, xkv).sum(), (xq, xkv))
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
