"""Attention family: ``torch.ops.mblm.attn_fwd`` / ``attn_bwd`` and ``mblm.ops.attention.attention``.

Compared with ``attention_ref`` (values: out and lse; gradients: the reference's autograd under one
upstream gradient), plus opcheck, gradcheck, randomized shapes, the strided k/v layout the model
passes (the two halves of one ``to_kv`` output), the tiled long-sequence path, bad inputs,
fallbacks and ``torch.compile``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import devices
from tolerances import GRAD_TOL, VALUE_TOL

import mblm.ops  # noqa: F401  (registers torch.ops.mblm)
from mblm.ops import _common
from mblm.ops.attention import attention
from mblm.ops.reference import attention_ref

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def make_qkv(
    n, s, h, d, dtype=torch.float32, device="cpu", seed=0, layout="model", requires_grad=False
):
    """q, k, v of shape (N, S, H, Dh). layout "model": q a view of a (N, S, H*Dh) tensor, k and v
    the halves of one (N, S, 2*H*Dh) tensor (as to_q / to_kv give them); "heads_first": views of
    (N, H, S, Dh) tensors; "contiguous": three contiguous tensors."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(
            device=device, dtype=dtype
        )

    if layout == "model":
        q = rand(n, s, h * d).view(n, s, h, d)
        k, v = (t.view(n, s, h, d) for t in rand(n, s, 2 * h * d).chunk(2, dim=-1))
    elif layout == "heads_first":
        q, k, v = (rand(n, h, s, d).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (rand(n, s, h, d) for _ in range(3))
    if requires_grad:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return q, k, v


def make_rotary(s, d, dtype=torch.float32, device="cpu"):
    """MEGABYTE's tables: frequencies p * 10000^(-2i/d), duplicated over both halves."""
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    freqs = torch.outer(torch.arange(s, dtype=torch.float64), inv)
    freqs = torch.cat((freqs, freqs), dim=-1)
    return freqs.cos().to(device, dtype), freqs.sin().to(device, dtype)


def table_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_grads(q, k, v, cos, sin, causal, scale, grad_out):
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, _ = attention_ref(qq, kk, vv, cos, sin, causal, scale)
    return torch.autograd.grad(out, (qq, kk, vv), grad_out)


def assert_close(got, expected, tol, what):
    torch.testing.assert_close(got, expected, **tol, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------
# values and gradients vs the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("seq", [1, 9, 17, 65, 129])
def test_values_and_grads_vs_reference(device, dtype, causal, rotary, seq):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only kernel dtype")
    n, h, d = 3, 2, 16
    q, k, v = make_qkv(n, seq, h, d, dtype, device, seed=seq)
    cos, sin = make_rotary(seq, d, table_dtype(dtype), device) if rotary else (None, None)
    scale = d**-0.5
    out, lse = torch.ops.mblm.attn_fwd(q, k, v, cos, sin, causal, scale)
    ref_out, ref_lse = attention_ref(q, k, v, cos, sin, causal, scale)
    assert out.dtype == dtype and out.is_contiguous() and out.shape == q.shape
    assert lse.dtype == table_dtype(dtype) and lse.shape == (n, h, seq)
    assert_close(out, ref_out, VALUE_TOL[dtype], "out")
    assert_close(lse, ref_lse, VALUE_TOL[table_dtype(dtype)], "lse")

    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    grads = torch.ops.mblm.attn_bwd(grad_out, q, k, v, out, lse, cos, sin, causal, scale)
    expected = reference_grads(q, k, v, cos, sin, causal, scale, grad_out)
    for name, got, exp in zip("qkv", grads, expected, strict=True):
        assert got.dtype == dtype and got.is_contiguous()
        assert_close(got, exp, GRAD_TOL[dtype], f"grad_{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [True, False])
def test_long_sequence_tiled_path(dtype, causal):
    """S = 1000 > the single-block limit: query/key tiles with the online softmax (forward) and
    the key-block outer loop (backward), a partial last tile, rotary."""
    n, s, h, d = 1, 1000, 2, 32
    q, k, v = make_qkv(n, s, h, d, dtype, seed=3)
    cos, sin = make_rotary(s, d, table_dtype(dtype))
    out, lse = torch.ops.mblm.attn_fwd(q, k, v, cos, sin, causal, 0.2)
    ref_out, ref_lse = attention_ref(q, k, v, cos, sin, causal, 0.2)
    assert_close(out, ref_out, VALUE_TOL[dtype], "out")
    assert_close(lse, ref_lse, VALUE_TOL[dtype], "lse")
    grad_out = torch.randn(q.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
    grads = torch.ops.mblm.attn_bwd(grad_out, q, k, v, out, lse, cos, sin, causal, 0.2)
    expected = reference_grads(q, k, v, cos, sin, causal, 0.2, grad_out)
    for name, got, exp in zip("qkv", grads, expected, strict=True):
        assert_close(got, exp, GRAD_TOL[dtype], f"grad_{name}")


@pytest.mark.parametrize("pairs", [(1, 1), (8, 4)])
def test_long_sequence_both_backward_schedules(pairs):
    """Few (n, h) pairs take the split backward (dK/dV and dQ in separate parallel passes), many
    take the per-pair one; both against the reference, bf16 included."""
    n, h = pairs
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = make_qkv(n, 200, h, 16, dtype, seed=n)
        cos, sin = make_rotary(200, 16)
        out, lse = torch.ops.mblm.attn_fwd(q, k, v, cos, sin, True, 0.25)
        grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        grads = torch.ops.mblm.attn_bwd(grad_out, q, k, v, out, lse, cos, sin, True, 0.25)
        expected = reference_grads(q, k, v, cos, sin, True, 0.25, grad_out)
        for name, got, exp in zip("qkv", grads, expected, strict=True):
            assert_close(got, exp, GRAD_TOL[dtype], f"grad_{name} N={n} H={h} {dtype}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layout", ["model", "heads_first", "contiguous"])
def test_strided_inputs(device, layout):
    """Any strides with a contiguous last dimension are read in place."""
    q, k, v = make_qkv(
        4, 17, 3, 8, torch.float32, device, seed=5, layout=layout, requires_grad=True
    )
    cos, sin = make_rotary(17, 8, device=device)
    out = attention(q, k, v, causal=True, cos=cos, sin=sin)
    ref = attention_ref(q, k, v, cos, sin, True, 8**-0.5)[0]
    assert_close(out, ref, VALUE_TOL[torch.float32], "out")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = reference_grads(q, k, v, cos, sin, True, 8**-0.5, grad_out)
    for name, got, exp in zip("qkv", grads, expected, strict=True):
        assert_close(got, exp, GRAD_TOL[torch.float32], f"grad_{name}")


@pytest.mark.parametrize("seed", range(8))
def test_randomized_shapes(seed):
    gen = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    n, s, h = pick([0, 1, 3]), pick([1, 2, 9, 17, 65, 129]), pick([1, 2, 3])
    rotary = pick([True, False])
    d = pick([8, 16, 64]) if rotary else pick([3, 8, 16, 20, 64])
    causal = pick([True, False])
    dtype = pick([torch.float32, torch.float64])
    q, k, v = make_qkv(n, s, h, d, dtype, seed=seed, requires_grad=True)
    cos, sin = make_rotary(s, d, table_dtype(dtype)) if rotary else (None, None)
    scale = float(torch.rand((), generator=gen)) + 0.05
    out = attention(q, k, v, causal=causal, scale=scale, cos=cos, sin=sin)
    ref = attention_ref(q, k, v, cos, sin, causal, scale)[0]
    what = f"N={n} S={s} H={h} Dh={d} rotary={rotary} causal={causal} {dtype}"
    assert_close(out, ref, VALUE_TOL[dtype], what)
    grad_out = torch.randn(out.shape, dtype=dtype, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), grad_out, allow_unused=True)
    expected = reference_grads(q, k, v, cos, sin, causal, scale, grad_out)
    for name, got, exp in zip("qkv", grads, expected, strict=True):
        assert_close(got, exp, GRAD_TOL[dtype], f"grad_{name} {what}")


def test_nan_propagates_like_the_reference():
    """No crash on NaN input; NaN reaches exactly the outputs the reference has NaN in."""
    q, k, v = make_qkv(2, 17, 2, 16, seed=14)
    q[0, 3, 1, 0] = float("nan")  # one query row
    k[1, 5, 0, 2] = float("nan")  # one key: every query that sees it (causal: rows >= 5)
    for causal in (True, False):
        out, lse = torch.ops.mblm.attn_fwd(q, k, v, None, None, causal, 0.25)
        ref_out, ref_lse = attention_ref(q, k, v, None, None, causal, 0.25)
        assert torch.equal(out.isnan(), ref_out.isnan()) and torch.equal(
            lse.isnan(), ref_lse.isnan()
        )
        torch.testing.assert_close(out, ref_out, equal_nan=True, **VALUE_TOL[torch.float32])


def test_empty_batch_and_sequence():
    for shape in [(0, 9, 2, 16), (2, 0, 2, 16)]:
        q, k, v = make_qkv(*shape, requires_grad=True)
        cos, sin = make_rotary(shape[1], 16)
        out, lse = torch.ops.mblm.attn_fwd(q, k, v, cos, sin, True, 0.25)
        assert out.shape == shape and lse.shape == (shape[0], shape[2], shape[1])
        attention(q, k, v, causal=True, cos=cos, sin=sin).sum().backward()
        assert q.grad.shape == shape and k.grad.shape == shape and v.grad.shape == shape


def test_default_scale_and_wrapper_equals_op():
    q, k, v = make_qkv(2, 9, 2, 16, seed=7)
    out = attention(q, k, v, causal=True)
    op_out, _ = torch.ops.mblm.attn_fwd(q, k, v, None, None, True, 16**-0.5)
    torch.testing.assert_close(out, op_out, rtol=0, atol=0)
    assert_close(
        out, attention_ref(q, k, v, None, None, True, 0.25)[0], VALUE_TOL[torch.float32], "out"
    )


def test_gradcheck_float64():
    q, k, v = make_qkv(2, 5, 2, 4, torch.float64, seed=8, requires_grad=True)
    cos, sin = make_rotary(5, 4, torch.float64)
    for causal in (True, False):
        for tables in ((cos, sin), (None, None)):

            def fn(q, k, v, causal=causal, tables=tables):
                return attention(q, k, v, causal=causal, cos=tables[0], sin=tables[1])

            assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_long_sequence_gradcheck_float64():
    """gradcheck through the tiled backward (S > 128) on a small head dim."""
    q, k, v = make_qkv(1, 130, 1, 2, torch.float64, seed=9, requires_grad=True)

    def fn(q, k, v):
        return attention(q, k, v, causal=True, scale=0.7)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


# ---------------------------------------------------------------------------------------------
# registration: opcheck, fake tensors, compile
# ---------------------------------------------------------------------------------------------

FAST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def opcheck_samples(device):
    out = []
    for i, (s, causal, rotary, dtype, grad) in enumerate(
        [
            (9, True, True, torch.float32, True),
            (17, False, False, torch.float64, False),
            (5, True, False, torch.float32, True),
            (130, True, True, torch.float32, False),
            (1, False, True, torch.float64, True),
        ]
    ):
        q, k, v = make_qkv(2, s, 2, 8, dtype, device, seed=i, requires_grad=grad)
        cos, sin = make_rotary(s, 8, table_dtype(dtype), device) if rotary else (None, None)
        out.append((q, k, v, cos, sin, causal, 8**-0.5))
    return out


def test_compile_dynamic_shapes():
    def fn(q, k, v):
        return attention(q, k, v, causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for s in (5, 9, 17):
        q, k, v = make_qkv(2, s, 2, 8, seed=s, requires_grad=True)
        out = compiled(q, k, v)
        torch.testing.assert_close(out, fn(q, k, v), rtol=0, atol=0)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        expected = torch.autograd.grad(fn(q, k, v).sum(), (q, k, v))
        for got, exp in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, exp, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
def test_opcheck_fwd(device):
    for i, args in enumerate(opcheck_samples(device)):
        utils = None if i < 2 else FAST_UTILS  # test_aot_dispatch_dynamic is the slow part
        kwargs = {} if utils is None else {"test_utils": utils}
        torch.library.opcheck(torch.ops.mblm.attn_fwd.default, args, **kwargs)


@pytest.mark.parametrize("device", devices())
def test_opcheck_bwd(device):
    for i, (q, k, v, cos, sin, causal, scale) in enumerate(opcheck_samples(device)):
        q, k, v = (t.detach() for t in (q, k, v))
        out, lse = torch.ops.mblm.attn_fwd(q, k, v, cos, sin, causal, scale)
        grad_out = torch.randn_like(out)
        utils = None if i < 1 else FAST_UTILS
        kwargs = {} if utils is None else {"test_utils": utils}
        torch.library.opcheck(
            torch.ops.mblm.attn_bwd.default,
            (grad_out, q, k, v, out, lse, cos, sin, causal, scale),
            **kwargs,
        )


def test_meta_shapes():
    q = torch.empty(3, 7, 2, 8, device="meta", dtype=torch.bfloat16)
    out, lse = torch.ops.mblm.attn_fwd(q, q, q, None, None, True, 0.5)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and out.device.type == "meta"
    assert lse.shape == (3, 2, 7) and lse.dtype == torch.float32
    grads = torch.ops.mblm.attn_bwd(out, q, q, q, out, lse, None, None, True, 0.5)
    assert all(g.shape == q.shape for g in grads)


@pytest.mark.parametrize("rotary", [True, False])
def test_compile_fullgraph_equals_eager(rotary):
    q, k, v = make_qkv(2, 9, 2, 8, seed=11, requires_grad=True)
    cos, sin = make_rotary(9, 8) if rotary else (None, None)

    def step(q, k, v):
        out = attention(q, k, v, causal=True, cos=cos, sin=sin)
        return (out * out).sum(), out

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c, out_c = compiled(q, k, v)
    grads_c = torch.autograd.grad(loss_c, (q, k, v))
    loss_e, out_e = step(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    for got, exp in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# bad inputs: RuntimeError naming the argument
# ---------------------------------------------------------------------------------------------


def _good():
    q, k, v = make_qkv(2, 9, 2, 8)
    cos, sin = make_rotary(9, 8)
    return q, k, v, cos, sin


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: {**a, "q": a["q"][0]}, "q must have 4 dims"),
        (lambda a: {**a, "k": a["k"].reshape(2, 9, 16)}, "k must have 4 dims"),
        (lambda a: {**a, "q": a["q"].int()}, "q must be float64/float32/float16/bfloat16"),
        (lambda a: {**a, "k": a["k"].double()}, "k has dtype"),
        (lambda a: {**a, "v": a["v"].half()}, "v has dtype"),
        (lambda a: {**a, "k": a["k"][:, :5]}, "k must have the shape of q"),
        (lambda a: {**a, "v": a["v"][:, :, :1]}, "v must have the shape of q"),
        (
            lambda a: {**a, "q": a["q"].transpose(2, 3).contiguous().transpose(2, 3)},
            "q must have a contiguous last",
        ),
        (
            lambda a: {**a, "v": a["v"].transpose(2, 3).contiguous().transpose(2, 3)},
            "v must have a contiguous last",
        ),
        (lambda a: {**a, "sin": None}, "cos and sin must be given together"),
        (lambda a: {**a, "cos": None}, "cos and sin must be given together"),
        (lambda a: {**a, "cos": a["cos"][:, :4]}, "cos must have shape \\(S, Dh\\)"),
        (lambda a: {**a, "sin": a["sin"][:8]}, "sin must have shape \\(S, Dh\\)"),
        (lambda a: {**a, "cos": a["cos"][0]}, "cos must have 2 dims"),
        (lambda a: {**a, "cos": a["cos"].double()}, "cos must be float32"),
        (lambda a: {**a, "sin": a["sin"].half()}, "sin must be float32"),
    ],
)
def test_bad_inputs_fwd(mutate, match):
    q, k, v, cos, sin = _good()
    a = mutate(dict(q=q, k=k, v=v, cos=cos, sin=sin))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mblm.attn_fwd(a["q"], a["k"], a["v"], a["cos"], a["sin"], True, 0.5)


def test_odd_head_dim_with_rotary_is_invalid():
    q, k, v = make_qkv(2, 9, 2, 7)
    cos, sin = torch.ones(9, 7), torch.zeros(9, 7)
    with pytest.raises(RuntimeError, match="even head dim"):
        torch.ops.mblm.attn_fwd(q, k, v, cos, sin, True, 0.5)
    out, _ = torch.ops.mblm.attn_fwd(q, k, v, None, None, True, 0.5)  # fine without rotary
    assert_close(
        out, attention_ref(q, k, v, None, None, True, 0.5)[0], VALUE_TOL[torch.float32], "out"
    )


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: {**a, "grad_out": a["grad_out"][:, :3]}, "grad_out must have the shape of q"),
        (lambda a: {**a, "grad_out": a["grad_out"].double()}, "grad_out has dtype"),
        (lambda a: {**a, "out": a["out"][..., :4]}, "out must have the shape of q"),
        (lambda a: {**a, "lse": a["lse"].double()}, "lse must be Float"),
        (lambda a: {**a, "lse": a["lse"][:, :1]}, "lse must have shape \\(N, H, S\\)"),
        (lambda a: {**a, "lse": a["lse"][0]}, "lse must have 3 dims"),
        (lambda a: {**a, "k": a["k"][:, :3]}, "k must have the shape of q"),
        (lambda a: {**a, "sin": None}, "cos and sin must be given together"),
    ],
)
def test_bad_inputs_bwd(mutate, match):
    q, k, v, cos, sin = _good()
    out, lse = torch.ops.mblm.attn_fwd(q, k, v, cos, sin, True, 0.5)
    a = mutate(
        dict(grad_out=torch.randn_like(out), q=q, k=k, v=v, out=out, lse=lse, cos=cos, sin=sin)
    )
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mblm.attn_bwd(
            a["grad_out"], a["q"], a["k"], a["v"], a["out"], a["lse"], a["cos"], a["sin"], True, 0.5
        )


