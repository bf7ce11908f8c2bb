"""SSD family: ``torch.ops.mblm.ssd_fwd`` / ``ssd_bwd`` / ``ssd_update`` and the wrappers in
``mblm.ops.ssd``.

Compared with ``ssd_ref`` (the sequential recurrence) and ``ssd_chunked_ref`` (the chunked SSD
algorithm): values, gradients of every input (autograd through the reference), gradcheck in
float64, opcheck, sequences run in pieces and token by token, the strided layout the Mamba2 model
passes, extreme decays (the kernel's rescaling restarts), long sequences with O(L / 256)
checkpoints, bad inputs, a fuzz test and torch.compile.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from tolerances import GRAD_TOL, VALUE_TOL

import mblm.ops  # noqa: F401  (registers torch.ops.mblm)
from mblm.ops import _common, ssd
from mblm.ops.reference import ssd_chunked_ref, ssd_ref
from mblm.ops.ssd import CHECKPOINT_STEPS, ssd_scan, ssd_step, ssd_step_

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")

# float32 gradients of dt, A and dt_bias come from a running sum over up to 256 steps (the
# log-decay gradient, restarted at every checkpoint): rounding adds up along it, so these three
# get 10x the float32 gradient tolerance; A and dt_bias also sum over the whole sequence.
LOG_DECAY_GRADS = ("dt", "A", "dt_bias")


def grad_tol(dtype: torch.dtype, name: str) -> dict:
    tol = GRAD_TOL[dtype]
    if dtype == torch.float32 and name in LOG_DECAY_GRADS:
        return {k: 10 * v for k, v in tol.items()}
    return tol


def make_inputs(
    b,
    length,
    h,
    p,
    g,
    n,
    *,
    dtype=torch.float64,
    device="cpu",
    seed=0,
    d_kind="h",
    bias=True,
    softplus=True,
    init=True,
    layout="contiguous",
    requires_grad=False,
    a_range=(0.1, 4.0),
):
    """The arguments of ssd_scan as a dict. layout "model": x, B and C are slices of one
    (B, L, conv_dim) tensor and dt a slice of a wider projection output, as Mamba2 passes them;
    "contiguous": separate tensors. dt is raw (any sign) with softplus, else positive."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    if layout == "model":
        conv = h * p + 2 * g * n
        xbc = rand(b, length, conv)
        x = xbc[..., : h * p].view(b, length, h, p)
        B = xbc[..., h * p : h * p + g * n].view(b, length, g, n)
        C = xbc[..., h * p + g * n :].view(b, length, g, n)
        proj = rand(b, length, h * p + h + 3)
        dt_raw = proj[..., h * p + 1 : h * p + 1 + h]
    else:
        x, B, C = rand(b, length, h, p), rand(b, length, g, n), rand(b, length, g, n)
        dt_raw = rand(b, length, h)
    dt = dt_raw - 1.0 if softplus else dt_raw.abs() * 0.3 + 0.02
    lo, hi = a_range
    A = -(torch.rand(h, generator=gen, dtype=torch.float64) * (hi - lo) + lo)
    D = {None: None, "h": rand(h), "hp": rand(h, p)}[d_kind]
    # (without softplus, dt + dt_bias must stay positive: a negative step makes the state grow)
    dt_bias = (rand(h) * 0.5 if softplus else rand(h).abs() * 0.1) if bias else None
    s0 = rand(b, h, p, n) if init else None
    args = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, initial_state=s0)
    out = {}
    for name, t in args.items():
        if t is None:
            out[name] = None
            continue
        t = t.to(device=device, dtype=pdt if name in ("A", "D", "dt_bias") else dtype)
        if name == "initial_state":
            t = t.to(pdt)
        if layout == "model" and name in ("x", "B", "C", "dt"):
            pass  # .to() keeps the strides of a view only for a no-op; rebuild below
        out[name] = t
    if layout == "model":  # keep x, B, C, dt views of shared storage in the target dtype
        xbc = torch.cat([out["x"].flatten(2), out["B"].flatten(2), out["C"].flatten(2)], dim=-1)
        out["x"] = xbc[..., : h * p].view(b, length, h, p)
        out["B"] = xbc[..., h * p : h * p + g * n].view(b, length, g, n)
        out["C"] = xbc[..., h * p + g * n :].view(b, length, g, n)
        wide = torch.cat([out["dt"], out["dt"]], dim=-1)
        out["dt"] = wide[..., :h]
    if requires_grad:
        out = {k: (v.detach().requires_grad_() if v is not None else None) for k, v in out.items()}
    out["dt_softplus"] = softplus
    return out


def call(fn, a):
    return fn(
        a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["dt_bias"], a["dt_softplus"],
        a["initial_state"],
    )  # fmt: skip


