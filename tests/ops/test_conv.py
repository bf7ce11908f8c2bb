"""The conv op family (conv1d_fwd/bwd/update): values and gradients against the reference, layouts,
chunked and stepped runs, opcheck, gradcheck, bad inputs, a fuzz test and torch.compile."""

from __future__ import annotations

import pytest
import torch
from tolerances import GRAD_TOL, VALUE_TOL

import mblm.ops  # noqa: F401  (loads the extension and every family)
from mblm.ops.conv import causal_conv1d, causal_conv1d_step, causal_conv1d_step_
from mblm.ops.reference import causal_conv1d_ref

FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, device="cpu", gen=None) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def _x(batch, channels, length, layout, dtype, device, gen) -> torch.Tensor:
    """x (B, C, L) in one of the layouts callers pass."""
    if layout == "channels_last":  # the transpose of a (B, L, C) slice of a wider projection
        return _randn(batch, length, 2 * channels + 1, dtype=dtype, device=device, gen=gen)[
            :, :, 1 : channels + 1
        ].transpose(1, 2)
    if layout == "contiguous":
        return _randn(batch, channels, length, dtype=dtype, device=device, gen=gen)
    return _randn(batch, channels, 2 * length, dtype=dtype, device=device, gen=gen)[:, :, ::2]


def _case(
    batch,
    channels,
    length,
    width,
    dtype,
    device,
    gen,
    layout="channels_last",
    bias=True,
    state=True,
    param_dtype=None,
):
    pdt = param_dtype or dtype
    x = _x(batch, channels, length, layout, dtype, device, gen)
    w = _randn(channels, width, dtype=pdt, device=device, gen=gen)
    b = _randn(channels, dtype=pdt, device=device, gen=gen) if bias else None
    s = _randn(batch, channels, width - 1, dtype=dtype, device=device, gen=gen) if state else None
    return x, w, b, s


def _grads(outputs, inputs, upstream):
    loss = sum((o.double() * u.double()).sum() for o, u in zip(outputs, upstream, strict=True))
    req = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(loss, req, allow_unused=True))
    return [next(got) if t is not None else None for t in inputs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "time_strided"])
def test_values_and_grads_match_reference(device, dtype, layout):
    gen = _gen(0)
    for width in (1, 2, 4, 5):
        for length in (0, 1, 3, width + 2, 70):
            for activation in (False, True):
                x, w, b, s = _case(2, 9, length, width, dtype, device, gen, layout)
                leaves = [t.detach().requires_grad_() for t in (x, w, b, s)]
                y, fs = causal_conv1d(*leaves, activation=activation)
                ref_leaves = [t.detach().requires_grad_() for t in (x, w, b, s)]
                yr, fr = causal_conv1d_ref(*ref_leaves, activation)
                assert y.shape == x.shape and y.dtype == dtype and fs.shape == s.shape
                torch.testing.assert_close(y, yr, **VALUE_TOL[dtype])
                assert torch.equal(fs, fr)
                up = (torch.randn_like(y), torch.randn_like(fs))
                got = _grads((y, fs), leaves, up)
                want = _grads((yr, fr), ref_leaves, up)
                for name, g, r, t in zip("xwbs", got, want, leaves, strict=True):
                    g = torch.zeros_like(t) if g is None else g
                    r = torch.zeros_like(t) if r is None else r
                    tol = GRAD_TOL[dtype] if dtype != torch.float16 else dict(rtol=5e-3, atol=5e-3)
                    torch.testing.assert_close(g, r, **tol, msg=f"{name} w={width} L={length}")


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_are_channels_last_views(device):
    x, w, b, s = _case(2, 6, 5, 4, torch.float32, device, _gen(1), layout="contiguous")
    y, fs = causal_conv1d(x, w, b, s, activation=True)
    assert y.stride(1) == 1 and y.transpose(1, 2).is_contiguous() and fs.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_bf16_input_with_fp32_or_bf16_params(device, param_dtype):
    x, w, b, s = _case(2, 16, 40, 4, torch.bfloat16, device, _gen(2), param_dtype=param_dtype)
    y, _ = causal_conv1d(x, w, b, s, activation=True)
    yr, _ = causal_conv1d_ref(x, w, b, s, True)
    torch.testing.assert_close(y, yr, **VALUE_TOL[torch.bfloat16])
    w.requires_grad_()
    gw = torch.autograd.grad(causal_conv1d(x, w, b, s, True)[0].float().sum(), w)[0]
    assert gw.dtype == param_dtype


