"""The patch op family (patch_pad, stage_input, patch_unpatch): kernels against the reference and
against naive index loops, opcheck, gradcheck, edge and strided shapes, bad inputs, compile."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from tolerances import GRAD_TOL, VALUE_TOL

import mblm.ops  # noqa: F401  (loads the extension and every family)
from mblm.ops import patch as P
from mblm.ops import reference as R

FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
ID_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
# Every device; the cuda entries are skipped (by tests/conftest.py) without a GPU build.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, device="cpu", gen=None) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def _lengths(inner: int) -> list[int]:
    """Edge lengths around the patch size plus a prime."""
    return sorted({0, 1, max(inner - 1, 0), inner, inner + 1, 2 * inner + 1, 13})


# ---------------------------------------------------------------------------------------------
# patch_pad
# ---------------------------------------------------------------------------------------------


def _patch_pad_naive(ids: torch.Tensor, inner_sizes, pad_id: int) -> torch.Tensor:
    batch, length = ids.shape
    inner = math.prod(inner_sizes)
    patches = -(-length // inner)
    flat = [[pad_id] * (patches * inner) for _ in range(batch)]
    for b in range(batch):
        for t in range(length):
            flat[b][t] = int(ids[b, t])
    out = torch.tensor(flat, dtype=ids.dtype).reshape(batch, patches * inner)
    return out.reshape(batch, patches, *inner_sizes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inner_sizes", [(), (1,), (4,), (4, 3), (2, 3, 2)])
def test_patch_pad_matches_reference(device, inner_sizes):
    gen = _gen(1)
    inner = math.prod(inner_sizes)
    for dtype in ID_DTYPES:
        for batch in (0, 1, 3):
            for length in _lengths(inner):
                ids = torch.randint(0, 100, (batch, length), generator=gen).to(
                    dtype=dtype, device=device
                )
                pad = 7 if dtype == torch.uint8 else -3
                out = P.patch_pad(ids, inner_sizes, pad)
                ref = R.patch_pad_ref(ids, inner_sizes, pad)
                assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
                assert torch.equal(out, ref), (dtype, batch, length, inner_sizes)


def test_patch_pad_matches_naive_loops():
    gen = _gen(2)
    for inner_sizes, length in [((3,), 7), ((2, 2), 9), ((), 5), ((5,), 5)]:
        ids = torch.randint(0, 256, (2, length), generator=gen)
        assert torch.equal(P.patch_pad(ids, inner_sizes, 0), _patch_pad_naive(ids, inner_sizes, 0))


def test_patch_pad_shapes_of_the_spec():
    # semantics §2.2: seq_lens (5, 4, 3) -> inner (4, 3); L = 13 -> (1, 2, 4, 3); L = 60 -> (1, 5, 4, 3)
    assert P.patch_pad(torch.zeros(1, 13, dtype=torch.long), (4, 3), 0).shape == (1, 2, 4, 3)
    assert P.patch_pad(torch.zeros(1, 60, dtype=torch.long), (4, 3), 0).shape == (1, 5, 4, 3)
    assert P.patch_pad(torch.zeros(2, 0, dtype=torch.long), (4, 3), 0).shape == (2, 0, 4, 3)
    assert P.patch_pad(torch.zeros(2, 5, dtype=torch.long), (), 0).shape == (2, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_patch_pad_strided_ids(device):
    gen = _gen(3)
    base = torch.randint(0, 256, (9, 6), generator=gen).to(device)
    for ids in (base.t(), base[:, ::2], base[1::3, 1:], base.t()[:, 2:7]):
        assert not ids.is_contiguous() or ids.shape[0] == 0
        assert torch.equal(P.patch_pad(ids, (2, 2), 5), R.patch_pad_ref(ids, (2, 2), 5))


def test_patch_pad_extreme_pad_values():
    ids = torch.zeros(1, 3, dtype=torch.int64)
    for dtype, pad in [
        (torch.int64, -(2**63)),
        (torch.int64, 2**63 - 1),
        (torch.uint8, 255),
        (torch.int8, -128),
    ]:
        out = P.patch_pad(ids.to(dtype), (2,), pad)
        assert out[0, 1, 1].item() == pad and out.dtype == dtype


@pytest.mark.parametrize(
    "ids, inner_sizes, pad_id, match",
    [
        (torch.zeros(5, dtype=torch.long), (2,), 0, "ids must have 2 dims"),
        (torch.zeros(1, 2, 3, dtype=torch.long), (2,), 0, "ids must have 2 dims"),
        (torch.zeros(2, 5), (2,), 0, "ids must be an integer"),
        (torch.zeros(2, 5, dtype=torch.bool), (2,), 0, "ids must be an integer"),
        (torch.zeros(2, 5, dtype=torch.long), (2, 0), 0, "inner_sizes"),
        (torch.zeros(2, 5, dtype=torch.long), (-1,), 0, "inner_sizes"),
        (torch.zeros(2, 5, dtype=torch.uint8), (2,), 256, "pad_id"),
        (torch.zeros(2, 5, dtype=torch.uint8), (2,), -1, "pad_id"),
        (torch.zeros(2, 5, dtype=torch.int8), (2,), 128, "pad_id"),
    ],
)
def test_patch_pad_bad_inputs(ids, inner_sizes, pad_id, match):
    with pytest.raises(RuntimeError, match=match):
        P.patch_pad(ids, inner_sizes, pad_id)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mblm.patch_pad(ids.to("meta"), list(inner_sizes), pad_id)


def test_patch_pad_meta():
    out = P.patch_pad(torch.empty(3, 14, dtype=torch.int32, device="meta"), (4, 2), 0)
    assert out.device.type == "meta" and out.shape == (3, 2, 4, 2) and out.dtype == torch.int32


@pytest.mark.parametrize("device", DEVICES)
def test_patch_pad_opcheck(device):
    gen = _gen(4)
    samples = [
        (torch.randint(0, 256, (2, 13), generator=gen), [4, 3], 0),
        (torch.randint(0, 256, (3, 8), generator=gen).to(torch.uint8), [4], 255),
        (torch.randint(0, 256, (8, 3), generator=gen).t(), [], 1),
        (torch.randint(0, 256, (1, 0), generator=gen).int(), [2, 2], -1),
    ]
    for ids, inner, pad in samples:
        torch.library.opcheck(torch.ops.mblm.patch_pad.default, (ids.to(device), inner, pad))


# ---------------------------------------------------------------------------------------------
# stage_input
# ---------------------------------------------------------------------------------------------


def _stage_inputs(n, s, d, dtype, device, gen, with_pos, with_prev):
    x = _randn(n, s, d, dtype=dtype, device=device, gen=gen)
    start = _randn(d, dtype=dtype, device=device, gen=gen)
    pos = _randn(s, d, dtype=dtype, device=device, gen=gen) if with_pos else None
    prev = _randn(n, s, d, dtype=dtype, device=device, gen=gen) if with_prev else None
    return x, start, pos, prev


def _stage_input_naive(x, start, pos, prev):
    n, s, d = x.shape
    out = torch.empty(n, s + 1, d, dtype=x.dtype)
    for b in range(n):
        out[b, 0] = start
        for j in range(s):
            row = x[b, j]
            if pos is not None:
                row = row + pos[j]
            if prev is not None:
                row = row + prev[b, j]
            out[b, j + 1] = row
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "with_pos, with_prev", [(False, False), (True, False), (False, True), (True, True)]
)
def test_stage_input_matches_reference_exactly(device, dtype, with_pos, with_prev):
    # Copies and additions in the reference's order: bit-identical in every dtype.
    gen = _gen(10)
    for n, s, d in [(3, 5, 16), (1, 1, 1), (0, 4, 8), (7, 8, 33), (2, 0, 4), (64, 8, 24)]:
        args = _stage_inputs(n, s, d, dtype, device, gen, with_pos, with_prev)
        out = P.stage_input(*args)
        ref = R.stage_input_ref(*args)
        assert out.shape == (n, s + 1, d) and out.dtype == dtype and out.is_contiguous()
        assert torch.equal(out, ref), (n, s, d)


def test_stage_input_matches_naive_loops():
    gen = _gen(11)
    args = _stage_inputs(3, 4, 5, torch.float64, "cpu", gen, True, True)
    assert torch.equal(P.stage_input(*args), _stage_input_naive(*args))


@pytest.mark.parametrize("device", DEVICES)
def test_stage_input_random_shapes(device):
    gen = _gen(12)
    for _ in range(25):
        n, s, d = (int(v) for v in torch.randint(0, 9, (3,), generator=gen))
        flags = torch.randint(0, 2, (2,), generator=gen).tolist()
        args = _stage_inputs(n, s, d + 1, torch.float32, device, gen, *map(bool, flags))
        assert torch.equal(P.stage_input(*args), R.stage_input_ref(*args)), (n, s, d, flags)


@pytest.mark.parametrize("device", DEVICES)
def test_stage_input_strided_inputs(device):
    gen = _gen(13)
    n, s, d = 4, 6, 10
    x_t = _randn(s, n, d, device=device, gen=gen).transpose(0, 1)  # (N, S, D) view
    x_last = _randn(n, s, 2 * d, device=device, gen=gen)[..., ::2]  # non-contiguous last dim
    start = _randn(3 * d, device=device, gen=gen)[::3]
    pos = _randn(d, s, device=device, gen=gen).t()
    prev = _randn(n + 2, s + 1, d, device=device, gen=gen)[1:-1, 1:]
    for x in (x_t, x_last):
        for p, v in [(pos, prev), (None, prev), (pos, None)]:
            assert torch.equal(P.stage_input(x, start, p, v), R.stage_input_ref(x, start, p, v))


def test_stage_input_gradcheck():
    gen = _gen(14)
    for with_pos, with_prev in [(True, True), (False, True), (True, False), (False, False)]:
        args = _stage_inputs(3, 4, 5, torch.float64, "cpu", gen, with_pos, with_prev)
        args = tuple(a.requires_grad_() if a is not None else None for a in args)
        assert torch.autograd.gradcheck(P.stage_input, args)
        assert torch.autograd.gradgradcheck(P.stage_input, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_stage_input_grads_match_reference(device, dtype):
    gen = _gen(15)
    for n, s, d in [(5, 8, 16), (1, 3, 7), (300, 4, 12)]:
        args = _stage_inputs(n, s, d, dtype, device, gen, True, True)
        leaves = [a.detach().requires_grad_() for a in args]
        grad_out = _randn(n, s + 1, d, dtype=dtype, device=device, gen=gen)
        got = torch.autograd.grad(P.stage_input(*leaves), leaves, grad_out)
        want = torch.autograd.grad(R.stage_input_ref(*leaves), leaves, grad_out)
        for name, g, w in zip(("x", "start", "pos", "prev"), got, want, strict=True):
            assert g.dtype == dtype and g.shape == w.shape
            if name in ("x", "prev"):  # copies of grad_out
                assert torch.equal(g, w), name
            else:  # sums over N
                torch.testing.assert_close(g, w, **GRAD_TOL[dtype], msg=name)


def test_stage_input_partial_requires_grad():
    gen = _gen(16)
    x, start, pos, prev = _stage_inputs(3, 4, 5, torch.float32, "cpu", gen, True, True)
    for which in range(4):
        leaves = [x, start, pos, prev]
        leaves[which] = leaves[which].clone().requires_grad_()
        out = P.stage_input(*leaves)
        (g,) = torch.autograd.grad(out.sum(), leaves[which])
        want = {
            0: torch.ones_like(x),
            1: torch.full_like(start, 3.0),
            2: torch.full_like(pos, 3.0),
            3: torch.ones_like(prev),
        }
        torch.testing.assert_close(g, want[which])


def test_stage_input_bwd_op_outputs():
    gen = _gen(17)
    grad = _randn(6, 5, 3, gen=gen, dtype=torch.float64)
    gx, gs, gp, gv = torch.ops.mblm.stage_input_bwd(grad, True, True)
    assert torch.equal(gx, grad[:, 1:]) and torch.equal(gv, grad[:, 1:])
    assert gv.data_ptr() != gx.data_ptr()
    torch.testing.assert_close(gs, grad[:, 0].sum(0), **VALUE_TOL[torch.float64])
    torch.testing.assert_close(gp, grad[:, 1:].sum(0), **VALUE_TOL[torch.float64])
    gx, gs, gp, gv = torch.ops.mblm.stage_input_bwd(grad, False, False)
    assert gp.numel() == 0 and gv.numel() == 0 and torch.equal(gx, grad[:, 1:])
    # empty batch: the sums are zeros
    gx, gs, gp, gv = torch.ops.mblm.stage_input_bwd(grad[:0], True, True)
    assert gx.shape == (0, 4, 3) and torch.equal(gs, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(gp, torch.zeros(4, 3, dtype=torch.float64))


def test_stage_input_bwd_half_accumulates_in_float32():
    # 4096 rows of 1/3 summed in bfloat16 would stall far below 4096/3; float32 accumulation does not.
    grad = torch.full((4096, 2, 8), 1 / 3, dtype=torch.bfloat16)
    _, gs, gp, _ = torch.ops.mblm.stage_input_bwd(grad, True, False)
    want = grad.float().sum(0)
    torch.testing.assert_close(gs.float(), want[0], rtol=1e-2, atol=0)
    torch.testing.assert_close(gp.float(), want[1:], rtol=1e-2, atol=0)


def test_stage_input_bwd_strided_grad():
    gen = _gen(18)
    grad = _randn(5, 7, 12, gen=gen).transpose(0, 1)[:, :, ::2]  # (7, 5, 6) strided
    gx, gs, gp, gv = torch.ops.mblm.stage_input_bwd(grad, True, True)
    assert torch.equal(gx, grad[:, 1:]) and torch.equal(gv, grad[:, 1:])
    torch.testing.assert_close(gs, grad[:, 0].sum(0))
    torch.testing.assert_close(gp, grad[:, 1:].sum(0))


def _bad_stage_input_cases():
    x = torch.zeros(2, 3, 4)
    start, pos, prev = torch.zeros(4), torch.zeros(3, 4), torch.zeros(2, 3, 4)
    return [
        ((torch.zeros(2, 3), start, None, None), "x must have 3 dims"),
        ((x, torch.zeros(5), None, None), "start must have shape"),
        ((x, torch.zeros(1, 4), None, None), "start must have shape"),
        ((x, start, torch.zeros(4, 4), None), "pos must have shape"),
        ((x, start, torch.zeros(3, 4, 1), None), "pos must have shape"),
        ((x, start, None, torch.zeros(2, 4, 4)), "prev must have"),
        ((x, start, None, torch.zeros(3, 3, 4)), "prev must have"),
        ((x, start.double(), None, None), "start has dtype"),
        ((x, start, pos.half(), None), "pos has dtype"),
        ((x, start, pos, prev.bfloat16()), "prev has dtype"),
        ((x, start.to("meta"), None, None), "start is on meta"),
        ((x, start, None, prev.to("meta")), "prev is on meta"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_stage_input_cases())))
def test_stage_input_bad_inputs(case):
    args, match = _bad_stage_input_cases()[case]
    with pytest.raises(RuntimeError, match=match):
        P.stage_input(*args)
    if all(a is None or a.device.type == "cpu" for a in args):
        with pytest.raises(RuntimeError, match=match):  # the fake (meta) impl checks the same
            torch.ops.mblm.stage_input_fwd(*(a.to("meta") if a is not None else None for a in args))


def test_stage_input_op_rejects_integer_x():
    x = torch.zeros(2, 3, 4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="x must be float"):
        torch.ops.mblm.stage_input_fwd(x, x[0, 0], None, None)
    with pytest.raises(RuntimeError, match="grad must have 3 dims"):
        torch.ops.mblm.stage_input_bwd(torch.zeros(3, 4), True, True)
    with pytest.raises(RuntimeError, match="grad must have 3 dims"):
        torch.ops.mblm.stage_input_bwd(torch.zeros(3, 0, 4), True, True)
    with pytest.raises(RuntimeError, match="grad must be float"):
        torch.ops.mblm.stage_input_bwd(torch.zeros(3, 2, 4, dtype=torch.int64), True, True)


def test_stage_input_falls_back_for_unsupported_dtypes():
    P.warn_once.cache_clear()
    x = torch.arange(24, dtype=torch.int32).reshape(2, 3, 4)
    with pytest.warns(RuntimeWarning, match="stage_input"):
        out = P.stage_input(x, x[0, 0], x[0], x)
    assert torch.equal(out, R.stage_input_ref(x, x[0, 0], x[0], x))


def test_stage_input_meta():
    x = torch.empty(4, 6, 8, device="meta", dtype=torch.bfloat16)
    out = P.stage_input(x, x[0, 0], x[0], x)
    assert out.device.type == "meta" and out.shape == (4, 7, 8) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_stage_input_opcheck(device):
    gen = _gen(19)
    for dtype in (torch.float32, torch.float64):
        for with_pos, with_prev in [(True, True), (False, False), (True, False), (False, True)]:
            for requires_grad in (False, True):
                args = _stage_inputs(3, 4, 5, dtype, device, gen, with_pos, with_prev)
                args = tuple(
                    a.requires_grad_(requires_grad) if a is not None else None for a in args
                )
                torch.library.opcheck(torch.ops.mblm.stage_input_fwd.default, args)
    x = _randn(4, 3, 6, device=device, gen=gen).transpose(0, 1)
    torch.library.opcheck(torch.ops.mblm.stage_input_fwd.default, (x, x[0, 0], x[0], x))
    grad = _randn(3, 5, 4, device=device, gen=gen)
    for has_pos, has_prev in [(True, True), (False, False)]:
        torch.library.opcheck(torch.ops.mblm.stage_input_bwd.default, (grad, has_pos, has_prev))
        torch.library.opcheck(
            torch.ops.mblm.stage_input_bwd.default,
            (grad.clone().requires_grad_(), has_pos, has_prev),
        )


# ---------------------------------------------------------------------------------------------
# patch_unpatch
# ---------------------------------------------------------------------------------------------


def _unpatch_naive(y: torch.Tensor, length: int, with_start: bool) -> torch.Tensor:
    batch, rows, dim = y.shape[0], y.shape[-2], y.shape[-1]
    y4 = (
        y.reshape(batch, -1, rows, dim)
        if y.numel()
        else y.new_empty(batch, math.prod(y.shape[1:-2]), rows, dim)
    )
    out = y.new_empty(batch, length, dim)
    for b in range(batch):
        t = 0
        if with_start and t < length:
            out[b, 0] = y4[b, 0, 0]
            t = 1
        for g in range(y4.shape[1]):
            for r in range(1, rows):
                if t < length:
                    out[b, t] = y4[b, g, r]
                t += 1
    return out


def _unpatch_rows(shape, with_start):
    groups = math.prod(shape[1:-2])
    return groups * (shape[-2] - 1) + (1 if with_start and groups else 0)


UNPATCH_SHAPES = [
    (2, 5, 3),
    (2, 3, 5, 4),
    (1, 2, 3, 4, 2),
    (3, 1, 1, 5),
    (2, 4, 2, 1),
    (0, 3, 5, 4),
    (2, 0, 5, 4),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("with_start", [True, False])
def test_patch_unpatch_matches_reference(device, dtype, with_start):
    gen = _gen(20)
    for shape in UNPATCH_SHAPES:
        y = _randn(*shape, dtype=dtype, device=device, gen=gen)
        rows = _unpatch_rows(shape, with_start)
        for length in sorted({0, 1, rows - 1, rows} & set(range(rows + 1))):
            out = P.patch_unpatch(y, length, with_start)
            assert (
                out.shape == (shape[0], length, shape[-1])
                and out.dtype == dtype
                and out.is_contiguous()
            )
            assert torch.equal(out.cpu(), _unpatch_naive(y.cpu(), length, with_start)), (
                shape,
                length,
            )
            if y.numel() and shape[-2] > 1:
                assert torch.equal(out, R.patch_unpatch_ref(y, length, with_start))


@pytest.mark.parametrize("device", DEVICES)
def test_patch_unpatch_random_shapes(device):
    gen = _gen(21)
    for _ in range(25):
        ndim = int(torch.randint(3, 6, (1,), generator=gen))
        shape = [int(v) for v in torch.randint(1, 5, (ndim,), generator=gen)]
        shape[-2] += 1
        with_start = bool(torch.randint(0, 2, (1,), generator=gen))
        rows = _unpatch_rows(shape, with_start)
        length = int(torch.randint(0, rows + 1, (1,), generator=gen))
        y = _randn(*shape, device=device, gen=gen)
        assert torch.equal(
            P.patch_unpatch(y, length, with_start), R.patch_unpatch_ref(y, length, with_start)
        )


@pytest.mark.parametrize("device", DEVICES)
def test_patch_unpatch_strided_y(device):
    gen = _gen(22)
    base = _randn(3, 2, 5, 8, device=device, gen=gen)
    views = [
        base.transpose(0, 1),  # (B=2, G=3, 5, 8): middle dims not mergeable with B
        base[..., ::2],  # non-contiguous last dim
        base[:, :, 1:, :].permute(1, 0, 2, 3),
        _randn(2, 3, 4, 5, 6, device=device, gen=gen).permute(
            0, 2, 1, 3, 4
        ),  # rank 5, permuted middle
    ]
    for y in views:
        rows = _unpatch_rows(y.shape, True)
        for with_start in (True, False):
            length = rows - 1
            assert torch.equal(
                P.patch_unpatch(y, length, with_start), R.patch_unpatch_ref(y, length, with_start)
            )


def test_patch_unpatch_gradcheck():
    gen = _gen(23)
    for shape, length, with_start in [
        ((2, 3, 4, 3), 9, True),
        ((2, 3, 4, 3), 7, False),
        ((1, 5, 2), 4, True),
    ]:
        y = _randn(*shape, dtype=torch.float64, gen=gen).requires_grad_()

        def fn(t, length=length, with_start=with_start):
            return P.patch_unpatch(t, length, with_start)

        assert torch.autograd.gradcheck(fn, (y,))
        assert torch.autograd.gradgradcheck(fn, (y,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_patch_unpatch_grads_match_reference(device, dtype):
    gen = _gen(24)
    for shape, length, with_start in [
        ((2, 3, 5, 4), 11, True),
        ((2, 3, 5, 4), 12, False),
        ((3, 2, 2, 5, 4), 17, True),
    ]:
        y = _randn(*shape, dtype=dtype, device=device, gen=gen).requires_grad_()
        g = _randn(shape[0], length, shape[-1], dtype=dtype, device=device, gen=gen)
        (got,) = torch.autograd.grad(P.patch_unpatch(y, length, with_start), y, g)
        (want,) = torch.autograd.grad(R.patch_unpatch_ref(y, length, with_start), y, g)
        assert torch.equal(got, want)


def test_patch_unpatch_bad_inputs():
    y = torch.zeros(2, 3, 5, 4)
    with pytest.raises(RuntimeError, match="length = 14 exceeds"):
        P.patch_unpatch(y, 14, True)
    with pytest.raises(RuntimeError, match="length = 13 exceeds"):
        P.patch_unpatch(y, 13, False)
    with pytest.raises(RuntimeError, match="length must be >= 0"):
        P.patch_unpatch(y, -1, True)
    with pytest.raises(RuntimeError, match="y must have at least 3 dims"):
        P.patch_unpatch(torch.zeros(5, 4), 2, True)
    with pytest.raises(RuntimeError, match=r"y.size\(-2\) must be >= 1"):
        P.patch_unpatch(torch.zeros(2, 3, 0, 4), 0, True)
    with pytest.raises(RuntimeError, match="y must be float"):
        torch.ops.mblm.patch_unpatch_fwd(torch.zeros(2, 5, 4, dtype=torch.long), 2, True)
    # the fake impl reports the same errors
    with pytest.raises(RuntimeError, match="length = 14 exceeds"):
        torch.ops.mblm.patch_unpatch_fwd(y.to("meta"), 14, True)
    g = torch.zeros(2, 5, 4)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        torch.ops.mblm.patch_unpatch_bwd(g, [3, 3, 5, 4], True)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        torch.ops.mblm.patch_unpatch_bwd(g, [2, 3, 5, 3], True)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        torch.ops.mblm.patch_unpatch_bwd(torch.zeros(2, 14, 4), [2, 3, 5, 4], False)
    with pytest.raises(RuntimeError, match="y_shape must have at least 3"):
        torch.ops.mblm.patch_unpatch_bwd(g, [2, 4], True)
    with pytest.raises(RuntimeError, match="grad must be float"):
        torch.ops.mblm.patch_unpatch_bwd(g.long(), [2, 3, 5, 4], True)


def test_patch_unpatch_meta():
    y = torch.empty(2, 3, 5, 4, device="meta", dtype=torch.float16)
    out = P.patch_unpatch(y, 10, True)
    assert out.device.type == "meta" and out.shape == (2, 10, 4) and out.dtype == torch.float16


def test_patch_unpatch_falls_back_for_unsupported_dtypes():
    P.warn_once.cache_clear()
    y = torch.arange(40).reshape(2, 5, 4)
    with pytest.warns(RuntimeWarning, match="patch_unpatch"):
        out = P.patch_unpatch(y, 3, True)
    assert torch.equal(out, R.patch_unpatch_ref(y, 3, True))


@pytest.mark.parametrize("device", DEVICES)
def test_patch_unpatch_opcheck(device):
    gen = _gen(25)
    for shape, length, with_start in [
        ((2, 3, 5, 4), 13, True),
        ((2, 3, 5, 4), 5, False),
        ((2, 5, 3), 0, True),
    ]:
        for requires_grad in (False, True):
            y = _randn(*shape, device=device, gen=gen).requires_grad_(requires_grad)
            torch.library.opcheck(torch.ops.mblm.patch_unpatch_fwd.default, (y, length, with_start))
            g = _randn(shape[0], length, shape[-1], device=device, gen=gen).requires_grad_(
                requires_grad
            )
            torch.library.opcheck(
                torch.ops.mblm.patch_unpatch_bwd.default, (g, list(shape), with_start)
            )
    y = _randn(3, 2, 5, 4, device=device, gen=gen).transpose(0, 1)
    torch.library.opcheck(torch.ops.mblm.patch_unpatch_fwd.default, (y, 7, True))


# ---------------------------------------------------------------------------------------------
# the three together, as the model uses them, under torch.compile
# ---------------------------------------------------------------------------------------------


def _two_stage(ids, emb, start0, start1, pos1, proj):
    """A toy 2-stage pass: pad, embed, global input, local input with the projected global
    output as prev, read back."""
    patched = P.patch_pad(ids, (4,), 0)  # (B, P0, 4)
    batch, patches = patched.shape[0], patched.shape[1]
    e = emb[patched]  # (B, P0, 4, D)
    g_in = P.stage_input(e.reshape(batch, patches, -1), start0, None, None)  # (B, 1 + P0, 4D)
    g_out = torch.tanh(g_in)[:, :-1]  # (B, P0, 4D)
    prev = (g_out @ proj).reshape(batch * patches, 4, -1)  # (B P0, 4, D)
    l_in = P.stage_input(e.reshape(batch * patches, 4, -1), start1, pos1, prev)
    y = torch.sin(l_in).reshape(batch, patches, 5, -1)
    return P.patch_unpatch(y, ids.shape[1], True)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_equals_eager(dynamic):
    gen = _gen(30)
    d = 6
    params = [
        _randn(256, d, gen=gen),
        _randn(4 * d, gen=gen),
        _randn(d, gen=gen),
        _randn(4, d, gen=gen),
        _randn(4 * d, 4 * d, gen=gen) * 0.1,
    ]
    params = [p.requires_grad_() for p in params]
    compiled = torch.compile(_two_stage, fullgraph=True, dynamic=dynamic)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback anywhere
        for length in (13, 16, 9):
            ids = torch.randint(0, 256, (2, length), generator=gen)
            eager = _two_stage(ids, *params)
            got = compiled(ids, *params)
            torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
            want_grads = torch.autograd.grad(eager.square().sum(), params)
            got_grads = torch.autograd.grad(got.square().sum(), params)
            for g, w in zip(got_grads, want_grads, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