def upstream(y, s, seed=1):
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device, y.dtype)
    gs = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.device, s.dtype)
    return gy, gs


def grads_of(fn, a, gy, gs):
    leaves = {k: a[k] for k in NAMES if a[k] is not None}
    y, s = call(fn, a)
    loss = (y.to(torch.float64) * gy.double()).sum() + (s.double() * gs.double()).sum()
    got = torch.autograd.grad(
        loss, list(leaves.values()), allow_unused=True, materialize_grads=True
    )
    return dict(zip(leaves, got, strict=True))


def assert_close(got, expected, tol, what):
    torch.testing.assert_close(got, expected, **tol, msg=lambda m: f"{what}: {m}")


def as64(a):
    """The same inputs in float64 (requiring grad where a's do): the ground truth for float32."""
    return {
        k: (
            v.detach().double().requires_grad_(v.requires_grad)
            if isinstance(v, torch.Tensor)
            else v
        )
        for k, v in a.items()
    }


def assert_values(got, truth, dtype, what):
    """Values vs float64 truth from the same inputs, absolute tolerance relative to the largest
    entry (each output sums N products per step and the state carries every earlier step)."""
    tol = VALUE_TOL[dtype]["rtol"]
    scale = max(truth.abs().max().item(), 1.0) if truth.numel() else 1.0
    torch.testing.assert_close(got.double(), truth, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")  # fmt: skip


def assert_grads(got, truth, dtype, what=""):
    """Gradients vs float64 truth; absolute tolerance relative to each gradient's largest entry
    (a gradient mixes large and tiny entries, each computed with float32 rounding)."""
    for name, g in got.items():
        tol = grad_tol(dtype, name)["rtol"]
        t = truth[name]
        scale = max(t.abs().max().item(), 1.0) if t.numel() else 1.0
        torch.testing.assert_close(
            g.double(), t, rtol=tol, atol=tol * scale, msg=lambda m, n=name: f"grad {n} {what}: {m}"
        )


# ---------------------------------------------------------------------------------------------
# values and gradients vs the references
# ---------------------------------------------------------------------------------------------

# (B, L, H, P, G, N): every L in {0, 1, 63, 64, 65, 130}, P in {1, 4, 16}, N in {1, 8, 16},
# H in {1, 2, 4, 6} with G in {1, 2, H}, plus lengths across checkpoint blocks and the Mamba2
# head dim / state size.
SHAPES = [
    (2, 0, 2, 4, 1, 8),
    (2, 1, 2, 4, 2, 8),
    (1, 63, 1, 1, 1, 1),
    (2, 64, 4, 4, 4, 16),
    (1, 65, 6, 16, 2, 8),
    (2, 130, 6, 4, 6, 1),
    (1, 130, 4, 16, 1, 16),
    (2, 65, 2, 1, 2, 16),
    (1, 600, 2, 20, 1, 17),
    (1, 70, 2, 64, 1, 128),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}L{}H{}P{}G{}N{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", ["D_h+bias+sp+init", "D_hp+nobias+sp", "noD+bias+nosp+init"])
def test_values_and_grads_vs_references(shape, dtype, options):
    d_kind = "hp" if "D_hp" in options else ("h" if "D_h" in options else None)
    a = make_inputs(
        *shape,
        dtype=dtype,
        seed=sum(shape),
        d_kind=d_kind,
        bias="nobias" not in options,
        softplus="nosp" not in options,
        init="init" in options,
        requires_grad=True,
    )
    y, s = call(ssd_scan, a)
    assert y.dtype == dtype and y.shape == a["x"].shape and y.is_contiguous()
    assert s.dtype == dtype and s.shape == (shape[0], shape[2], shape[3], shape[5])
    a64 = as64(a)
    for ref in (ssd_ref, ssd_chunked_ref):
        ref_y, ref_s = call(ref, a64)
        assert_values(y, ref_y, dtype, f"y vs {ref.__name__}")
        assert_values(s, ref_s, dtype, f"final state vs {ref.__name__}")
    ref_y, ref_s = call(ssd_ref, a)

    gy, gs = upstream(ref_y, ref_s)
    got = grads_of(ssd_scan, a, gy, gs)
    for name, g in got.items():
        assert g.dtype == a[name].dtype and g.shape == a[name].shape
    assert_grads(got, grads_of(ssd_ref, as64(a), gy, gs), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_twice_the_reference_error(dtype):
    """FA rule: err(kernel, ref64) <= 2 err(ref in dtype, ref64) + tol, for y, the final state
    and every gradient (the kernel computes in float32, the reference in float32 from rounded
    inputs: both see the same input rounding)."""
    a = make_inputs(2, 130, 4, 16, 2, 16, dtype=dtype, seed=3, requires_grad=True)
    a64 = {
        k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v)
        for k, v in a.items()
    }
    y, s = call(ssd_scan, a)
    ry, rs = call(ssd_ref, a)
    y64, s64 = call(ssd_ref, a64)
    for what, got, ref, truth in (("y", y, ry, y64), ("final state", s, rs, s64)):
        err_k = (got.double() - truth).abs().max().item()
        err_r = (ref.double() - truth).abs().max().item()
        assert err_k <= 2 * err_r + 1e-5, f"{what}: kernel {err_k} vs reference {err_r}"
    gy, gs = upstream(y64, s64)
    got = grads_of(ssd_scan, a, gy, gs)
    ref = grads_of(ssd_ref, a, gy, gs)
    truth = grads_of(ssd_ref, a64, gy, gs)
    for name in got:
        err_k = (got[name].double() - truth[name]).abs().max().item()
        err_r = (ref[name].double() - truth[name]).abs().max().item()
        scale = truth[name].abs().max().item()
        assert err_k <= 2 * err_r + 1e-4 * scale + 1e-5, f"grad {name}: {err_k} vs {err_r}"


@pytest.mark.parametrize("a_range", [(40.0, 60.0), (0.0, 0.0), (1e-4, 1e-3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_decays(a_range, dtype):
    """Decays of e^-50 per step (every step restarts the rescaling; float32 states go subnormal),
    none at all (A = 0: the state only grows) and almost none."""
    shape = (1, 300, 2, 8, 1, 16)  # across a checkpoint block
    a = make_inputs(
        *shape, dtype=dtype, seed=5, a_range=a_range, softplus=False, requires_grad=True
    )
    y, s = call(ssd_scan, a)
    ref_y, ref_s = call(ssd_ref, as64(a))
    assert_values(y, ref_y, dtype, "y")
    assert_values(s, ref_s, dtype, "final state")
    gy, gs = upstream(ref_y, ref_s)
    got = grads_of(ssd_scan, a, gy, gs)
    assert_grads(got, grads_of(ssd_ref, as64(a), gy, gs), dtype)


def test_gradcheck_float64_every_input():
    for d_kind, softplus, shape in (
        ("h", True, (2, 6, 4, 2, 2, 3)),
        ("hp", False, (1, 5, 2, 3, 1, 2)),
    ):
        a = make_inputs(*shape, seed=7, d_kind=d_kind, softplus=softplus, requires_grad=True)
        names = [k for k in NAMES if a[k] is not None]

        def fn(*ts, names=names, softplus=softplus):
            kw = dict(zip(names, ts, strict=True))
            return ssd_scan(
                kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw.get("D"), kw.get("dt_bias"),
                softplus, kw.get("initial_state"),
            )  # fmt: skip

        inputs = tuple(a[k] for k in names)
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_across_checkpoints():
    """L > 256: the backward restarts from a saved state and an anchor (fast mode)."""
    a = make_inputs(1, 300, 2, 2, 1, 3, seed=8, requires_grad=True)
    names = [k for k in NAMES if a[k] is not None]

    def fn(*ts):
        kw = dict(zip(names, ts, strict=True))
        return ssd_scan(
            kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw["D"], kw["dt_bias"], True,
            kw["initial_state"],
        )  # fmt: skip

    inputs = tuple(a[k] for k in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_final_state_gradient_alone_flows():
    a = make_inputs(2, 70, 2, 4, 1, 8, dtype=torch.float64, seed=9, requires_grad=True)
    _, s = call(ssd_scan, a)
    (s * s).sum().backward()
    got = {k: a[k].grad for k in NAMES if a[k] is not None}
    for t in (a[k] for k in NAMES if a[k] is not None):
        t.grad = None
    _, rs = call(ssd_ref, a)
    (rs * rs).sum().backward()
    for name, g in got.items():
        expected = a[name].grad if a[name].grad is not None else torch.zeros_like(g)
        assert_close(g, expected, GRAD_TOL[torch.float64], f"grad {name}")


# ---------------------------------------------------------------------------------------------
# state: pieces, steps, checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_two_pieces_with_state_equal_one_run(dtype):
    a = make_inputs(2, 300, 4, 8, 2, 16, dtype=dtype, seed=10, init=True)
    y, s = call(ssd_scan, a)
    cut = 137
    first = dict(a, x=a["x"][:, :cut], dt=a["dt"][:, :cut], B=a["B"][:, :cut], C=a["C"][:, :cut])
    y1, s1 = call(ssd_scan, first)
    second = dict(
        a, x=a["x"][:, cut:], dt=a["dt"][:, cut:], B=a["B"][:, cut:], C=a["C"][:, cut:],
        initial_state=s1,
    )  # fmt: skip
    y2, s2 = call(ssd_scan, second)
    assert_close(torch.cat([y1, y2], dim=1), y, VALUE_TOL[dtype], "y")
    assert_close(s2, s, VALUE_TOL[dtype], "final state")


@pytest.mark.parametrize("state_dtype", ["compute", "input"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_steps_equal_the_scan(dtype, state_dtype):
    """Token by token == the scan; a state kept in x's dtype is rounded after every step (the
    reference then steps one token at a time with the same rounding)."""
    a = make_inputs(2, 12, 4, 8, 2, 16, dtype=dtype, seed=11, d_kind="hp")
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    state = a["initial_state"].to(cdt if state_dtype == "compute" else dtype).clone()
    if state_dtype == "compute":
        y, s = call(ssd_scan, a)
    else:
        ys_ref, s = [], state.clone()
        for t in range(12):
            one = {k: (v[:, t : t + 1] if k in ("x", "dt", "B", "C") else v) for k, v in a.items()}
            yt, s = call(ssd_ref, dict(one, initial_state=s))
            ys_ref.append(yt[:, 0])
            s = s.to(dtype)
        y = torch.stack(ys_ref, dim=1)
    ys = []
    for t in range(12):
        ys.append(
            ssd_step_(
                state,
                a["x"][:, t],
                a["dt"][:, t],
                a["A"],
                a["B"][:, t],
                a["C"][:, t],
                a["D"],
                a["dt_bias"],
                True,
            )  # fmt: skip
        )
    assert_close(torch.stack(ys, dim=1), y, VALUE_TOL[dtype], "y")
    assert_close(state.to(s.dtype), s, VALUE_TOL[dtype if state_dtype == "input" else cdt], "state")


def test_functional_step_leaves_state_and_is_differentiable():
    a = make_inputs(2, 1, 2, 4, 1, 8, seed=12, requires_grad=True)
    state = a["initial_state"]
    before = state.detach().clone()
    args = (a["x"][:, 0], a["dt"][:, 0], a["A"], a["B"][:, 0], a["C"][:, 0], a["D"], a["dt_bias"])
    y, new = ssd_step(state, *args, dt_softplus=True)
    assert torch.equal(state.detach(), before)
    ry, rs = call(ssd_ref, a)
    assert_close(y, ry[:, 0], VALUE_TOL[torch.float64], "y")
    assert_close(new, rs, VALUE_TOL[torch.float64], "state")
    (y.sum() + new.sum()).backward()
    assert a["x"].grad is not None and state.grad is not None and a["A"].grad is not None
    with torch.no_grad():
        y2, new2 = ssd_step(state, *args, dt_softplus=True)
    assert_close(y2, y.detach(), VALUE_TOL[torch.float64], "y (no grad)")
    assert_close(new2, new.detach(), VALUE_TOL[torch.float64], "state (no grad)")


def test_checkpoints_are_the_states_entering_each_block():
    a = make_inputs(1, 600, 2, 4, 1, 8, seed=13)
    y, s, ck = torch.ops.mblm.ssd_fwd(
        a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["dt_bias"], True, a["initial_state"]
    )
    assert ck.shape == (1, 2, 3, 4, 8) and ck.dtype == torch.float64
    assert_close(ck[:, :, 0], a["initial_state"], VALUE_TOL[torch.float64], "checkpoint 0")
    for c in (1, 2):
        t = c * CHECKPOINT_STEPS
        part = dict(a, x=a["x"][:, :t], dt=a["dt"][:, :t], B=a["B"][:, :t], C=a["C"][:, :t])
        _, state = call(ssd_ref, part)
        assert_close(ck[:, :, c], state, VALUE_TOL[torch.float64], f"checkpoint {c}")


def test_long_sequence_memory_and_values():
    """L = 100 000, small dims: forward and backward; the saved states are O(L / 256)."""
    length, tail = 100_000, 50
    a = make_inputs(1, length, 2, 4, 1, 4, dtype=torch.float32, seed=14, requires_grad=True)
    y, s, ck = torch.ops.mblm.ssd_fwd(*fwd_args({k: _detach(v) for k, v in a.items()}))
    assert ck.shape == (1, 2, math.ceil(length / CHECKPOINT_STEPS), 4, 4)

    def chunked(x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state):
        return ssd_chunked_ref(x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state, 16)

    a64 = {k: _detach(v, torch.float64) for k, v in a.items()}
    ref_y, ref_s = call(chunked, a64)
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-4, atol=1e-4)

    y2, s2 = call(ssd_scan, a)
    (y2.sum() + s2.sum()).backward()
    for name in NAMES:
        g = a[name].grad
        assert g is not None and g.shape == a[name].shape and torch.isfinite(g).all(), name
    # The last steps' gradients only depend on the state entering them: the reference run on
    # that suffix alone, from the state the prefix leaves, must give the same.
    prefix = {
        k: (v[:, : length - tail] if k in ("x", "dt", "B", "C") else v) for k, v in a64.items()
    }
    suffix = {
        k: (v[:, length - tail :] if k in ("x", "dt", "B", "C") else v) for k, v in a64.items()
    }
    suffix["initial_state"] = call(chunked, prefix)[1]
    for k in ("x", "dt", "B", "C"):
        suffix[k] = suffix[k].clone().requires_grad_()
    sy, ss = call(ssd_ref, suffix)
    expected = torch.autograd.grad(sy.sum() + ss.sum(), [suffix[k] for k in ("x", "dt", "B", "C")])
    for name, e in zip(("x", "dt", "B", "C"), expected, strict=True):
        got = a[name].grad[:, length - tail :].double()
        torch.testing.assert_close(got, e, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def _to_cpu(v):
    return v.detach().cpu().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v


def _detach(v, dtype=None):
    if not isinstance(v, torch.Tensor):
        return v
    v = v.detach()
    return v.to(dtype) if dtype is not None else v


# ---------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_model_layout_is_read_in_place(device):
    """x, B, C slices of one (B, L, conv_dim) tensor, dt a slice of the projection output."""
    a = make_inputs(2, 70, 4, 16, 1, 16, dtype=torch.float32, seed=15, layout="model",
                    device=device, requires_grad=True)  # fmt: skip
    assert not a["x"].is_contiguous() and a["x"].stride(-1) == 1
    y, s = call(ssd_scan, a)
    ref_y, ref_s = call(ssd_ref, as64({k: _to_cpu(v) for k, v in a.items()}))
    assert_values(y.cpu(), ref_y, torch.float32, "y")
    assert_values(s.cpu(), ref_s, torch.float32, "final state")
    gy, gs = upstream(ref_y, ref_s)
    got = grads_of(ssd_scan, a, gy, gs)
    assert_grads({k: v.cpu() for k, v in got.items()},
                 grads_of(ssd_ref, as64({k: _to_cpu(v) for k, v in a.items()}), gy.cpu(), gs.cpu()),
                 torch.float32)  # fmt: skip


def test_non_contiguous_last_dims_are_copied():
    a = make_inputs(2, 40, 2, 4, 1, 8, seed=16)
    b = dict(a)
    for name in ("x", "B", "C", "dt", "initial_state"):
        b[name] = torch.stack([a[name], a[name]], dim=-1)[..., 0]
        assert b[name].stride(-1) == 2
    y, s = call(ssd_scan, b)
    ry, rs = call(ssd_ref, a)
    assert_close(y, ry, VALUE_TOL[torch.float64], "y")
    assert_close(s, rs, VALUE_TOL[torch.float64], "final state")


def test_dt_in_float32_with_bfloat16_inputs():
    """dt may come in the compute dtype (the model's dt_limit path computes it in float32)."""
    a = make_inputs(2, 30, 2, 8, 1, 8, dtype=torch.bfloat16, seed=17)
    a32 = dict(a, dt=a["dt"].float())
    y, s = call(ssd_scan, a32)
    ry, rs = call(ssd_ref, a32)
    assert_close(y, ry, VALUE_TOL[torch.bfloat16], "y")
    assert_close(s, rs, VALUE_TOL[torch.float32], "final state")


def test_empty_sizes():
    for shape in [(0, 5, 2, 4, 1, 8), (2, 0, 2, 4, 1, 8), (2, 5, 2, 4, 1, 0), (2, 5, 2, 0, 1, 8)]:
        a = make_inputs(*shape, seed=18, requires_grad=True)
        y, s = call(ssd_scan, a)
        ry, rs = call(ssd_ref, a)
        assert y.shape == ry.shape and s.shape == rs.shape
        assert_close(y, ry, VALUE_TOL[torch.float64], f"y {shape}")
        assert_close(s, rs, VALUE_TOL[torch.float64], f"final state {shape}")
        (y.sum() + s.sum()).backward()
        for name in NAMES:
            assert a[name].grad is not None and a[name].grad.shape == a[name].shape, name


def test_nan_stays_where_the_reference_has_it():
    a = make_inputs(1, 80, 2, 4, 1, 8, seed=19, init=False)
    a["x"][0, 30, 1, 2] = float("nan")
    y, s = call(ssd_scan, a)
    ry, rs = call(ssd_ref, a)
    assert torch.equal(y.isnan(), ry.isnan())
    torch.testing.assert_close(y, ry, equal_nan=True)
    torch.testing.assert_close(s, rs, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# registration: opcheck, fakes, compile
# ---------------------------------------------------------------------------------------------

FAST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def opcheck_samples(device):
    out = []
    for i, (shape, dtype, kw, grad) in enumerate(
        [
            ((2, 9, 4, 4, 2, 8), torch.float32, {}, True),
            ((1, 300, 2, 4, 1, 3), torch.float64, dict(d_kind="hp", softplus=False), False),
            ((2, 5, 2, 3, 2, 4), torch.float64, dict(d_kind=None, bias=False, init=False), True),
            ((1, 1, 1, 1, 1, 1), torch.bfloat16, {}, False),
            ((2, 17, 2, 8, 1, 8), torch.float32, dict(layout="model"), True),
        ]
    ):
        a = make_inputs(*shape, dtype=dtype, device=device, seed=20 + i, requires_grad=grad, **kw)
        out.append(a)
    return out


def fwd_args(a):
    return (
        a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["dt_bias"], a["dt_softplus"],
        a["initial_state"],
    )  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fwd(device):
    for i, a in enumerate(opcheck_samples(device)):
        kwargs = {} if i < 1 else {"test_utils": FAST_UTILS}
        torch.library.opcheck(torch.ops.mblm.ssd_fwd.default, fwd_args(a), **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_bwd(device):
    for i, a in enumerate(opcheck_samples(device)):
        a = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
        y, s, ck = torch.ops.mblm.ssd_fwd(*fwd_args(a))
        gy, gs = upstream(y, s)
        args = (gy, gs if i % 2 == 0 else None, *fwd_args(a), ck)
        kwargs = {} if i < 1 else {"test_utils": FAST_UTILS}
        torch.library.opcheck(torch.ops.mblm.ssd_bwd.default, args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_update(device):
    for i, a in enumerate(opcheck_samples(device)):
        a = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
        b, _, h, p = a["x"].shape
        n = a["B"].shape[-1]
        cdt = torch.float64 if a["x"].dtype == torch.float64 else torch.float32
        state = torch.randn(b, h, p, n, dtype=cdt, device=device)
        args = (
            state, a["x"][:, 0], a["dt"][:, 0], a["A"], a["B"][:, 0], a["C"][:, 0], a["D"],
            a["dt_bias"], a["dt_softplus"],
        )  # fmt: skip
        kwargs = {} if i < 1 else {"test_utils": ("test_schema", "test_faketensor")}
        torch.library.opcheck(torch.ops.mblm.ssd_update.default, args, **kwargs)


def test_meta_shapes():
    x = torch.empty(3, 700, 4, 8, device="meta", dtype=torch.bfloat16)
    dt = torch.empty(3, 700, 4, device="meta", dtype=torch.bfloat16)
    A = torch.empty(4, device="meta")
    B = torch.empty(3, 700, 2, 16, device="meta", dtype=torch.bfloat16)
    y, s, ck = torch.ops.mblm.ssd_fwd(x, dt, A, B, B, None, None, True, None)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    assert s.shape == (3, 4, 8, 16) and s.dtype == torch.float32
    assert ck.shape == (3, 4, 3, 8, 16) and ck.dtype == torch.float32
    grads = torch.ops.mblm.ssd_bwd(y, s, x, dt, A, B, B, None, None, True, None, ck)
    assert [g.shape for g in grads[:5]] == [x.shape, dt.shape, A.shape, B.shape, B.shape]
    state = torch.empty(3, 4, 8, 16, device="meta")
    out = torch.ops.mblm.ssd_update(state, x[:, 0], dt[:, 0], A, B[:, 0], B[:, 0], None, None, True)
    assert out.shape == (3, 4, 8)


def test_compile_fullgraph_fwd_and_bwd():
    a = make_inputs(2, 70, 4, 8, 2, 8, dtype=torch.float32, seed=30, requires_grad=True)

    def step(x, dt, A, B, C, D, dt_bias, s0):
        y, s = ssd_scan(x, dt, A, B, C, D, dt_bias, True, s0)
        return (y * y).sum() + s.sum()

    leaves = [a[k] for k in NAMES]
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*leaves)
    grads_c = torch.autograd.grad(loss_c, leaves)
    loss_e = step(*leaves)
    grads_e = torch.autograd.grad(loss_e, leaves)
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=0)
    for name, gc, ge in zip(NAMES, grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_compile_dynamic_lengths():
    def fn(x, dt, A, B, C):
        return ssd_scan(x, dt, A, B, C, None, None, True, None)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for length in (5, 9, 300):
        a = make_inputs(1, length, 2, 4, 1, 4, dtype=torch.float32, seed=length)
        got = compiled(a["x"], a["dt"], a["A"], a["B"], a["C"])
        expected = fn(a["x"], a["dt"], a["A"], a["B"], a["C"])
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_device_without_kernel_runs_the_reference(monkeypatch):
    a = make_inputs(2, 20, 2, 4, 1, 8, seed=31)
    kernel = call(ssd_scan, a)
    monkeypatch.setattr(ssd, "_KERNEL_DEVICE_TYPES", frozenset())
    _common.warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="running the PyTorch reference"):
        fallback = call(ssd_scan, a)
    for k, f in zip(kernel, fallback, strict=True):
        assert_close(k, f, VALUE_TOL[torch.float64], "fallback")
    state = a["initial_state"].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = ssd_step_(state, a["x"][:, 0], a["dt"][:, 0], a["A"], a["B"][:, 0], a["C"][:, 0],
                      a["D"], a["dt_bias"], True)  # fmt: skip
    ry, rs = call(ssd_ref, dict(a, x=a["x"][:, :1], dt=a["dt"][:, :1], B=a["B"][:, :1],
                                C=a["C"][:, :1]))  # fmt: skip
    assert_close(y, ry[:, 0], VALUE_TOL[torch.float64], "step y")
    assert_close(state, rs, VALUE_TOL[torch.float64], "step state")


# ---------------------------------------------------------------------------------------------
# bad inputs: RuntimeError naming the argument
# ---------------------------------------------------------------------------------------------


def _good():
    return make_inputs(2, 9, 4, 4, 2, 8, dtype=torch.float32, seed=40)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: {**a, "x": a["x"][0]}, "x must have 4 dims"),
        (lambda a: {**a, "x": a["x"].int()}, "x must be float64/float32/float16/bfloat16"),
        (lambda a: {**a, "dt": a["dt"][:, :5]}, "dt must have shape \\(B, L, H\\)"),
        (lambda a: {**a, "dt": a["dt"].half()}, "dt must have x's dtype"),
        (lambda a: {**a, "A": a["A"][:3]}, "A must have shape \\(H,\\)"),
        (lambda a: {**a, "A": a["A"].double()}, "A must be float32"),
        (lambda a: {**a, "A": a["A"].clone().fill_(float("inf"))}, "A must be finite"),
        (lambda a: {**a, "A": a["A"].clone().fill_(float("nan"))}, "A must be finite"),
        (lambda a: {**a, "B": a["B"][:, :, :, :4]}, "C must have the shape of B"),
        (lambda a: {**a, "B": a["B"][:, :5]}, "B must have shape \\(B, L, G, N\\)"),
        (lambda a: {**a, "C": a["C"].double()}, "C has dtype"),
        (lambda a: {**a, "B": a["B"][0]}, "B must have shape \\(B, L, G, N\\)"),
        (
            lambda a: {**a, "B": torch.randn(2, 9, 3, 8), "C": torch.randn(2, 9, 3, 8)},
            "groups G = B.size\\(2\\) must divide the number of heads H = 4",
        ),
        (lambda a: {**a, "D": torch.randn(3)}, "D must have shape \\(H,\\)"),
        (lambda a: {**a, "D": torch.randn(4, 5)}, "D must have shape"),
        (lambda a: {**a, "D": torch.randn(4).half()}, "D must be float32"),
        (lambda a: {**a, "dt_bias": torch.randn(4, 1)}, "dt_bias must have shape \\(H,\\)"),
        (
            lambda a: {**a, "initial_state": torch.randn(2, 4, 4, 7)},
            "initial_state must have shape \\(B, H, P, N\\)",
        ),
        (lambda a: {**a, "initial_state": torch.randn(2, 4, 4, 8).int()}, "initial_state must be"),
    ],
)
def test_bad_inputs_fwd(mutate, match):
    a = mutate(_good())
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mblm.ssd_fwd(*fwd_args(a))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda g: {**g, "grad_y": g["grad_y"][:, :3]}, "grad_y must have the shape of x"),
        (lambda g: {**g, "grad_y": g["grad_y"].double()}, "grad_y has dtype"),
        (lambda g: {**g, "gs": g["gs"][:, :1]}, "grad_final_state must have shape"),
        (lambda g: {**g, "ck": g["ck"][:, :, :0]}, "checkpoints must have shape"),
        (lambda g: {**g, "ck": g["ck"].double()}, "checkpoints must be Float"),
    ],
)
def test_bad_inputs_bwd(mutate, match):
    a = _good()
    y, s, ck = torch.ops.mblm.ssd_fwd(*fwd_args(a))
    g = mutate(dict(grad_y=torch.randn_like(y), gs=torch.randn_like(s), ck=ck))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mblm.ssd_bwd(g["grad_y"], g["gs"], *fwd_args(a), g["ck"])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda u: {**u, "state": u["state"][:, :, :2]}, "state must have shape \\(B, H, P, N\\)"),
        (lambda u: {**u, "state": u["state"].double()}, "state must be Float or x's dtype"),
        (lambda u: {**u, "x": u["x"][None]}, "x must have 3 dims \\(B, H, P\\)"),
        (lambda u: {**u, "dt": u["dt"][:, :1]}, "dt must have shape \\(B, H\\)"),
        (lambda u: {**u, "B": u["B"][:1]}, "B must have shape \\(B, G, N\\)"),
        (lambda u: {**u, "C": u["C"][:, :, :3]}, "C must have the shape of B"),
    ],
)
def test_bad_inputs_update(mutate, match):
    a = _good()
    u = dict(
        state=torch.zeros(2, 4, 4, 8), x=a["x"][:, 0], dt=a["dt"][:, 0], B=a["B"][:, 0],
        C=a["C"][:, 0],
    )  # fmt: skip
    u = mutate(u)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mblm.ssd_update(
            u["state"], u["x"], u["dt"], a["A"], u["B"], u["C"], a["D"], a["dt_bias"], True
        )