@pytest.mark.parametrize("device", DEVICES)
def test_two_pieces_with_state_equal_one_run(device):
    gen = _gen(3)
    for width in (1, 3, 4):
        x, w, b, _ = _case(2, 7, 23, width, torch.float64, device, gen)
        full, full_state = causal_conv1d(x, w, b, None, activation=True)
        for cut in (0, 1, 2, 10, 23):
            y1, s1 = causal_conv1d(x[:, :, :cut], w, b, None, activation=True)
            y2, s2 = causal_conv1d(x[:, :, cut:], w, b, s1, activation=True)
            torch.testing.assert_close(torch.cat((y1, y2), 2), full, **VALUE_TOL[torch.float64])
            assert torch.equal(s2, full_state)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_update_steps_equal_forward(device, dtype):
    gen = _gen(4)
    for width in (1, 2, 4):
        x, w, b, s = _case(3, 10, 9, width, dtype, device, gen)
        full, full_state = causal_conv1d(x, w, b, s, activation=True)
        state = s.clone()
        for t in range(x.shape[2]):
            y = causal_conv1d_step_(x[:, :, t], state, w, b, activation=True)
            torch.testing.assert_close(y, full[:, :, t], **VALUE_TOL[dtype])
        assert torch.equal(state, full_state)
        before = s.clone()
        y, new_state = causal_conv1d_step(x[:, :, 0], s, w, b, activation=False)
        assert torch.equal(s, before)  # the functional step leaves its argument alone
        ref, ref_state = causal_conv1d_ref(x[:, :, :1], w, b, s, False)
        torch.testing.assert_close(y, ref[:, :, 0], **VALUE_TOL[dtype])
        assert torch.equal(new_state, ref_state)


def test_update_accepts_strided_state():
    gen = _gen(5)
    x, w, b, _ = _case(2, 6, 4, 4, torch.float32, "cpu", gen)
    big = _randn(2, 6, 8, gen=gen)
    state = big[:, :, ::2][:, :, :3]
    expected, expected_state = causal_conv1d_ref(x[:, :, :1], w, b, state.clone(), True)
    y = causal_conv1d_step_(x[:, :, 0], state, w, b, activation=True)
    torch.testing.assert_close(y, expected[:, :, 0])
    assert torch.equal(big[:, :, ::2][:, :, :3], expected_state)


def test_batch_and_channels_zero():
    for shape in ((0, 4, 5), (2, 0, 5)):
        x = torch.randn(*shape, requires_grad=True)
        w = torch.randn(shape[1], 3, requires_grad=True)
        y, fs = causal_conv1d(x, w, None, None, activation=True)
        assert y.shape == shape and fs.shape == (shape[0], shape[1], 2)
        (y.sum() + fs.sum()).backward()
        assert x.grad.shape == shape and w.grad.shape == w.shape


def test_opcheck():
    gen = _gen(6)
    for bias, state, act in [(True, True, True), (False, False, False), (True, False, True)]:
        x, w, b, s = _case(2, 5, 7, 3, torch.float32, "cpu", gen, bias=bias, state=state)
        args = (x, w.requires_grad_(), b, s, act)
        torch.library.opcheck(torch.ops.mblm.conv1d_fwd.default, args)
        gy = torch.randn(2, 5, 7)
        gf = torch.randn(2, 5, 2)
        wd = w.detach()
        torch.library.opcheck(torch.ops.mblm.conv1d_bwd.default, (gy, gf, x, wd, b, s, act))
        torch.library.opcheck(
            torch.ops.mblm.conv1d_update.default, (x[:, :, 0], torch.randn(2, 5, 2), w, b, act)
        )


def test_gradcheck_float64():
    gen = _gen(7)
    for width, length in ((4, 6), (3, 1), (1, 4)):
        x, w, b, s = _case(2, 3, length, width, torch.float64, "cpu", gen)
        leaves = tuple(t.detach().requires_grad_() for t in (x, w, b, s))
        for act in (False, True):
            torch.autograd.gradcheck(lambda *a, act=act: causal_conv1d(*a, activation=act), leaves)


