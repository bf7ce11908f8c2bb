"""The GELU family (gelu_bwd): the fused backward of a recomputed GELU against the reference
(F.gelu and aten.gelu_backward), edge values, strided inputs, bad inputs, opcheck, fakes."""

from __future__ import annotations

import pytest
import torch
from tolerances import GRAD_TOL, VALUE_TOL

import mblm.ops  # noqa: F401
from mblm.ops import reference as R
from mblm.ops.gelu import gelu_bwd

FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _make(shape, dtype=torch.float32, device="cpu", seed=0, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    h = spread * torch.randn(*shape, generator=gen, dtype=torch.float64)
    g = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return g.to(device, dtype), h.to(device, dtype)


def _check(g, h):
    grad_h, act = gelu_bwd(g, h)
    ref_g, ref_a = R.gelu_bwd_ref(g.double(), h.double())
    assert grad_h.dtype == h.dtype and act.dtype == h.dtype and act.shape == h.shape
    torch.testing.assert_close(act.double(), ref_a, **VALUE_TOL[h.dtype])
    torch.testing.assert_close(grad_h.double(), ref_g, **GRAD_TOL[h.dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(9216, 3), (5,), (3, 7, 11), (1,), (40000,)])
def test_matches_reference(device, dtype, shape):
    _check(*_make(shape, dtype, device, seed=len(shape)))


def test_edge_values():
    h = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 8.0, -8.0, 20.0, -20.0, 1e4, -1e4, 0.5, -0.5] * 3)
    g = torch.ones_like(h)
    _check(g, h)


def test_strided_and_empty():
    g, h = _make((10, 16), torch.float64, seed=2)
    _check(g.t(), h.t())
    _check(g[:, ::3][:, :5], h[:, 2::3])
    grad_h, act = gelu_bwd(torch.empty(0, 3), torch.empty(0, 3))
    assert grad_h.shape == (0, 3) and act.shape == (0, 3)


def test_matches_autograd_of_gelu():
    h = torch.randn(64, 33, dtype=torch.float64, requires_grad=True)
    g = torch.randn(64, 33, dtype=torch.float64)
    (ref,) = torch.autograd.grad(torch.nn.functional.gelu(h), h, g)
    grad_h, act = gelu_bwd(g, h.detach())
    torch.testing.assert_close(grad_h, ref)
    torch.testing.assert_close(act, torch.nn.functional.gelu(h.detach()))


@pytest.mark.parametrize(
    "g, h, match",
    [
        (torch.zeros(3), torch.zeros(3, dtype=torch.long), "h must be float"),
        (torch.zeros(4), torch.zeros(3), "grad_act must have the shape of h"),
        (torch.zeros(3, dtype=torch.float64), torch.zeros(3), "grad_act has dtype"),
    ],
)
def test_bad_inputs(g, h, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mblm.gelu_bwd(g, h)


def test_meta_shapes():
    h = torch.empty(4, 5, device="meta", dtype=torch.bfloat16)
    grad_h, act = torch.ops.mblm.gelu_bwd(h, h)
    assert grad_h.shape == act.shape == (4, 5) and act.dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.float64):
        g, h = _make((6, 9), dtype, device, seed=4)
        torch.library.opcheck(torch.ops.mblm.gelu_bwd.default, (g, h))


def test_fallback_without_kernel_warns(monkeypatch):
    from mblm.ops import _common
    from mblm.ops import gelu as G

    monkeypatch.setattr(G, "_KERNEL_DEVICE_TYPES", frozenset())
    _common.warn_once.cache_clear()
    g, h = _make((3, 4), seed=5)
    with pytest.warns(RuntimeWarning, match="running the reference"):
        grad_h, act = gelu_bwd(g, h)
    ref_g, ref_a = R.gelu_bwd_ref(g, h)
    assert torch.equal(grad_h, ref_g) and torch.equal(act, ref_a)
