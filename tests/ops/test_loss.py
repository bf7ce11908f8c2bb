"""The loss op family (cross_entropy_fwd / cross_entropy_bwd): values and gradients against
F.cross_entropy and the reference, ignored rows, strided logits, gradcheck, bad inputs, opcheck,
fakes and compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from tolerances import GRAD_TOL, VALUE_TOL

import mblm.ops  # noqa: F401
from mblm.ops import reference as R
from mblm.ops.loss import cross_entropy

FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _make(rows, vocab, dtype=torch.float32, device="cpu", seed=0, ignore=None):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)).to(device, dtype)
    target = torch.randint(0, vocab, (rows,), generator=gen)
    if ignore is not None and rows:
        target[::3] = ignore
    return logits, target.to(device)


def _torch_grads(logits, target, ignore_index, grad):
    lg = logits.detach().double().requires_grad_()
    loss = F.cross_entropy(lg, target, ignore_index=ignore_index, reduction="none")
    return loss, torch.autograd.grad(loss, lg, grad.double())[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("rows, vocab", [(64, 257), (5, 1), (33, 8), (7, 1000), (1, 3)])
@pytest.mark.parametrize("ignore", [None, 0, -100])
def test_matches_torch(device, dtype, rows, vocab, ignore):
    ignore_index = -100 if ignore is None else ignore
    logits, target = _make(rows, vocab, dtype, device, seed=rows + vocab, ignore=ignore)
    loss, lse = torch.ops.mblm.cross_entropy_fwd(logits, target, ignore_index)
    ref_loss, ref_grad = _torch_grads(logits, target, ignore_index, torch.ones(rows))
    assert loss.dtype == dtype and loss.shape == (rows,)
    torch.testing.assert_close(loss.double(), ref_loss, **VALUE_TOL[dtype])
    _, ref_lse = R.cross_entropy_ref(logits, target, ignore_index)
    torch.testing.assert_close(lse, ref_lse, **VALUE_TOL[lse.dtype])
    grad_loss = torch.randn(rows, dtype=torch.float64).to(device, dtype)
    grad = torch.ops.mblm.cross_entropy_bwd(grad_loss, logits, target, lse, ignore_index)
    _, ref_grad = _torch_grads(logits, target, ignore_index, grad_loss)
    assert grad.shape == logits.shape and grad.is_contiguous()
    torch.testing.assert_close(grad.double(), ref_grad, **GRAD_TOL[dtype])


def test_strided_logits_and_empty():
    base, target = _make(12, 40, torch.float64, seed=1)
    logits = base.t().contiguous().t()  # column-major
    sliced = base[:, 5:30]
    for lg in (logits, sliced, base[::2]):
        tg = target[: lg.shape[0]].clamp(max=lg.shape[1] - 1)
        loss = cross_entropy(lg.requires_grad_(False), tg)
        ref, _ = _torch_grads(lg, tg, -100, torch.ones(lg.shape[0]))
        torch.testing.assert_close(loss, ref)
    empty = torch.randn(0, 5)
    loss, lse = torch.ops.mblm.cross_entropy_fwd(empty, torch.zeros(0, dtype=torch.long), -100)
    assert loss.shape == (0,) and lse.shape == (0,)
    grad = torch.ops.mblm.cross_entropy_bwd(
        loss, empty, torch.zeros(0, dtype=torch.long), lse, -100
    )
    assert grad.shape == (0, 5)


def test_gradcheck_float64():
    logits, target = _make(6, 9, torch.float64, seed=2, ignore=4)
    logits.requires_grad_(True)
    torch.autograd.gradcheck(lambda lg: cross_entropy(lg, target, 4), (logits,))


def test_autograd_and_all_ignored():
    logits, target = _make(10, 17, seed=3, ignore=16)
    logits.requires_grad_(True)
    loss = cross_entropy(logits, target, 16)
    grad = torch.randn(10)
    (got,) = torch.autograd.grad(loss, logits, grad)
    _, ref = _torch_grads(logits, target, 16, grad)
    torch.testing.assert_close(got.double(), ref, **GRAD_TOL[torch.float32])
    all_ignored = torch.full((10,), 16)
    loss = cross_entropy(logits, all_ignored, 16)
    assert torch.equal(loss, torch.zeros(10))
    (g,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.equal(g, torch.zeros_like(g))


def test_large_logits_are_stable():
    logits = torch.tensor([[1000.0, 999.0, -1000.0], [-1e4, -1e4, -1e4]])
    loss = cross_entropy(logits, torch.tensor([1, 2]))
    ref = F.cross_entropy(logits, torch.tensor([1, 2]), reduction="none")
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize(
    "logits, target, match",
    [
        (torch.randn(4), torch.zeros(4, dtype=torch.long), "logits must have 2 dims"),
        (torch.randn(4, 3).long(), torch.zeros(4, dtype=torch.long), "logits must be float"),
        (torch.randn(4, 3), torch.zeros(3, dtype=torch.long), r"target must have shape \(R,\)"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.int32), "target must be int64"),
        (torch.randn(4, 3), torch.tensor([0, 1, 3, 0]), r"target must lie in \[0, 3\)"),
        (torch.randn(4, 3), torch.tensor([0, -1, 2, 0]), r"target must lie in \[0, 3\)"),
        (torch.randn(4, 0), torch.zeros(4, dtype=torch.long), "at least one class"),
    ],
)
def test_bad_inputs(logits, target, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mblm.cross_entropy_fwd(logits, target, -100)


def test_bad_bwd_inputs():
    logits, target = _make(4, 5)
    loss, lse = torch.ops.mblm.cross_entropy_fwd(logits, target, -100)
    cases = [
        ((loss[:3], logits, target, lse), r"grad_loss must have shape \(R,\)"),
        ((loss.double(), logits, target, lse), "grad_loss has dtype"),
        ((loss, logits, target, lse[:2]), r"lse must have shape \(R,\)"),
        ((loss, logits, target, lse.double()), "lse must be Float"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.mblm.cross_entropy_bwd(*args, -100)


def test_meta_shapes():
    logits = torch.empty(6, 11, device="meta", dtype=torch.bfloat16)
    target = torch.empty(6, device="meta", dtype=torch.long)
    loss, lse = torch.ops.mblm.cross_entropy_fwd(logits, target, -100)
    assert loss.shape == (6,) and loss.dtype == torch.bfloat16 and lse.dtype == torch.float32
    grad = torch.ops.mblm.cross_entropy_bwd(loss, logits, target, lse, -100)
    assert grad.shape == logits.shape


FAST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for i, (rows, vocab, dtype) in enumerate([(8, 13, torch.float32), (5, 4, torch.float64)]):
        logits, target = _make(rows, vocab, dtype, device, seed=i, ignore=1)
        logits.requires_grad_(True)
        kwargs = {} if i == 0 else {"test_utils": FAST_UTILS}
        torch.library.opcheck(
            torch.ops.mblm.cross_entropy_fwd.default, (logits, target, 1), **kwargs
        )
        loss, lse = torch.ops.mblm.cross_entropy_fwd(logits.detach(), target, 1)
        torch.library.opcheck(
            torch.ops.mblm.cross_entropy_bwd.default,
            (torch.randn_like(loss), logits.detach(), target, lse, 1),
            **kwargs,
        )


def test_compile_fullgraph_equals_eager():
    def fn(lg, tg):
        return cross_entropy(lg, tg, 0).sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    logits, target = _make(9, 7, seed=5, ignore=0)
    logits.requires_grad_(True)
    out = compiled(logits, target)
    torch.testing.assert_close(out, fn(logits, target), rtol=0, atol=0)
    (got,) = torch.autograd.grad(out, logits)
    (exp,) = torch.autograd.grad(fn(logits, target), logits)
    torch.testing.assert_close(got, exp, rtol=0, atol=0)


def test_fallback_without_kernel_warns(monkeypatch):
    from mblm.ops import _common
    from mblm.ops import loss as L

    monkeypatch.setattr(L, "_KERNEL_DEVICE_TYPES", frozenset())
    _common.warn_once.cache_clear()
    logits, target = _make(4, 5, seed=6)
    with pytest.warns(RuntimeWarning, match="running the reference"):
        loss = cross_entropy(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, reduction="none"))