@pytest.mark.cuda
def test_device_mix_is_rejected():
    q, k, v, cos, sin = _good()
    with pytest.raises(RuntimeError, match="k is on"):
        torch.ops.mblm.attn_fwd(q.cuda(), k, v.cuda(), None, None, True, 0.5)
    with pytest.raises(RuntimeError, match="cos is on"):
        torch.ops.mblm.attn_fwd(q.cuda(), k.cuda(), v.cuda(), cos, sin.cuda(), True, 0.5)


# ---------------------------------------------------------------------------------------------
# wrapper fallbacks
# ---------------------------------------------------------------------------------------------


def test_dropout_runs_reference_with_warning():
    q, k, v = make_qkv(2, 9, 2, 8, seed=12)
    _common.warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="dropout"):
        dropped = attention(q, k, v, causal=True, dropout_p=1.0, training=True)
    assert torch.equal(dropped, torch.zeros_like(dropped))  # every probability dropped
    torch.manual_seed(0)
    half = attention(q, k, v, causal=True, dropout_p=0.5, training=True)
    assert half.shape == q.shape and torch.isfinite(half).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dropout outside training: the kernel, no warning
        eval_out = attention(q, k, v, causal=True, dropout_p=0.5, training=False)
    torch.testing.assert_close(eval_out, attention(q, k, v, causal=True), rtol=0, atol=0)


def test_rotary_tables_requiring_grad_fall_back_to_reference():
    q, k, v = make_qkv(2, 9, 2, 8, seed=13, requires_grad=True)
    cos, sin = (t.requires_grad_() for t in make_rotary(9, 8))
    _common.warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="cos/sin"):
        out = attention(q, k, v, causal=True, cos=cos, sin=sin)
    out.sum().backward()
    assert cos.grad is not None and sin.grad is not None and q.grad is not None


def test_lse_is_not_differentiable():
    q, k, v = make_qkv(1, 5, 1, 4, requires_grad=True)
    out, lse = torch.ops.mblm.attn_fwd(q, k, v, None, None, False, 0.5)
    assert out.requires_grad and not lse.requires_grad
