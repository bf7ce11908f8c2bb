"""Scan family: ``torch.ops.mblm.scan_fwd`` / ``scan_bwd`` / ``scan_update`` and the wrappers in
``mblm.ops.scan``.

Compared with ``selective_scan_ref`` (values: y and the final state; gradients: the reference's
autograd under one upstream gradient for y and for the final state), plus opcheck, gradcheck,
chunked runs carrying the state, stepping, the layouts the Mamba block passes, bad inputs, a
fuzz over shapes / dtypes / strides, torch.compile, and a long sequence whose saved state stays
O(L / SCAN_CHUNK).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import devices
from tolerances import GRAD_TOL, VALUE_TOL

import mblm.ops  # noqa: F401  (registers torch.ops.mblm)
from mblm.ops import reference
from mblm.ops.reference import selective_scan_ref
from mblm.ops.scan import (
    SCAN_CHUNK,
    selective_scan,
    selective_scan_step,
    selective_scan_step_,
)

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def weight_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(
    b,
    d,
    length,
    n,
    dtype=torch.float32,
    device="cpu",
    *,
    layout="model",
    D=True,
    z=True,
    bias=True,
    init=True,
    seed=0,
    requires_grad=False,
    softplus=True,
):
    """The nine tensor arguments (None where disabled). layout "model": u, delta, z transposes of
    (B, L, D)-contiguous tensors and B, C transposes of (B, L, N) slices of one wider projection
    (as the Mamba block passes them); "contiguous": (B, D, L) / (B, N, L) contiguous; "strided":
    every (B, X, L) tensor a view with non-unit strides on all dims. Without ``softplus`` delta
    and delta_bias are made non-negative (a negative step makes the recurrence grow)."""
    gen = torch.Generator().manual_seed(seed)
    wd = weight_dtype(dtype)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device, dt)

    def seq(x, scale=1.0):
        if layout == "model":
            return rand(b, length, x, scale=scale).transpose(1, 2)
        if layout == "contiguous":
            return rand(b, x, length, scale=scale)
        return rand(2 * b, 3 * x, 2 * length, scale=scale)[::2, ::3, ::2]

    u = seq(d)
    delta = seq(d, 0.5)
    if not softplus:
        delta = delta.abs()
    if layout == "model":
        proj = rand(b, length, 3 + 2 * n)
        B, C = proj[..., 3 : 3 + n].transpose(1, 2), proj[..., 3 + n :].transpose(1, 2)
    else:
        B, C = seq(n), seq(n)
    A = -torch.rand(d, n, generator=gen, dtype=torch.float64).mul(2).add(0.05).to(device, wd)
    tensors = [
        u,
        delta,
        A,
        B,
        C,
        rand(d, dt=wd) if D else None,
        seq(d) if z else None,
        (rand(d, scale=0.5, dt=wd) if softplus else rand(d, scale=0.5, dt=wd).abs())
        if bias
        else None,
        rand(b, d, n, dt=wd) if init else None,
    ]
    if requires_grad:
        tensors = [t if t is None else t.detach().requires_grad_() for t in tensors]
    return tensors


def call_kernel(t, softplus):
    return selective_scan(*t[:8], delta_softplus=softplus, initial_state=t[8])


def call_ref(t, softplus):
    return selective_scan_ref(*t[:8], delta_softplus=softplus, initial_state=t[8])


def grads(fn, tensors, softplus, gy, gh):
    """Gradients of <y, gy> + <final_state, gh> w.r.t. every non-None tensor (fresh leaves)."""
    leaves = [t if t is None else t.detach().clone().requires_grad_() for t in tensors]
    y, h = fn(leaves, softplus)
    present = [t for t in leaves if t is not None]
    return torch.autograd.grad((y, h), present, (gy, gh), allow_unused=True, materialize_grads=True)


def assert_close(got, expected, tol, what):
    torch.testing.assert_close(got, expected, **tol, msg=lambda m: f"{what}: {m}")


def check_against_reference(tensors, softplus, dtype, value_tol=None, grad_tol=None, seed=1):
    value_tol = value_tol or VALUE_TOL[dtype]
    grad_tol = grad_tol or GRAD_TOL[dtype]
    cdt = weight_dtype(dtype)
    y, h = call_kernel(tensors, softplus)
    yr, hr = call_ref(tensors, softplus)
    assert y.dtype == dtype and y.shape == tensors[0].shape
    assert h.dtype == cdt and h.shape == hr.shape
    assert_close(y, yr, value_tol, "y")
    assert_close(
        h, hr, VALUE_TOL[cdt] if dtype in (torch.float16, torch.bfloat16) else value_tol, "h"
    )
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device, dtype)
    gh = torch.randn(h.shape, generator=gen, dtype=torch.float64).to(h.device, cdt)
    got = grads(call_kernel, tensors, softplus, gy, gh)
    want = grads(call_ref, tensors, softplus, gy, gh)
    names = [name for name, t in zip(NAMES, tensors, strict=True) if t is not None]
    for name, g, w, t in zip(names, got, want, [t for t in tensors if t is not None], strict=True):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_close(g, w, grad_tol, f"grad_{name}")


# ---------------------------------------------------------------------------------------------
# values and gradients vs the reference
# ---------------------------------------------------------------------------------------------

SHAPES = [
    (length, n, d)
    for length in (0, 1, 63, 64, 65, 200)
    for n, d in ((1, 5), (4, 16), (16, 40), (4, 1))
]


@pytest.mark.parametrize(("length", "n", "d"), SHAPES)
def test_values_and_grads_vs_reference_fp64(length, n, d):
    """float64, every optional input present, softplus: exact to rounding, every gradient."""
    t = make_inputs(2, d, length, n, torch.float64, seed=length + n + d)
    check_against_reference(t, True, torch.float64)


@pytest.mark.parametrize("options", range(16))
@pytest.mark.parametrize("layout", ["model", "contiguous", "strided"])
def test_optional_inputs_and_layouts(options, layout):
    """Every combination of D / z / delta_bias / initial_state, softplus on and off, three
    layouts; float64 exact, L crossing a chunk boundary."""
    D, z, bias, init = (bool(options >> i & 1) for i in range(4))
    softplus = options % 3 != 0
    t = make_inputs(2, 5, 70, 3, torch.float64, layout=layout, D=D, z=z, bias=bias, init=init,
                    seed=options, softplus=softplus)  # fmt: skip
    check_against_reference(t, softplus, torch.float64)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 65, 200])
def test_dtypes_vs_reference(device, dtype, length):
    """Every kernel dtype; half / bfloat16 compute in float32 like the reference, so they differ
    only by output rounding (and by float32 reassociation)."""
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only kernel dtype")
    t = make_inputs(2, 40, length, 16, dtype, device, seed=length)
    check_against_reference(t, True, dtype)


def test_outputs_follow_the_input_layout():
    """Channel-contiguous inputs give channel-contiguous y / grads (the model's next transpose is
    free); (B, D, L)-contiguous inputs give (B, D, L)-contiguous ones."""
    for layout, expect_cl in (("model", True), ("contiguous", False)):
        t = make_inputs(2, 8, 10, 4, layout=layout, requires_grad=True)
        y, h = call_kernel(t, True)
        assert (y.stride(1) == 1) == expect_cl and h.is_contiguous()
        if expect_cl:
            assert y.transpose(1, 2).is_contiguous()
        g_u, g_B = torch.autograd.grad(y.sum() + h.sum(), (t[0], t[3]))
        assert (g_u.stride(1) == 1) == expect_cl
        assert (g_B.stride(1) == 1) == expect_cl


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("b", "d", "length", "n"), [(2, 3, 5, 2), (1, 2, 70, 2)])
@pytest.mark.parametrize("softplus", [True, False])
def test_gradcheck(b, d, length, n, softplus):
    """float64 finite differences for every input (L = 70 crosses a checkpoint), y and the final
    state both checked."""
    t = make_inputs(b, d, length, n, torch.float64, seed=3, requires_grad=True, softplus=softplus)
    assert torch.autograd.gradcheck(
        lambda *a: call_kernel(list(a), softplus), t, eps=1e-6, atol=1e-6, rtol=1e-4
    )


def _fwd_args(t, softplus):
    return (*t[:8], softplus, t[8])


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("case", range(3))
def test_opcheck_fwd(requires_grad, case):
    shapes = [(2, 5, 9, 3), (1, 3, 70, 2), (2, 4, 1, 1)]
    opts = [dict(), dict(D=False, z=False, bias=False, init=False), dict(layout="contiguous")]
    t = make_inputs(*shapes[case], torch.float64, **opts[case], requires_grad=requires_grad,
                    softplus=case != 1)  # fmt: skip
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if case == 0:
        utils = utils + ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(
        torch.ops.mblm.scan_fwd.default, _fwd_args(t, case != 1), test_utils=utils
    )


@pytest.mark.parametrize("case", range(2))
def test_opcheck_bwd_and_update(case):
    b, d, length, n = (2, 5, 9, 3) if case == 0 else (1, 3, 70, 2)
    t = make_inputs(b, d, length, n, torch.float64, init=case == 0, z=case == 0)
    y, h, ckpt = torch.ops.mblm.scan_fwd(*_fwd_args(t, True))
    args = (
        torch.randn_like(y),
        torch.randn_like(h) if case == 0 else None,
        *t[:8],
        True,
        t[8],
        ckpt,
    )
    torch.library.opcheck(torch.ops.mblm.scan_bwd.default, args)
    state = torch.randn(b, d, n, dtype=torch.float64)
    step = [x[..., 0] if x is not None and x.dim() == 3 else x for x in t[:8]]
    torch.library.opcheck(torch.ops.mblm.scan_update.default, (state, *step, True))


# ---------------------------------------------------------------------------------------------
# state: chunked runs, stepping
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("split", [1, 64, 77])
def test_chunked_equals_one_run(dtype, split):
    """Two pieces with the state passed along == one run, in values and gradients (the gradient
    of the second piece reaches the first through its final state)."""
    length = 150
    t = make_inputs(2, 6, length, 4, dtype, seed=split, requires_grad=True)
    tol = GRAD_TOL[dtype]
    y, h = call_kernel(t, True)
    gy = torch.randn_like(y)
    full = torch.autograd.grad((y * gy).sum() + h.sum(), t)

    def piece(x, lo, hi):
        return x if x is None or x.dim() != 3 or x.shape[2] != length else x[..., lo:hi]

    y1, h1 = selective_scan(*[piece(x, 0, split) for x in t[:8]], True, t[8])
    y2, h2 = selective_scan(*[piece(x, split, length) for x in t[:8]], True, h1)
    assert_close(torch.cat((y1, y2), 2), y, tol, "y")
    assert_close(h2, h, tol, "final state")
    loss = (y1 * gy[..., :split]).sum() + (y2 * gy[..., split:]).sum() + h2.sum()
    parts = torch.autograd.grad(loss, t)
    for name, a, b in zip(NAMES, parts, full, strict=True):
        assert_close(a, b, tol, f"grad_{name}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_opts", [True, False])
def test_step_equals_fwd(device, dtype, with_opts):
    """scan_update step by step == scan_fwd (y every step, final state), and the functional
    step leaves its input state alone."""
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only kernel dtype")
    length = 20
    t = make_inputs(2, 12, length, 5, dtype, device, D=with_opts, z=with_opts, bias=with_opts,
                    init=with_opts, seed=7, softplus=with_opts)  # fmt: skip
    y, h = call_kernel(t, with_opts)
    cdt = weight_dtype(dtype)
    state = t[8].clone() if t[8] is not None else torch.zeros_like(h)
    fstate = None if t[8] is None else t[8].clone()
    for i in range(length):
        step = [x[..., i] if x is not None and x.dim() == 3 else x for x in t[:8]]
        yi = selective_scan_step_(state, *step, with_opts)
        before = None if fstate is None else fstate.clone()
        fy, new = selective_scan_step(fstate, *step, with_opts)
        if before is not None:
            assert torch.equal(fstate, before)
        fstate = new
        assert yi.dtype == dtype and new.dtype == cdt
        assert_close(yi, y[..., i], VALUE_TOL[dtype], f"y[{i}]")
        assert_close(fy, y[..., i], VALUE_TOL[dtype], f"functional y[{i}]")
    assert_close(state, h, VALUE_TOL[cdt], "state")
    assert_close(fstate, h, VALUE_TOL[cdt], "functional state")


def test_step_state_dtypes_and_strides():
    """The in-place state may be any float dtype and non-contiguous."""
    t = make_inputs(3, 6, 1, 4, torch.float32, seed=2)
    step = [x[..., 0] if x is not None and x.dim() == 3 else x for x in t[:8]]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        base = torch.zeros(3, 4, 6, dtype=dtype)
        state = base.transpose(1, 2)
        state.copy_(t[8])
        y_ref, h_ref = selective_scan_ref(*t[:8], True, state.float())
        y = selective_scan_step_(state, *step, True)
        assert_close(y, y_ref[..., 0], VALUE_TOL[torch.float32], f"y {dtype}")
        # The math is float32 (u's compute dtype) whatever the state's storage dtype.
        tol = VALUE_TOL[torch.bfloat16 if dtype == torch.bfloat16 else torch.float32]
        assert_close(state, h_ref.to(dtype), tol, f"state {dtype}")


def test_functional_step_is_differentiable():
    t = make_inputs(2, 4, 1, 3, torch.float64, seed=4, requires_grad=True)
    step = [x[..., 0] if x is not None and x.dim() == 3 else x for x in t[:8]]
    y, new = selective_scan_step(t[8], *step, True)
    yr, hr = selective_scan_ref(*t[:8], True, t[8])
    assert_close(y, yr[..., 0], VALUE_TOL[torch.float64], "y")
    g1 = torch.autograd.grad(y.sum() + new.sum(), t)
    g2 = torch.autograd.grad(yr.sum() + hr.sum(), t)
    for name, a, b in zip(NAMES, g1, g2, strict=True):
        assert_close(a, b, VALUE_TOL[torch.float64], f"grad_{name}")


# ---------------------------------------------------------------------------------------------
# edge cases, bad inputs, fuzz
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("b", "d", "length", "n"), [(0, 4, 5, 3), (2, 0, 5, 3), (2, 3, 5, 0)])
def test_empty_sizes(b, d, length, n):
    t = make_inputs(b, d, length, n, torch.float64, requires_grad=True)
    check_against_reference(t, True, torch.float64)


def test_non_finite_values_propagate():
    """NaN in the data gives NaN where it reaches (no crash); A must be finite (checked)."""
    t = make_inputs(1, 3, 10, 2, seed=5)
    t[0][0, 1, 4] = float("nan")
    y, h = call_kernel(t, True)
    assert torch.isnan(y[0, 1, 4:]).all() and torch.isfinite(y[0, 0]).all()
    assert torch.isnan(h[0, 1]).all() and torch.isfinite(h[0, 0]).all()


def _bad(**changes):
    t = make_inputs(2, 4, 6, 3)
    args = dict(zip(NAMES, t, strict=True))
    args.update(changes)
    return args


BAD_FWD = [
    (dict(u=torch.randn(2, 4)), "u must have 3 dims"),
    (dict(u=torch.randn(2, 4, 6).to(torch.int32)), "u must be float64/float32"),
    (dict(delta=torch.randn(2, 4, 7)), "delta must have shape"),
    (dict(delta=torch.randn(2, 4, 6, dtype=torch.float64)), "delta has dtype"),
    (dict(A=torch.randn(4)), "A must have 2 dims"),
    (dict(A=-torch.rand(5, 3)), "A must have shape"),
    (dict(A=-torch.rand(4, 3, dtype=torch.float64)), "A must be float32"),
    (dict(A=torch.tensor([[float("-inf")] * 3] * 4)), "A must be finite"),
    (dict(A=torch.full((4, 3), float("nan"))), "A must be finite"),
    (dict(B=torch.randn(2, 2, 6)), "B must have shape"),
    (dict(B=torch.randn(2, 3, 6, dtype=torch.float16)), "B has dtype"),
    (dict(C=torch.randn(2, 3, 5)), "C must have shape"),
    (dict(D=torch.randn(5)), "D must have shape"),
    (dict(D=torch.randn(4, dtype=torch.float16)), "D must be float32"),
    (dict(z=torch.randn(2, 4)), "z must have shape"),
    (dict(delta_bias=torch.randn(4, 1)), "delta_bias must have shape"),
    (dict(initial_state=torch.randn(2, 4, 2)), "initial_state must have shape"),
    (dict(initial_state=torch.zeros(2, 4, 3, dtype=torch.int64)), "initial_state must be float"),
    (dict(u=torch.randn(2, 4, 6, device="meta")), "delta is on cpu but u is on meta"),
]


@pytest.mark.parametrize(("changes", "match"), BAD_FWD)
def test_bad_inputs_fwd(changes, match):
    args = _bad(**changes)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mblm.scan_fwd(*[args[k] for k in NAMES[:8]], True, args["initial_state"])


def test_bad_inputs_fwd_device_mix():
    args = _bad(B=torch.randn(2, 3, 6, device="meta"))
    with pytest.raises(RuntimeError, match="B is on meta but u is on cpu"):
        torch.ops.mblm.scan_fwd(*[args[k] for k in NAMES[:8]], True, args["initial_state"])


def test_bad_inputs_bwd():
    t = make_inputs(2, 4, 70, 3)
    y, h, ckpt = torch.ops.mblm.scan_fwd(*_fwd_args(t, True))
    rest = (*t[:8], True, t[8])
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        torch.ops.mblm.scan_bwd(y[..., :3], h, *rest, ckpt)
    with pytest.raises(RuntimeError, match="grad_y has dtype"):
        torch.ops.mblm.scan_bwd(y.double(), h, *rest, ckpt)
    with pytest.raises(RuntimeError, match="grad_final_state must have shape"):
        torch.ops.mblm.scan_bwd(y, h[..., :2], *rest, ckpt)
    with pytest.raises(RuntimeError, match="grad_final_state must have the dtype"):
        torch.ops.mblm.scan_bwd(y, h.double(), *rest, ckpt)
    with pytest.raises(RuntimeError, match="checkpoints must have shape"):
        torch.ops.mblm.scan_bwd(y, h, *rest, ckpt[:, :1])
    with pytest.raises(RuntimeError, match="checkpoints must have dtype"):
        torch.ops.mblm.scan_bwd(y, h, *rest, ckpt.double())


def test_bad_inputs_update():
    t = make_inputs(2, 4, 1, 3)
    step = [x[..., 0] if x is not None and x.dim() == 3 else x for x in t[:8]]
    state = torch.zeros(2, 4, 3)
    upd = torch.ops.mblm.scan_update
    with pytest.raises(RuntimeError, match="u must have 2 dims"):
        upd(state, step[0][..., None], *step[1:], True)
    with pytest.raises(RuntimeError, match="state must have shape"):
        upd(torch.zeros(2, 4, 2), *step, True)
    with pytest.raises(RuntimeError, match="state must be float"):
        upd(torch.zeros(2, 4, 3, dtype=torch.int32), *step, True)
    with pytest.raises(RuntimeError, match="overlapping memory"):
        upd(torch.zeros(1, 4, 3).expand(2, 4, 3), *step, True)
    with pytest.raises(RuntimeError, match="B must have shape"):
        upd(state, step[0], step[1], step[2], step[3][:, :2], *step[4:], True)
    with pytest.raises(RuntimeError, match="A must be finite"):
        upd(state, step[0], step[1], torch.full((4, 3), float("inf")), *step[3:], True)


@pytest.mark.parametrize("seed", range(12))
def test_fuzz(seed):
    """Random sizes, dtypes, layouts and options vs the reference."""
    gen = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    dtype = pick([torch.float64, torch.float32, torch.bfloat16, torch.float16])
    b, d = pick([0, 1, 2, 3]), pick([1, 3, 8, 9, 17])
    length, n = pick([0, 1, 2, 63, 64, 65, 129]), pick([1, 2, 5, 16])
    flags = [bool(torch.randint(2, (1,), generator=gen)) for _ in range(5)]
    layout = pick(["model", "contiguous", "strided"])
    t = make_inputs(b, d, length, n, dtype, layout=layout, D=flags[0], z=flags[1],
                    bias=flags[2], init=flags[3], seed=seed, softplus=flags[4])  # fmt: skip
    check_against_reference(t, flags[4], dtype)


# ---------------------------------------------------------------------------------------------
# torch.compile, long sequences, meta
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(dynamic):
    """The wrapper's forward + backward trace as one graph (fakes, autograd registration), with
    symbolic lengths too, and equal eager."""

    def fn(*a):
        y, h = selective_scan(*a[:8], True, a[8])
        return (y * y).sum() + h.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for length in (70, 9, 130) if dynamic else (70,):
        t = make_inputs(2, 6, length, 4, seed=length, requires_grad=True)
        eager = torch.autograd.grad(fn(*t), t)
        got = torch.autograd.grad(compiled(*t), t)
        for name, a, b in zip(NAMES, got, eager, strict=True):
            assert_close(a, b, VALUE_TOL[torch.float32], f"grad_{name}")


def test_compile_step_in_place():
    """The in-place decode step traces (its schema's mutation annotation) and updates the state."""
    t = make_inputs(2, 6, 3, 4, seed=6)
    step = [x[..., 0] if x is not None and x.dim() == 3 else x for x in t[:8]]

    def fn(state, *a):
        return selective_scan_step_(state, *a, True)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    s_eager, s_comp = t[8].clone(), t[8].clone()
    y_eager = fn(s_eager, *step)
    y_comp = compiled(s_comp, *step)
    assert_close(y_comp, y_eager, VALUE_TOL[torch.float32], "y")
    assert_close(s_comp, s_eager, VALUE_TOL[torch.float32], "state")


def test_meta_device_shapes():
    t = make_inputs(2, 6, 70, 4, device="meta")
    y, h = call_kernel(t, True)
    assert y.shape == (2, 6, 70) and y.stride(1) == 1 and h.shape == (2, 6, 4)


def test_long_sequence_saves_only_checkpoints():
    """L = 100_000: forward and backward run, and besides the inputs autograd keeps only the
    checkpoints, (B, ceil(L / SCAN_CHUNK), N, D): O(L / SCAN_CHUNK * D * N), not O(L * D * N)."""
    b, d, length, n = 1, 3, 100_000, 4
    t = make_inputs(b, d, length, n, D=True, z=True, bias=True, init=True, requires_grad=True)
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        y, h = call_kernel(t, True)
    inputs = {id(x) for x in t if x is not None}
    extra = [x for x in saved if id(x) not in inputs]
    chunks = math.ceil(length / SCAN_CHUNK)
    assert [tuple(x.shape) for x in extra] == [(b, chunks, n, d)]
    assert extra[0].numel() <= b * (length // SCAN_CHUNK + 1) * n * d
    (y.sum() + h.sum()).backward()
    for name, x in zip(NAMES, t, strict=True):
        assert torch.isfinite(x.grad).all(), name
    # The final state equals a float64 run of the same inputs.
    t64 = [x.detach().double() for x in t]
    _, h64 = call_kernel(t64, True)
    assert_close(h.double(), h64, dict(rtol=1e-4, atol=1e-4), "final state")


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("length", "n", "d"), [(1, 1, 5), (65, 4, 40), (200, 16, 16),
                                                (130, 64, 8), (0, 4, 3)])  # fmt: skip
@pytest.mark.parametrize("layout", ["model", "contiguous", "strided"])
def test_cuda_vs_reference(dtype, length, n, d, layout):
    t = make_inputs(2, d, length, n, dtype, "cuda", layout=layout, seed=length + n)
    check_against_reference(t, True, dtype)


@pytest.mark.cuda
def test_cuda_matches_cpu_and_compiles():
    t = make_inputs(2, 24, 150, 16, seed=9)
    y_cpu, h_cpu = call_kernel(t, True)
    tc = [x if x is None else x.cuda() for x in t]
    y, h = call_kernel(tc, True)
    assert_close(y.cpu(), y_cpu, VALUE_TOL[torch.float32], "y")
    assert_close(h.cpu(), h_cpu, VALUE_TOL[torch.float32], "h")
    fn = torch.compile(lambda *a: selective_scan(*a[:8], True, a[8]), fullgraph=True,
                       mode="reduce-overhead")  # fmt: skip
    for _ in range(3):
        yc, hc = fn(*tc)
    assert_close(yc, y, VALUE_TOL[torch.float32], "compiled y")


@pytest.mark.cuda
def test_cuda_large_state_falls_back():
    t = make_inputs(1, 4, 10, 80, device="cuda")
    with pytest.warns(RuntimeWarning, match="state sizes"):
        y, _ = call_kernel(t, True)
    assert_close(y, call_ref(t, True)[0], VALUE_TOL[torch.float32], "y")


@pytest.mark.parametrize("length,chunk", [(37, 8), (64, 16), (5, 128), (1, 4), (0, 4)])
@pytest.mark.parametrize("opts", [{}, {"D": False, "z": False, "bias": False, "init": False}])
def test_chunked_reference_equals_sequential_reference(length, chunk, opts):
    """``selective_scan_chunked_ref`` (the GPU fallback: parallel prefix scan per chunk,
    recomputed in backward) gives the sequential reference's values and gradients."""
    inputs = make_inputs(2, 3, length, 4, torch.float64, requires_grad=True, **opts)
    results = []
    for chunked in (False, True):
        args = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
        *tensors, init = args
        if chunked:
            y, h = reference.selective_scan_chunked_ref(*tensors, True, init, chunk_size=chunk)
        else:
            y, h = selective_scan_ref(*tensors, True, init)
        grads = []
        if length:
            (y.square().sum() + h.sin().sum()).backward()
            grads = [a.grad if a is not None else None for a in args]
        results.append((y.detach(), h.detach(), grads))
    (y0, h0, g0), (y1, h1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h1, h0, rtol=1e-10, atol=1e-12)
    for name, a, b in zip(NAMES, g0, g1, strict=False):  # no gradients at length 0
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=name)
