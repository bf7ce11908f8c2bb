"""The norm op family (rms_norm_fwd / rms_norm_bwd, optional fused token shift): kernels against
the reference (values and gradients through autograd), gradcheck including the clamped-RMS
branch, edge and strided shapes, determinism, bad inputs, opcheck, fakes and torch.compile."""

from __future__ import annotations

import pytest
import torch
from tolerances import GRAD_TOL, VALUE_TOL

import mblm.ops  # noqa: F401  (loads the extension and every family)
from mblm.ops import reference as R
from mblm.ops.norm import rms_norm

FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
EPS = 1e-8


def _make(shape, dtype=torch.float32, device="cpu", seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    g = torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    x, g = x.to(dtype=dtype, device=device), g.to(dtype=dtype, device=device)
    return x.requires_grad_(requires_grad), g.requires_grad_(requires_grad)


def _ref_grads(x, g, grad_y, scale, eps, shift):
    """Gradients of the float64 reference (autograd through rms_norm_ref)."""
    xr = x.detach().double().requires_grad_(True)
    gr = g.detach().double().requires_grad_(True)
    y, _ = R.rms_norm_ref(xr, gr, scale, eps, shift)
    return torch.autograd.grad(y, (xr, gr), grad_y.double())


def _check_against_reference(x, g, shift, eps=EPS, grad_tol_scale=1.0):
    dtype, d = x.dtype, x.shape[-1]
    scale = d**-0.5 if d else 1.0
    y, rms = torch.ops.mblm.rms_norm_fwd(x, g, scale, eps, shift)
    y_ref, rms_ref = R.rms_norm_ref(x, g, scale, eps, shift)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert rms.shape == x.shape[:-1] and rms.dtype == rms_ref.dtype
    torch.testing.assert_close(y, y_ref, **VALUE_TOL[dtype])
    torch.testing.assert_close(rms, rms_ref, **VALUE_TOL[rms.dtype])
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grad_y = grad_y.to(dtype=dtype, device=x.device)
    gx, gg = torch.ops.mblm.rms_norm_bwd(grad_y, x, g, rms, scale, eps, shift)
    rx, rg = _ref_grads(x, g, grad_y, scale, eps, shift)
    tol = {k: v * grad_tol_scale for k, v in GRAD_TOL[dtype].items()}
    torch.testing.assert_close(gx.double(), rx, **tol)
    # grad_g sums over every row: compare relative to its size
    gtol = dict(rtol=tol["rtol"], atol=tol["atol"] * max(1.0, x.numel() / max(d, 1)) ** 0.5)
    torch.testing.assert_close(gg.double(), rg, **gtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize(
    "shape", [(1, 9, 128), (3, 17, 256), (2, 65, 64), (4, 5, 7), (2, 3, 1), (1, 1, 8), (33, 2)]
)
def test_matches_reference(device, dtype, shift, shape):
    x, g = _make(shape, dtype, device, seed=len(shape) + shape[-1])
    scale = 4.0 if dtype in (torch.float16, torch.bfloat16) else 1.0
    _check_against_reference(x, g, shift, grad_tol_scale=scale)


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_and_no_shift_vector(device):
    for shape in [(2, 3, 4, 6), (5,), (2, 2, 2, 2, 3)]:
        x, g = _make(shape, torch.float64, device, seed=3)
        _check_against_reference(x, g, False)
        if len(shape) >= 2:
            _check_against_reference(x, g, True)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    for shape in [(0, 9, 16), (2, 0, 16), (3, 4, 0)]:
        x, g = _make(shape, torch.float32, device)
        y, rms = torch.ops.mblm.rms_norm_fwd(x, g, 0.5, EPS, True)
        assert y.shape == x.shape and rms.shape == x.shape[:-1]
        assert torch.all(rms == 0)
        gx, gg = torch.ops.mblm.rms_norm_bwd(torch.ones_like(x), x, g, rms, 0.5, EPS, True)
        assert gx.shape == x.shape and gg.shape == g.shape and torch.all(gg == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shift", [False, True])
def test_strided_inputs(device, shift):
    base, g = _make((4, 10, 24), torch.float64, device, seed=5)
    grad_base = torch.randn(4, 10, 24, dtype=torch.float64, device=device)
    for x, grad_y in [
        (base[:, ::2], grad_base[:, ::2]),
        (base.transpose(0, 1), grad_base.transpose(0, 1)),
        (base[..., :12], grad_base[..., 12:]),
    ]:
        y, rms = torch.ops.mblm.rms_norm_fwd(x, g[: x.shape[-1]], 0.3, EPS, shift)
        y_ref, _ = R.rms_norm_ref(x, g[: x.shape[-1]], 0.3, EPS, shift)
        torch.testing.assert_close(y, y_ref, **VALUE_TOL[torch.float64])
        gx, gg = torch.ops.mblm.rms_norm_bwd(grad_y, x, g[: x.shape[-1]], rms, 0.3, EPS, shift)
        rx, rg = _ref_grads(x, g[: x.shape[-1]], grad_y, 0.3, EPS, shift)
        torch.testing.assert_close(gx, rx, **GRAD_TOL[torch.float64])
        torch.testing.assert_close(gg, rg, **GRAD_TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("dim", [2, 5, 8])
def test_gradcheck_with_clamped_rows(device, shift, dim):
    x, g = _make((2, 4, dim), torch.float64, device, seed=dim)
    eps = 1e-2  # large, so finite differences stay on one side of the clamp
    with torch.no_grad():
        x[0, 1] = 0.0  # RMS below eps (and, shifted, half of the neighbours' rows)
        x[1, 2] *= 1e-3
    x.requires_grad_(True)
    g.requires_grad_(True)
    torch.autograd.gradcheck(
        lambda a, b: rms_norm(a, b, scale=dim**-0.5, eps=eps, shift=shift), (x, g), atol=1e-6
    )


def test_clamped_branch_matches_reference():
    x, g = _make((3, 6, 16), torch.float32, seed=9)
    x[1] *= 1e-12  # whole sequence below eps
    x[2, 3] = 0.0
    for shift in (False, True):
        _check_against_reference(x, g, shift, eps=1e-4)


def test_large_values_do_not_overflow_in_fp16():
    x, g = _make((2, 5, 64), torch.float16, seed=2)
    x = x * 1000  # sum of squares overflows fp16, not the fp32 accumulator
    y = rms_norm(x, g, shift=True)
    assert torch.isfinite(y).all()
    _check_against_reference(x, g, True, grad_tol_scale=4.0)


def test_deterministic_and_thread_independent():
    x, g = _make((8, 300, 96), torch.float32, seed=4)
    grad_y = torch.randn_like(x)
    y, rms = torch.ops.mblm.rms_norm_fwd(x, g, 0.1, EPS, True)
    first = torch.ops.mblm.rms_norm_bwd(grad_y, x, g, rms, 0.1, EPS, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, rms1 = torch.ops.mblm.rms_norm_fwd(x, g, 0.1, EPS, True)
        single = torch.ops.mblm.rms_norm_bwd(grad_y, x, g, rms1, 0.1, EPS, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y, y1) and torch.equal(rms, rms1)
    for a, b in zip(first, single, strict=True):
        assert torch.equal(a, b)


def test_fuzz_random_shapes():
    gen = torch.Generator().manual_seed(123)
    for i in range(40):
        ndim = int(torch.randint(2, 4, (1,), generator=gen))
        shape = [int(torch.randint(1, 12, (1,), generator=gen)) for _ in range(ndim - 1)]
        shape.append(int(torch.randint(1, 70, (1,), generator=gen)))
        dtype = FLOATS[i % len(FLOATS)]
        shift = bool(i % 3)
        x, g = _make(shape, dtype, seed=i)
        if i % 4 == 0:  # a non-contiguous view
            x = torch.cat((x, x), dim=-1)[..., : shape[-1]]
        _check_against_reference(x, g, shift, grad_tol_scale=4.0)


def test_autograd_matches_reference():
    for dtype in (torch.float32, torch.float64):
        x, g = _make((3, 9, 32), dtype, seed=1, requires_grad=True)
        y = rms_norm(x, g, shift=True)
        grad_y = torch.randn_like(y)
        gx, gg = torch.autograd.grad(y, (x, g), grad_y)
        rx, rg = _ref_grads(x, g, grad_y, 32**-0.5, EPS, True)
        torch.testing.assert_close(gx.double(), rx, **GRAD_TOL[dtype])
        torch.testing.assert_close(gg.double(), rg, **GRAD_TOL[dtype])
        # only one input requiring grad
        gx_only = torch.autograd.grad(rms_norm(x, g.detach(), shift=True), x, grad_y)[0]
        torch.testing.assert_close(gx_only, gx, rtol=0, atol=0)


def test_model_rmsnorm_uses_kernel_and_keeps_mixed_dtype_path():
    from mblm.model.transformer import RMSNorm

    norm = RMSNorm(16)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(norm(x, shift=True), R.rms_norm_ref(x, norm.g, 0.25, 1e-8, True)[0])
    # bf16 x with the fp32 weight: the original's promotion to fp32
    xb = x.bfloat16()
    assert norm(xb, shift=True).dtype == torch.float32


@pytest.mark.parametrize(
    "x, g, scale, eps, shift, match",
    [
        (torch.zeros(4), torch.ones(4), 1.0, EPS, True, "x must have at least 2 dims"),
        (torch.zeros(2, 4, dtype=torch.long), torch.ones(4), 1.0, EPS, False, "x must be float"),
        (torch.zeros(2, 4), torch.ones(3), 1.0, EPS, False, r"g must have shape \(D,\)"),
        (torch.zeros(2, 4), torch.ones(1, 4), 1.0, EPS, False, r"g must have shape \(D,\)"),
        (torch.zeros(2, 4), torch.ones(4, dtype=torch.float64), 1.0, EPS, False, "g has dtype"),
        (torch.zeros(2, 4), torch.ones(4), 0.0, EPS, False, "scale must be finite and > 0"),
        (torch.zeros(2, 4), torch.ones(4), float("nan"), EPS, False, "scale must be finite"),
        (torch.zeros(2, 4), torch.ones(4), 1.0, -1.0, False, "eps must be finite and >= 0"),
    ],
)
def test_bad_fwd_inputs(x, g, scale, eps, shift, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mblm.rms_norm_fwd(x, g, scale, eps, shift)


def test_bad_bwd_inputs():
    x, g = _make((2, 3, 4))
    y, rms = torch.ops.mblm.rms_norm_fwd(x, g, 0.5, EPS, True)
    cases = [
        ((torch.zeros(2, 3, 5), x, g, rms), "grad_y must have the shape of x"),
        ((torch.zeros(2, 3, 4, dtype=torch.float64), x, g, rms), "grad_y has dtype"),
        ((y, x, g, rms[:, :2]), r"rms must have shape x.shape\[:-1\]"),
        ((y, x, g, rms.double()), "rms must be Float"),
        ((y, x, g[:3], rms), r"g must have shape \(D,\)"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.mblm.rms_norm_bwd(*args, 0.5, EPS, True)


def test_meta_and_fake_shapes():
    x = torch.empty(3, 7, 16, device="meta", dtype=torch.bfloat16)
    g = torch.empty(16, device="meta", dtype=torch.bfloat16)
    y, rms = torch.ops.mblm.rms_norm_fwd(x, g, 0.25, EPS, True)
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and rms.shape == (3, 7)
    assert rms.dtype == torch.float32
    gx, gg = torch.ops.mblm.rms_norm_bwd(y, x, g, rms, 0.25, EPS, True)
    assert gx.shape == x.shape and gg.shape == g.shape


FAST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    samples = [
        ((2, 9, 16), torch.float32, True),
        ((3, 8), torch.float64, False),
        ((1, 5, 7), torch.float32, True),
    ]
    for i, (shape, dtype, shift) in enumerate(samples):
        x, g = _make(shape, dtype, device, seed=i, requires_grad=True)
        kwargs = {} if i == 0 else {"test_utils": FAST_UTILS}
        torch.library.opcheck(
            torch.ops.mblm.rms_norm_fwd.default, (x, g, 0.3, EPS, shift), **kwargs
        )
        y, rms = torch.ops.mblm.rms_norm_fwd(x.detach(), g.detach(), 0.3, EPS, shift)
        torch.library.opcheck(
            torch.ops.mblm.rms_norm_bwd.default,
            (torch.randn_like(y), x.detach(), g.detach(), rms, 0.3, EPS, shift),
            **kwargs,
        )


def test_compile_fullgraph_equals_eager():
    def fn(x, g):
        return rms_norm(x, g, shift=True) * 2

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x, g = _make((2, 9, 16), seed=11, requires_grad=True)
    out = compiled(x, g)
    torch.testing.assert_close(out, fn(x, g), rtol=0, atol=0)
    got = torch.autograd.grad(out.sum(), (x, g))
    exp = torch.autograd.grad(fn(x, g).sum(), (x, g))
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fallback_without_kernel_runs_reference_and_warns(monkeypatch):
    from mblm.ops import _common
    from mblm.ops import norm as N

    monkeypatch.setattr(N, "_KERNEL_DEVICE_TYPES", frozenset())
    _common.warn_once.cache_clear()
    x, g = _make((2, 3, 4), seed=2)
    with pytest.warns(RuntimeWarning, match="running the reference"):
        y = rms_norm(x, g, shift=True)
    torch.testing.assert_close(y, R.rms_norm_ref(x, g, 0.5, EPS, True)[0], rtol=0, atol=0)