@pytest.mark.cuda
def test_device_mix_is_rejected():
    a = _good()
    with pytest.raises(RuntimeError, match="B is on"):
        torch.ops.mblm.ssd_fwd(*fwd_args({**a, "x": a["x"].cuda()}))


# ---------------------------------------------------------------------------------------------
# fuzz
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_fuzz(seed):
    gen = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    h = pick([1, 2, 3, 4, 6])
    g = pick([d for d in range(1, h + 1) if h % d == 0])
    shape = (pick([0, 1, 2]), pick([1, 2, 7, 63, 64, 65, 257, 300]), h, pick([1, 3, 16, 17, 33]),
             g, pick([1, 5, 16, 20]))  # fmt: skip
    dtype = pick([torch.float32, torch.float64])
    a = make_inputs(
        *shape,
        dtype=dtype,
        seed=100 + seed,
        d_kind=pick([None, "h", "hp"]),
        bias=pick([True, False]),
        softplus=pick([True, False]),
        init=pick([True, False]),
        layout=pick(["contiguous", "model"]),
        requires_grad=True,
    )
    what = f"shape {shape} {dtype}"
    y, s = call(ssd_scan, a)
    ry, rs = call(ssd_ref, as64(a))
    assert_values(y, ry, dtype, f"y {what}")
    assert_values(s, rs, dtype, f"final state {what}")
    gy, gs = upstream(ry, rs, seed)
    got = grads_of(ssd_scan, a, gy, gs)
    assert_grads(got, grads_of(ssd_ref, as64(a), gy, gs), dtype, what)


