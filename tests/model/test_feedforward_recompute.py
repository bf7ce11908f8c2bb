"""The feed-forward's GELU-recomputing autograd against the plain module chain."""

import pytest
import torch

from mblm.model.transformer import FeedForward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shift", [False, True])
def test_feedforward_grads_match_plain_chain(dtype, shift):
    torch.manual_seed(0)
    ff = FeedForward(dim=16, mult=2).to(dtype)
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    out = ff(x, shift=shift)
    norm, up, act, drop, down = ff
    ref = down(drop(act(up(norm(x, shift=shift)))))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = torch.randn_like(out)
    params = [x, *ff.parameters()]
    got = torch.autograd.grad(out, params, grad)
    exp = torch.autograd.grad(ref, params, grad)
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a, b)


def test_feedforward_gradcheck_float64():
    torch.manual_seed(1)
    ff = FeedForward(dim=6, mult=2).double()
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: ff(t, shift=True), (x,))


def test_feedforward_frozen_weights_and_dropout_path():
    torch.manual_seed(2)
    ff = FeedForward(dim=8, mult=2)
    for p in ff.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 8, requires_grad=True)
    (gx,) = torch.autograd.grad(ff(x).sum(), x)
    norm, up, act, drop, down = ff
    (rx,) = torch.autograd.grad(down(act(up(norm(x)))).sum(), x)
    torch.testing.assert_close(gx, rx)
    ff_drop = FeedForward(dim=8, mult=2, dropout=0.5).train()
    ff_drop(x).sum().backward()  # the dropout path keeps the plain chain
