"""Decode family: ``torch.ops.mblm.attn_decode`` and ``mblm.ops.decode.attn_decode``.

Compared with ``attn_decode_ref`` (the output and the written caches), and with the full
``attention_ref`` (causal attention over prefix + new positions), plus opcheck, fake tensors,
randomized shapes, strided inputs, row subsets, bad inputs (shapes, dtypes, devices, lens/rows
values) and torch.compile.
"""

from __future__ import annotations

import pytest
import torch
from conftest import devices
from tolerances import VALUE_TOL

import mblm.ops  # noqa: F401  (registers torch.ops.mblm)
from mblm.ops.decode import attn_decode
from mblm.ops.reference import attention_ref, attn_decode_ref

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_case(r, s, h, d, b, c, lens, rows=None, dtype=torch.float32, device="cpu", seed=0,
              rotary=True):  # fmt: skip
    """q, k, v (R, S, H, Dh) as views of projections, caches (B, C, H, Dh) with random contents,
    lens/rows tensors and rotary tables of the new positions."""
    g = _gen(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    q = rand(r, s, h * d).view(r, s, h, d)
    k, v = (t.view(r, s, h, d) for t in rand(r, s, 2 * h * d).chunk(2, dim=-1))
    k_cache, v_cache = rand(b, c, h, d), rand(b, c, h, d)
    lens_t = torch.tensor(lens, dtype=torch.long, device=device)
    rows_t = None if rows is None else torch.tensor(rows, dtype=torch.long, device=device)
    cos = sin = None
    if rotary:
        table = torch.float64 if dtype == torch.float64 else torch.float32
        inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        pos = lens_t.cpu()[:, None] + torch.arange(s)
        freqs = pos.to(torch.float64)[..., None] * inv
        freqs = torch.cat((freqs, freqs), dim=-1)
        cos, sin = freqs.cos().to(device, table), freqs.sin().to(device, table)
    return q, k, v, k_cache, v_cache, lens_t, rows_t, cos, sin


def run_both(case, scale):
    q, k, v, kc, vc, lens, rows, cos, sin = case
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = torch.ops.mblm.attn_decode(q, k, v, kc, vc, lens, rows, cos, sin, scale)
    ref = attn_decode_ref(q, k, v, kc_ref, vc_ref, lens, rows, cos, sin, scale)
    return out, ref, (kc, vc), (kc_ref, vc_ref)


def assert_close(got, expected, dtype, what):
    torch.testing.assert_close(got, expected, **VALUE_TOL[dtype], msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("seq", [1, 3, 40])
def test_values_vs_reference(device, dtype, rotary, seq):
    lens = [0, 5, 70]
    case = make_case(3, seq, 2, 16, 4, 120, lens, [2, 0, 3], dtype, device, seed=seq,
                     rotary=rotary)  # fmt: skip
    out, ref, caches, ref_caches = run_both(case, 0.3)
    assert out.dtype == dtype and out.is_contiguous() and out.shape == case[0].shape
    assert_close(out, ref, dtype, "out")
    for name, got, exp in zip(("k_cache", "v_cache"), caches, ref_caches, strict=True):
        assert_close(got, exp, dtype, name)
    untouched = case[3][1]  # cache row 1 is not among rows
    assert torch.equal(caches[0][1], untouched)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_full_causal_attention(dtype):
    """Feeding a sequence in pieces through the cache = causal attention over the whole."""
    n, total, h, d = 2, 37, 3, 8
    g = _gen(5)
    q, k, v = (torch.randn(n, total, h, d, generator=g, dtype=dtype) for _ in range(3))
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    freqs = torch.outer(torch.arange(total, dtype=torch.float64), inv)
    freqs = torch.cat((freqs, freqs), dim=-1)
    table = torch.float64 if dtype == torch.float64 else torch.float32
    cos_all, sin_all = freqs.cos().to(table), freqs.sin().to(table)
    expected, _ = attention_ref(q, k, v, cos_all, sin_all, True, 0.4)
    kc, vc = torch.zeros(n, total, h, d, dtype=dtype), torch.zeros(n, total, h, d, dtype=dtype)
    outs, start = [], 0
    for piece in (1, 5, 1, 13, 17):
        sl = slice(start, start + piece)
        cos = cos_all[sl].expand(n, piece, d)
        sin = sin_all[sl].expand(n, piece, d)
        lens = torch.full((n,), start, dtype=torch.long)
        outs.append(attn_decode(q[:, sl], k[:, sl], v[:, sl], kc, vc, lens, cos=cos, sin=sin,
                                scale=0.4))  # fmt: skip
        start += piece
    assert_close(torch.cat(outs, dim=1), expected, dtype, "pieces vs full")


def test_without_rows_uses_row_r_and_default_scale():
    case = make_case(2, 2, 2, 8, 2, 10, [3, 0], None, seed=3)
    q, k, v, kc, vc, lens, _, cos, sin = case
    kc2, vc2 = kc.clone(), vc.clone()
    out = attn_decode(q, k, v, kc, vc, lens, cos=cos, sin=sin)
    ref = attn_decode_ref(q, k, v, kc2, vc2, lens, None, cos, sin, 8**-0.5)
    assert_close(out, ref, torch.float32, "out")


@pytest.mark.parametrize("seed", range(8))
def test_randomized_shapes(seed):
    g = _gen(100 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    b = pick([1, 2, 5])
    r = pick([0, 1, b]) if b > 1 else pick([0, 1])
    s, h = pick([1, 2, 7, 33, 65]), pick([1, 3])
    rotary = pick([True, False])
    d = pick([2, 8, 16, 64]) if rotary else pick([1, 3, 8, 20, 64])
    c = s + pick([0, 1, 64, 200])
    lens = [int(torch.randint(c - s + 1, (1,), generator=g)) for _ in range(r)]
    rows = torch.randperm(b, generator=g)[:r].tolist() if pick([True, False]) or r != b else None
    dtype = pick([torch.float32, torch.float64, torch.bfloat16])
    case = make_case(r, s, h, d, b, c, lens, rows, dtype, seed=seed, rotary=rotary)
    out, ref, caches, ref_caches = run_both(case, float(torch.rand((), generator=g)) + 0.05)
    what = f"R={r} S={s} H={h} Dh={d} B={b} C={c} lens={lens} rows={rows} {dtype}"
    assert_close(out, ref, dtype, what)
    assert_close(caches[0], ref_caches[0], dtype, "k_cache " + what)
    assert_close(caches[1], ref_caches[1], dtype, "v_cache " + what)


def test_strided_caches_and_inputs():
    """Caches that are views (e.g. a slice of a bigger buffer) and heads-first q."""
    q, k, v, kc, vc, lens, rows, cos, sin = make_case(2, 3, 2, 8, 3, 20, [4, 9], [2, 1], seed=9)
    big_k, big_v = torch.randn(3, 30, 2, 8), torch.randn(3, 30, 2, 8)
    big_k[:, 5:25], big_v[:, 5:25] = kc, vc
    kc_view, vc_view = big_k[:, 5:25], big_v[:, 5:25]
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    out = attn_decode(q_t, k, v, kc_view, vc_view, lens, rows=rows, cos=cos, sin=sin, scale=0.5)
    ref = attn_decode_ref(q, k, v, kc, vc, lens, rows, cos, sin, 0.5)
    assert_close(out, ref, torch.float32, "out")
    assert_close(kc_view, kc, torch.float32, "k_cache view")
    assert_close(vc_view, vc, torch.float32, "v_cache view")


def test_nan_stays_in_its_row():
    q, k, v, kc, vc, lens, rows, cos, sin = make_case(2, 1, 1, 8, 2, 10, [3, 3], None, seed=2)
    kc[0, 1, 0, 0] = float("nan")
    out = attn_decode(q, k, v, kc, vc, lens, cos=cos, sin=sin)
    assert out[0].isnan().all() and not out[1].isnan().any()


# ---------------------------------------------------------------------------------------------
# registration: opcheck, fake tensors, compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    samples = [
        make_case(2, 1, 2, 8, 3, 12, [0, 7], [1, 2], device=device, seed=1),
        make_case(1, 4, 1, 16, 1, 9, [5], None, torch.float64, device, seed=2, rotary=False),
    ]
    for i, args in enumerate(samples):
        kwargs = {} if i == 0 else {"test_utils": ("test_schema", "test_faketensor")}
        torch.library.opcheck(torch.ops.mblm.attn_decode.default, (*args, 0.5), **kwargs)


def test_meta_shapes():
    q = torch.empty(3, 2, 4, 8, device="meta", dtype=torch.bfloat16)
    cache = torch.empty(5, 10, 4, 8, device="meta", dtype=torch.bfloat16)
    lens = torch.empty(3, dtype=torch.long, device="meta")
    out = torch.ops.mblm.attn_decode(q, q, q, cache, cache, lens, lens, None, None, 0.5)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device.type == "meta"


def test_compile_fullgraph_equals_eager():
    case = make_case(2, 1, 2, 8, 2, 10, [3, 4], None, seed=4)

    def fn(q, k, v, kc, vc, lens, cos, sin):
        return attn_decode(q, k, v, kc, vc, lens, cos=cos, sin=sin) * 2

    q, k, v, kc, vc, lens, _, cos, sin = case
    kc_e, vc_e = kc.clone(), vc.clone()
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, kc, vc, lens, cos, sin)
    expected = fn(q, k, v, kc_e, vc_e, lens, cos, sin)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(kc, kc_e, rtol=0, atol=0)  # the mutation happened under compile


def test_requires_grad_is_refused_by_the_wrapper():
    q, k, v, kc, vc, lens, _, cos, sin = make_case(1, 1, 1, 8, 1, 4, [0], None)
    with pytest.raises(RuntimeError, match="inference op"):
        attn_decode(q.requires_grad_(), k, v, kc, vc, lens, cos=cos, sin=sin)
    with torch.no_grad():
        attn_decode(q, k, v, kc, vc, lens, cos=cos, sin=sin)


# ---------------------------------------------------------------------------------------------
# bad inputs: RuntimeError naming the argument
# ---------------------------------------------------------------------------------------------


def _good():
    q, k, v, kc, vc, lens, rows, cos, sin = make_case(2, 2, 2, 8, 3, 10, [1, 4], [0, 2])
    return dict(q=q, k=k, v=v, k_cache=kc, v_cache=vc, lens=lens, rows=rows, cos=cos, sin=sin)


def _call(a):
    return torch.ops.mblm.attn_decode(
        a["q"], a["k"], a["v"], a["k_cache"], a["v_cache"], a["lens"], a["rows"], a["cos"],
        a["sin"], 0.5,
    )  # fmt: skip


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: {**a, "q": a["q"][0]}, "q must have 4 dims"),
        (lambda a: {**a, "q": a["q"].int()}, "q must be float64/float32/float16/bfloat16"),
        (lambda a: {**a, "k": a["k"][:, :1]}, "k must have the shape of q"),
        (lambda a: {**a, "v": a["v"].double()}, "v has dtype"),
        (
            lambda a: {**a, "k": a["k"].transpose(2, 3).contiguous().transpose(2, 3)},
            "k must have a contiguous last",
        ),
        (
            lambda a: {**a, "k_cache": a["k_cache"][..., :4]},
            "k_cache must have shape \\(B, C, H, Dh\\)",
        ),
        (lambda a: {**a, "v_cache": a["v_cache"][:2]}, "v_cache must have the shape of k_cache"),
        (lambda a: {**a, "k_cache": a["k_cache"][0]}, "k_cache must have 4 dims"),
        (lambda a: {**a, "v_cache": a["v_cache"].half()}, "v_cache has dtype"),
        (lambda a: {**a, "lens": a["lens"].int()}, "lens must be int64"),
        (lambda a: {**a, "lens": a["lens"][:1]}, "lens must have shape \\(R,\\)"),
        (lambda a: {**a, "rows": a["rows"][None]}, "rows must have shape \\(R,\\)"),
        (lambda a: {**a, "rows": None}, "without rows needs one cache row per query row"),
        (lambda a: {**a, "sin": None}, "cos and sin must be given together"),
        (lambda a: {**a, "cos": a["cos"][:, :1]}, "cos must have shape \\(R, S, Dh\\)"),
        (lambda a: {**a, "sin": a["sin"].half()}, "sin must be float32"),
        (lambda a: {**a, "lens": torch.tensor([1, 9])}, "lens\\[1\\] = 9 leaves no room"),
        (lambda a: {**a, "lens": torch.tensor([-1, 0])}, "lens\\[0\\] = -1"),
        (lambda a: {**a, "rows": torch.tensor([0, 3])}, "rows\\[1\\] = 3 is not a row"),
        (lambda a: {**a, "rows": torch.tensor([2, 2])}, "rows must be distinct"),
    ],
)
def test_bad_inputs(mutate, match):
    with pytest.raises(RuntimeError, match=match):
        _call(mutate(_good()))