# ---------------------------------------------------------------------------------------------
# CUDA (run by a GPU session)
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape", [(2, 1, 2, 4, 1, 8), (2, 300, 4, 16, 2, 16), (1, 130, 4, 64, 1, 128)]
)
def test_cuda_values_and_grads(shape, dtype):
    cpu = make_inputs(*shape, dtype=torch.float32, seed=50, d_kind="hp")
    cuda = {
        k: (v.to("cuda", dtype if k in ("x", "B", "C", "dt") else v.dtype).requires_grad_()
            if isinstance(v, torch.Tensor) else v)
        for k, v in cpu.items()
    }  # fmt: skip
    cpu = {
        k: (v.to(dtype if k in ("x", "B", "C", "dt") else v.dtype).float().requires_grad_()
            if isinstance(v, torch.Tensor) else v)
        for k, v in cpu.items()
    }  # fmt: skip
    y, s = call(ssd_scan, cuda)
    ry, rs = call(ssd_ref, cpu)
    tol = VALUE_TOL[torch.float32] if dtype == torch.float32 else VALUE_TOL[torch.bfloat16]
    assert_close(y.float().cpu(), ry, tol, "y")
    assert_close(s.cpu(), rs, VALUE_TOL[torch.float32] if dtype == torch.float32 else tol, "state")
    gy, gs = upstream(ry, rs)
    got = grads_of(ssd_scan, cuda, gy.to("cuda", y.dtype), gs.cuda())
    expected = grads_of(ssd_ref, cpu, gy, gs)
    for name, g in got.items():
        gt = grad_tol(torch.float32, name) if dtype == torch.float32 else GRAD_TOL[torch.bfloat16]
        scale = max(expected[name].abs().max().item(), 1.0)
        assert_close(g.float().cpu() / scale, expected[name].float() / scale, gt, f"grad {name}")


@pytest.mark.cuda
def test_cuda_steps_equal_the_scan():
    a = make_inputs(2, 8, 4, 16, 2, 16, dtype=torch.float32, device="cuda", seed=51)
    y, s = call(ssd_scan, a)
    state = a["initial_state"].clone()
    ys = [
        ssd_step_(
            state,
            a["x"][:, t],
            a["dt"][:, t],
            a["A"],
            a["B"][:, t],
            a["C"][:, t],
            a["D"],
            a["dt_bias"],
            True,
        )  # fmt: skip
        for t in range(8)
    ]
    assert_close(torch.stack(ys, 1), y, VALUE_TOL[torch.float32], "y")
    assert_close(state, s, VALUE_TOL[torch.float32], "state")