def test_double_backward_is_refused_clearly():
    x, w, b, s = _case(1, 3, 4, 3, torch.float64, "cpu", _gen(11))
    x.requires_grad_()
    (gx,) = torch.autograd.grad(causal_conv1d(x, w, b, s, True)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through causal_conv1d"):
        gx.sum().backward()


def test_compile_fullgraph_forward_backward():
    gen = _gen(8)
    x, w, b, s = _case(2, 8, 12, 4, torch.float32, "cpu", gen)
    leaves = [t.detach().requires_grad_() for t in (x, w, b, s)]

    def f(x, w, b, s):
        y, fs = causal_conv1d(x, w, b, s, activation=True)
        return y.square().sum() + fs.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(*leaves)
    got = torch.autograd.grad(loss, leaves)
    ref = [t.detach().requires_grad_() for t in (x, w, b, s)]
    want = torch.autograd.grad(f(*ref), ref)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r)


BAD_INPUTS = [
    # (x shape, weight shape, bias shape or None, state shape or None, message)
    ((2, 4), (4, 3), None, None, "x must have 3 dims"),
    ((2, 4, 5), (5, 3), None, None, r"weight must have shape \(C, K\) with C = 4"),
    ((2, 4, 5), (4,), None, None, r"weight must have shape \(C, K\)"),
    ((2, 4, 5), (4, 0), None, None, "kernel width K >= 1"),
    ((2, 4, 5), (4, 3), (3,), None, r"bias must have shape \(C,\) = \(4,\)"),
    ((2, 4, 5), (4, 3), None, (2, 4, 3), r"initial_state must have shape \(B, C, K - 1\)"),
    ((2, 4, 5), (4, 3), None, (1, 4, 2), r"initial_state must have shape"),
]


@pytest.mark.parametrize("xs,ws,bs,ss,msg", BAD_INPUTS)
def test_bad_shapes_raise_clear_errors(xs, ws, bs, ss, msg):
    x = torch.randn(*xs)
    w = torch.randn(*ws)
    b = torch.randn(*bs) if bs else None
    s = torch.randn(*ss) if ss else None
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.mblm.conv1d_fwd(x, w, b, s, True)


def test_bad_dtypes_and_update_args():
    x, w = torch.randn(2, 4, 5), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="x must be float64/float32/float16/bfloat16"):
        torch.ops.mblm.conv1d_fwd(x.int(), w, None, None, False)
    with pytest.raises(RuntimeError, match=r"weight must have x's dtype \(Double\) or float32"):
        torch.ops.mblm.conv1d_fwd(x.double(), w.half(), None, None, False)
    with pytest.raises(RuntimeError, match="initial_state has dtype"):
        torch.ops.mblm.conv1d_fwd(x, w, None, torch.randn(2, 4, 2).double(), False)
    with pytest.raises(RuntimeError, match="grad_y must have x's shape"):
        torch.ops.mblm.conv1d_bwd(torch.randn(2, 4, 4), None, x, w, None, None, False)
    with pytest.raises(RuntimeError, match="grad_final_state must have shape"):
        torch.ops.mblm.conv1d_bwd(torch.randn(2, 4, 5), torch.randn(2, 4), x, w, None, None, False)
    with pytest.raises(RuntimeError, match=r"conv1d_update x must have 2 dims \(B, C\)"):
        torch.ops.mblm.conv1d_update(x, torch.randn(2, 4, 2), w, None, False)
    with pytest.raises(RuntimeError, match=r"conv_state must have shape \(B, C, K - 1\)"):
        torch.ops.mblm.conv1d_update(x[:, :, 0], torch.randn(2, 4, 3), w, None, False)
    if torch.device("meta").type == "meta":
        with pytest.raises(RuntimeError, match="is on meta but x is on cpu"):
            torch.ops.mblm.conv1d_fwd(x, w.to("meta"), None, None, False)


def test_fuzz_shapes_dtypes_strides():
    gen = _gen(9)
    rng = torch.Generator().manual_seed(10)
    for _ in range(40):
        batch, channels, length, width = (
            int(torch.randint(lo, hi, (1,), generator=rng))
            for lo, hi in ((0, 4), (1, 20), (0, 40), (1, 6))
        )
        dtype = FLOATS[int(torch.randint(0, 4, (1,), generator=rng))]
        layout = ["channels_last", "contiguous", "time_strided"][
            int(torch.randint(0, 3, (1,), generator=rng))
        ]
        bias, state, act = (bool(torch.randint(0, 2, (1,), generator=rng)) for _ in range(3))
        x, w, b, s = _case(batch, channels, length, width, dtype, "cpu", gen, layout, bias, state)
        y, fs = causal_conv1d(x, w, b, s, activation=act)
        yr, fr = causal_conv1d_ref(x, w, b, s, act)
        torch.testing.assert_close(y, yr, **VALUE_TOL[dtype])
        assert torch.equal(fs, fr)
