"""RMSNorm (the rms_norm kernel, and the memory-saving Python autograd kept for mixed dtypes)
against the composite formula it replaces, including the clamped-RMS branch."""

import pytest
import torch

from mblm.model.transformer import RMSNorm, _RMSNormFunction, token_shift


def composite(x, g, scale, eps, shift):
    u = token_shift(x) if shift else x
    norm = torch.norm(u, dim=-1, keepdim=True) * scale
    return u / norm.clamp(min=eps) * g


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("dim", [2, 5, 8])
def test_gradcheck_with_clamped_rows(shift, dim):
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(2, 4, dim, generator=gen, dtype=torch.float64)
    # a large eps so that finite differences stay on one side of the clamp
    eps = 1e-2
    x[0, 1] = 0.0  # RMS below eps: the clamped branch
    x[1, 2] *= 1e-3
    g = torch.randn(dim, generator=gen, dtype=torch.float64)
    x.requires_grad_(True)
    g.requires_grad_(True)
    torch.autograd.gradcheck(
        lambda a, b: _RMSNormFunction.apply(a, b, dim**-0.5, eps, shift), (x, g), atol=1e-6
    )


@pytest.mark.parametrize("shift", [False, True])
def test_matches_composite_fp32(shift):
    torch.manual_seed(0)
    norm = RMSNorm(7)
    with torch.no_grad():
        norm.g.normal_()
    x = torch.randn(3, 9, 7, requires_grad=True)
    grad = torch.randn(3, 9, 7)
    y = norm(x, shift=shift)
    ref = composite(x, norm.g, norm.scale, norm.eps, shift)
    # the rms_norm kernel reduces in another order than torch.norm: equal up to fp32 rounding
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    gx, gg = torch.autograd.grad(y, (x, norm.g), grad)
    rx, rg = torch.autograd.grad(ref, (x, norm.g), grad)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gg, rg, rtol=1e-5, atol=1e-5)