def test_odd_head_dim_with_rotary_is_invalid():
    a = _good()
    for key in ("q", "k", "v"):
        a[key] = a[key][..., :7]
    a["k_cache"], a["v_cache"] = a["k_cache"][..., :7], a["v_cache"][..., :7]
    a["cos"], a["sin"] = a["cos"][..., :7], a["sin"][..., :7]
    with pytest.raises(RuntimeError, match="even head dim"):
        _call(a)


@pytest.mark.cuda
def test_device_mix_is_rejected():
    a = _good()
    a = {k: (t.cuda() if t is not None and k != "lens" else t) for k, t in a.items()}
    with pytest.raises(RuntimeError, match="lens is on"):
        _call(a)


@pytest.mark.cuda
def test_cuda_bad_lens_give_nan_not_a_crash():
    """Values are not checked on the GPU (that would synchronise): a bad row gets NaN."""
    case = list(make_case(2, 1, 1, 8, 2, 4, [1, 2], None, device="cuda"))
    case[5] = torch.tensor([1, 4], device="cuda")  # row 1: no room
    out = torch.ops.mblm.attn_decode(*case, 0.5)
    assert not out[0].isnan().any() and out[1].isnan().all()


@pytest.mark.cuda
def test_cuda_head_dim_above_256_falls_back_to_reference():
    case = make_case(1, 1, 1, 264, 1, 4, [2], None, device="cuda")
    with pytest.warns(RuntimeWarning, match="running the PyTorch reference"):
        attn_decode(*case[:6], cos=case[7], sin=case[8])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("d", [8, 20, 32, 64, 128, 256])
def test_cuda_matches_cpu_long_cache(dtype, d):
    """Long caches (many key tiles per warp), several queries, row subsets, on the GPU."""
    case = make_case(3, 5, 4, d, 6, 3000, [0, 999, 2990], [5, 0, 3], dtype, "cuda", seed=d)
    out, ref, caches, ref_caches = run_both(case, d**-0.5)
    assert_close(out, ref, dtype, "out")
    assert_close(caches[0], ref_caches[0], dtype, "k_cache")
