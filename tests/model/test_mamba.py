"""Mamba stages: Mamba1 (mambapy tree) against goldens of mambapy, Mamba2 (mamba_ssm tree) against
independent formulations, the Mamba primitives' references against naive loops, the layout
detection helper and the MambaBlock config."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from tolerances import GRAD_TOL, VALUE_TOL

from mblm.model.mamba1 import Mamba, MambaConfig
from mblm.model.mamba2 import Mamba2, Mamba2Mixer
from mblm.ops.reference import causal_conv1d_ref, selective_scan_ref, ssd_ref

GOLDENS = os.path.join(os.path.dirname(__file__), "..", "parity", "goldens_mamba")
MAMBAPY_CASES = ["small", "wide_state", "conv1_rank2"]
F64 = VALUE_TOL[torch.float64]


def _golden(name: str) -> dict:
    return torch.load(os.path.join(GOLDENS, f"mambapy_{name}.pt"), weights_only=True)


# ---------------------------------------------------------------------------------------------
# Mamba1 vs mambapy 1.2.0 (goldens from tests/parity/make_mamba_goldens.py)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MAMBAPY_CASES)
def test_mamba1_seeded_init_equals_mambapy(name):
    g = _golden(name)
    torch.manual_seed(g["seed"])
    sd = Mamba(MambaConfig(**g["config"])).state_dict()
    assert list(sd) == list(g["init_state_dict"])
    for key, ref in g["init_state_dict"].items():
        assert sd[key].shape == ref.shape, key
        assert torch.equal(sd[key], ref), f"{key} differs from mambapy's seeded init"


@pytest.mark.parametrize("name", MAMBAPY_CASES)
def test_mamba1_matches_mambapy_outputs_and_grads(name):
    g = _golden(name)
    model = Mamba(MambaConfig(**g["config"]))
    model.load_state_dict(g["state_dict"], strict=True)
    x = g["input"].clone().requires_grad_(True)
    y = model(x)
    torch.testing.assert_close(y, g["output"], **VALUE_TOL[torch.float32])
    (y * g["upstream"]).sum().backward()
    torch.testing.assert_close(x.grad, g["input_grad"], **GRAD_TOL[torch.float32])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g["grads"][n], **GRAD_TOL[torch.float32], msg=n)


def test_mamba1_keys_and_shapes():
    model = Mamba(MambaConfig(d_model=64, n_layers=1, d_state=16, d_conv=4, expand_factor=2))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "layers.0.mixer.A_log": [128, 16],
        "layers.0.mixer.D": [128],
        "layers.0.mixer.in_proj.weight": [256, 64],
        "layers.0.mixer.conv1d.weight": [128, 1, 4],
        "layers.0.mixer.conv1d.bias": [128],
        "layers.0.mixer.x_proj.weight": [36, 128],
        "layers.0.mixer.dt_proj.weight": [128, 4],
        "layers.0.mixer.dt_proj.bias": [128],
        "layers.0.mixer.out_proj.weight": [64, 128],
        "layers.0.norm.weight": [64],
    }


def _randomize_(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_mamba1_step_and_chunks_equal_full_forward():
    torch.manual_seed(0)
    model = Mamba(MambaConfig(d_model=12, n_layers=2, d_state=3, d_conv=3, expand_factor=2))
    _randomize_(model, 1)
    x = torch.randn(2, 9, 12)
    with torch.no_grad():
        full = model(x)
        caches = model.init_caches(2)
        steps = []
        for t in range(x.shape[1]):
            y, caches = model.step(x[:, t], caches)
            steps.append(y)
        torch.testing.assert_close(torch.stack(steps, 1), full, **VALUE_TOL[torch.float32])
        a, state = model.forward_with_state(x[:, :5])
        b, _ = model.forward_with_state(x[:, 5:], state)
        torch.testing.assert_close(torch.cat((a, b), 1), full, **VALUE_TOL[torch.float32])
        # one mixer, resumed from its state after a prefix of 4 steps
        mixer = model.layers[0].mixer
        u = model.layers[0].norm(x)
        ref = mixer(u)
        a, conv, ssm = mixer.forward_with_state(u[:, :4], None, None)
        b, _, _ = mixer.forward_with_state(u[:, 4:], conv, ssm)
        torch.testing.assert_close(torch.cat((a, b), 1), ref, **VALUE_TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# Mamba2 (mamba_ssm 2.2.x tree)
# ---------------------------------------------------------------------------------------------


def test_mamba2_keys_and_shapes_example_b():
    """semantics §3.4 Example B, stage 0 (D=64, d_state=16, d_conv=4, expand=2, headdim=16)."""
    model = Mamba2Mixer(d_model=64, n_layers=2, d_state=16, d_conv=4, headdim=16, expand=2)
    layer = {
        "norm.weight": [64],
        "mixer.dt_bias": [8],
        "mixer.A_log": [8],
        "mixer.D": [8],
        "mixer.in_proj.weight": [296, 64],
        "mixer.conv1d.weight": [160, 1, 4],
        "mixer.conv1d.bias": [160],
        "mixer.norm.weight": [128],
        "mixer.out_proj.weight": [64, 128],
    }
    expected = [(f"layers.{i}.{k}", s) for i in range(2) for k, s in layer.items()]
    expected.append(("norm_f.weight", [64]))
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == expected


def test_mamba2_rejects_headdim_not_dividing_inner_width():
    with pytest.raises(ValueError, match="headdim"):
        Mamba2Mixer(d_model=10, n_layers=1, d_state=4, d_conv=4, headdim=3, expand=2)


def test_mamba2_init_statistics():
    n_layers, d, expand, headdim = 4, 64, 2, 4
    torch.manual_seed(0)
    model = Mamba2Mixer(d_model=d, n_layers=n_layers, d_state=8, d_conv=4, headdim=headdim,
                        expand=expand)  # fmt: skip
    di = expand * d
    mixers = [layer.mixer for layer in model.layers]
    a = torch.cat([torch.exp(m.A_log) for m in mixers])
    assert a.min() >= 1.0 and a.max() <= 16.0 and a.max() - a.min() > 10.0
    dt = torch.cat([F.softplus(m.dt_bias) for m in mixers])
    assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    # log-uniform: the median of log(dt) is near the middle of [ln 0.001, ln 0.1]
    assert abs(dt.log().median() - math.log(0.01)) < 0.6
    for m in mixers:
        assert torch.equal(m.D, torch.ones(di // headdim))
        assert torch.equal(m.norm.weight, torch.ones(di))
        # out_proj: default Linear bound 1/sqrt(Di), divided by sqrt(n_layers)
        bound = 1 / math.sqrt(di) / math.sqrt(n_layers)
        w = m.out_proj.weight
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
        assert abs(w.std() - bound / math.sqrt(3)) < 0.05 * bound
        assert m.in_proj.weight.abs().max() <= 1 / math.sqrt(d)
        assert m.in_proj.weight.abs().max() > 0.95 / math.sqrt(d)
    for layer in model.layers:
        assert torch.equal(layer.norm.weight, torch.ones(d))
    assert torch.equal(model.norm_f.weight, torch.ones(d))


def test_mamba2_init_rng_order():
    """Replays mamba_ssm's draw order by hand: per layer in_proj, conv1d, dt, A, out_proj; then
    ``_init_weights`` redraws every out_proj (layer order) and rescales it."""
    d, n_layers, n, k, expand, headdim = 16, 2, 4, 3, 2, 8
    di, h = expand * d, expand * d // headdim
    torch.manual_seed(7)
    model = Mamba2Mixer(d_model=d, n_layers=n_layers, d_state=n, d_conv=k, headdim=headdim,
                        expand=expand)  # fmt: skip
    torch.manual_seed(7)
    expected = []
    for _ in range(n_layers):
        in_proj = torch.nn.Linear(d, 2 * di + 2 * n + h, bias=False)
        conv = torch.nn.Conv1d(di + 2 * n, di + 2 * n, k, groups=di + 2 * n, padding=k - 1)
        dt = torch.exp(torch.rand(h) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        dt = dt.clamp(min=1e-4)
        a = torch.empty(h).uniform_(1, 16)
        torch.nn.Linear(di, d, bias=False)  # out_proj, drawn then redrawn below
        expected.append(
            {
                "mixer.in_proj.weight": in_proj.weight,
                "mixer.conv1d.weight": conv.weight,
                "mixer.conv1d.bias": conv.bias,
                "mixer.dt_bias": dt + torch.log(-torch.expm1(-dt)),
                "mixer.A_log": torch.log(a),
            }
        )
    for i in range(n_layers):
        w = torch.empty(d, di)
        torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        expected[i]["mixer.out_proj.weight"] = w / math.sqrt(n_layers)
    sd = model.state_dict()
    for i, layer in enumerate(expected):
        for key, value in layer.items():
            torch.testing.assert_close(sd[f"layers.{i}.{key}"], value, rtol=0, atol=0, msg=key)


def _chunked_ssd(x, dt, a, b, c, d_skip, chunk, initial_state=None):
    """State-space duality (Dao & Gu 2024, §6-7), written independently of ``ssd_ref``: within a
    chunk, y = (L ∘ C Bᵀ) (dt x) with L[i, j] = exp(sum_{j<s<=i} dt_s a) (the quadratic, attention-
    like form); across chunks, states are passed by the linear recurrence.

    x: (b, l, h, p); dt: (b, l, h) after softplus; a: (h,); b, c: (b, l, h, n) (per head);
    d_skip: (h,). Returns y (b, l, h, p) and the final state (b, h, p, n). float64."""
    bsz, length, heads, p = x.shape
    nst = b.shape[-1]
    pad = -length % chunk
    x, dt, b, c = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, b, c))
    nchunks = x.shape[1] // chunk
    xs, dts, bs, cs = (t.reshape(bsz, nchunks, chunk, *t.shape[2:]) for t in (x, dt, b, c))
    cum = torch.cumsum(dts * a, dim=2)  # (b, nc, T, h)
    seg = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # (b, nc, i, j, h)
    causal = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    decay = torch.exp(seg.masked_fill(~causal[None, None, :, :, None], float("-inf")))
    scores = torch.einsum("bzihn,bzjhn->bzijh", cs, bs) * decay
    y_diag = torch.einsum("bzijh,bzjh,bzjhp->bzihp", scores, dts, xs)
    to_end = torch.exp(cum[:, :, -1:, :] - cum)  # decay from step j to the chunk's end
    chunk_states = torch.einsum("bzjh,bzjh,bzjhp,bzjhn->bzhpn", to_end, dts, xs, bs)
    state = x.new_zeros(bsz, heads, p, nst) if initial_state is None else initial_state
    starts = []
    for z in range(nchunks):
        starts.append(state)
        state = torch.exp(cum[:, z, -1])[:, :, None, None] * state + chunk_states[:, z]
    start = torch.stack(starts, 1)  # state entering each chunk
    y_off = torch.einsum("bzihn,bzhpn,bzih->bzihp", cs, start, torch.exp(cum))
    y = (y_diag + y_off).reshape(bsz, nchunks * chunk, heads, p)[:, :length]
    return y + d_skip[:, None] * x[:, :length], state


@pytest.mark.parametrize("groups", [1, 2])
def test_ssd_ref_matches_chunked_duality_form(groups):
    gen = torch.Generator().manual_seed(groups)
    bsz, length, heads, p, n = 2, 11, 4, 3, 5
    x = torch.randn(bsz, length, heads, p, generator=gen, dtype=torch.float64)
    dt = torch.randn(bsz, length, heads, generator=gen, dtype=torch.float64)
    a = -torch.rand(heads, generator=gen, dtype=torch.float64) * 2
    b = torch.randn(bsz, length, groups, n, generator=gen, dtype=torch.float64)
    c = torch.randn(bsz, length, groups, n, generator=gen, dtype=torch.float64)
    d_skip = torch.randn(heads, generator=gen, dtype=torch.float64)
    dt_bias = torch.randn(heads, generator=gen, dtype=torch.float64)
    s0 = torch.randn(bsz, heads, p, n, generator=gen, dtype=torch.float64)
    y, s = ssd_ref(x, dt, a, b, c, d_skip, dt_bias, True, s0)
    bh = b.repeat_interleave(heads // groups, 2)
    ch = c.repeat_interleave(heads // groups, 2)
    dts = F.softplus(dt + dt_bias)
    for chunk in (1, 4, 16):
        y2, s2 = _chunked_ssd(x, dts, a, bh, ch, d_skip, chunk, s0)
        torch.testing.assert_close(y, y2, **F64)
        torch.testing.assert_close(s, s2, **F64)


def _mamba2_forward_independent(mixer, u, chunk):
    """One Mamba2 layer written out with torch's conv1d and the chunked SSD form."""
    bsz, length, _ = u.shape
    di, h, p, n, k = mixer.d_inner, mixer.nheads, mixer.headdim, mixer.d_state, mixer.d_conv
    z, xbc, dt = torch.split(mixer.in_proj(u), [di, di + 2 * n, h], dim=-1)
    xbc = F.conv1d(xbc.transpose(1, 2), mixer.conv1d.weight, mixer.conv1d.bias, padding=k - 1,
                   groups=di + 2 * n)[..., :length]  # fmt: skip
    x, b, c = torch.split(F.silu(xbc).transpose(1, 2), [di, n, n], dim=-1)
    y, _ = _chunked_ssd(
        x.reshape(bsz, length, h, p),
        F.softplus(dt + mixer.dt_bias),
        -torch.exp(mixer.A_log),
        b[:, :, None].expand(bsz, length, h, n),
        c[:, :, None].expand(bsz, length, h, n),
        mixer.D,
        chunk,
    )
    g = y.reshape(bsz, length, di) * F.silu(z)
    g = g * torch.rsqrt(g.square().mean(-1, keepdim=True) + 1e-5) * mixer.norm.weight
    return mixer.out_proj(g)


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def test_mamba2_forward_matches_independent_formulation():
    torch.manual_seed(0)
    model = Mamba2Mixer(d_model=8, n_layers=2, d_state=4, d_conv=3, headdim=4, expand=2).double()
    _randomize_(model, 2)
    u = torch.randn(3, 13, 8, dtype=torch.float64)
    out = model(u)
    h = u
    for layer in model.layers:  # x_{l+1} = x_l + Mamba2_l(RMSNorm_l(x_l)); out = RMSNorm_f(x_L)
        h = h + _mamba2_forward_independent(layer.mixer, _rms(h, layer.norm.weight), chunk=4)
    torch.testing.assert_close(out, _rms(h, model.norm_f.weight), **F64)


def test_mamba2_step_and_chunks_equal_full_forward():
    torch.manual_seed(0)
    model = Mamba2Mixer(d_model=8, n_layers=2, d_state=4, d_conv=4, headdim=4, expand=2)
    _randomize_(model, 3)
    x = torch.randn(2, 10, 8)
    with torch.no_grad():
        full = model(x)
        cache = model.allocate_inference_cache(2, 10)
        steps = []
        for t in range(10):
            y, cache = model.step(x[:, t : t + 1], cache)
            steps.append(y)
        torch.testing.assert_close(torch.cat(steps, 1), full, **VALUE_TOL[torch.float32])
        a, state = model.forward_with_state(x[:, :1])
        b, state = model.forward_with_state(x[:, 1:7], state)
        c, _ = model.forward_with_state(x[:, 7:], state)
        torch.testing.assert_close(torch.cat((a, b, c), 1), full, **VALUE_TOL[torch.float32])
        mixer = model.layers[0].mixer
        ref = mixer(x)
        a, conv, ssm = mixer.forward_with_state(x[:, :3], None, None)
        b, _, _ = mixer.forward_with_state(x[:, 3:], conv, ssm)
        torch.testing.assert_close(torch.cat((a, b), 1), ref, **VALUE_TOL[torch.float32])


@pytest.mark.parametrize("variant", ["mamba1", "mamba2", "mamba2_groups_dtlimit"])
def test_single_position_steps_run_the_update_ops(variant, monkeypatch):
    """forward_with_state of one position from a state (cached decoding) runs conv1d_update and
    scan_update / ssd_update, and equals the full forward."""
    torch.manual_seed(0)
    layers = 2
    if variant == "mamba1":
        model = Mamba(MambaConfig(d_model=12, n_layers=2, d_state=3, d_conv=3, expand_factor=2))
        update, width = "scan_update", 12
    elif variant == "mamba2":
        model = Mamba2Mixer(d_model=8, n_layers=2, d_state=4, d_conv=4, headdim=4, expand=2)
        update, width = "ssd_update", 8
    else:  # one mixer with groups, a dt limit and a per-channel D
        model = Mamba2(
            8, d_state=4, d_conv=4, expand=2, headdim=4, ngroups=2, dt_limit=(0.01, 0.5),
            D_has_hdim=True,
        )  # fmt: skip
        update, width, layers = "ssd_update", 8, 1
    _randomize_(model, 5)
    calls = {"conv1d_update": 0, update: 0}
    for name in calls:
        op = getattr(torch.ops.mblm, name).default

        def spy(*args, _op=op, _name=name):
            calls[_name] += 1
            return _op(*args)

        monkeypatch.setattr(getattr(torch.ops.mblm, name), "default", spy)

    def run(x, state):
        if layers == 1:
            y, conv, ssm = model.forward_with_state(x, *(state or (None, None)))
            return y, (conv, ssm)
        return model.forward_with_state(x, state)

    x = torch.randn(3, 7, width)
    with torch.no_grad():
        full = model(x)
        y, state = run(x[:, :2], None)
        outs = [y]
        for t in range(2, 7):
            y, state = run(x[:, t : t + 1], state)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, **VALUE_TOL[torch.float32])
    assert calls == {"conv1d_update": 5 * layers, update: 5 * layers}


def test_mamba2_dropout_only_in_training():
    torch.manual_seed(0)
    drop = Mamba2Mixer(d_model=8, n_layers=1, d_state=4, d_conv=4, headdim=4, expand=2, dropout=0.5)
    plain = Mamba2Mixer(d_model=8, n_layers=1, d_state=4, d_conv=4, headdim=4, expand=2)
    plain.load_state_dict(drop.state_dict())
    x = torch.randn(2, 6, 8)
    drop.eval()
    torch.testing.assert_close(drop(x), plain(x), rtol=0, atol=0)
    drop.train()
    assert not torch.allclose(drop(x), plain(x))


def test_mamba2_mixer_rejects_mamba_ssm_arguments():
    model = Mamba2Mixer(d_model=8, n_layers=1, d_state=4, d_conv=4, headdim=4, expand=2)
    with pytest.raises(TypeError, match="inference_params"):
        model(torch.randn(1, 3, 8), inference_params=object())
    with pytest.raises(TypeError, match="seq_idx"):
        model(torch.randn(1, 3, 8), seq_idx=torch.zeros(1, 3))


def test_mamba2_gradients_flow_to_every_parameter():
    torch.manual_seed(0)
    model = Mamba2Mixer(d_model=8, n_layers=2, d_state=4, d_conv=4, headdim=4, expand=2)
    model(torch.randn(2, 5, 8)).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------
# references of the primitives
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("activation", [True, False])
def test_causal_conv1d_ref_matches_torch_conv1d(width, with_bias, activation):
    gen = torch.Generator().manual_seed(width)
    bsz, ch, length = 2, 5, 9
    x = torch.randn(bsz, ch, length, generator=gen, dtype=torch.float64)
    w = torch.randn(ch, width, generator=gen, dtype=torch.float64)
    bias = torch.randn(ch, generator=gen, dtype=torch.float64) if with_bias else None
    y, final = causal_conv1d_ref(x, w, bias, None, activation)
    ref = F.conv1d(x, w[:, None], bias, padding=width - 1, groups=ch)[..., :length]
    torch.testing.assert_close(y, F.silu(ref) if activation else ref, **F64)
    torch.testing.assert_close(final, x[..., length - (width - 1) :], **F64)
    # continuing from a state equals running the concatenation
    y1, s1 = causal_conv1d_ref(x[..., :4], w, bias, None, activation)
    y2, s2 = causal_conv1d_ref(x[..., 4:], w, bias, s1, activation)
    torch.testing.assert_close(torch.cat((y1, y2), -1), y, **F64)
    torch.testing.assert_close(s2, final, **F64)


def test_causal_conv1d_ref_short_input_and_dtype():
    x = torch.randn(1, 3, 2, dtype=torch.bfloat16)
    w = torch.randn(3, 4)
    y, final = causal_conv1d_ref(x, w, None, None, False)
    assert y.dtype == torch.bfloat16 and final.shape == (1, 3, 3)
    ref = F.conv1d(x.float(), w[:, None], None, padding=3, groups=3)[..., :2]
    torch.testing.assert_close(y.float(), ref, **VALUE_TOL[torch.bfloat16])
    torch.testing.assert_close(final[..., 1:], x)
    assert torch.equal(final[..., 0], torch.zeros(1, 3, dtype=torch.bfloat16))


def _naive_selective_scan(u, delta, a, b, c, d, z, delta_bias, softplus, h0):
    bsz, ch, length = u.shape
    y = torch.zeros_like(u)
    last = torch.zeros(bsz, ch, a.shape[1], dtype=u.dtype)
    for i in range(bsz):
        for k in range(ch):
            h = h0[i, k].clone() if h0 is not None else torch.zeros(a.shape[1], dtype=u.dtype)
            for t in range(length):
                dt = delta[i, k, t] + (delta_bias[k] if delta_bias is not None else 0)
                dt = math.log1p(math.exp(dt)) if softplus else dt
                h = torch.exp(dt * a[k]) * h + dt * b[i, :, t] * u[i, k, t]
                out = (h * c[i, :, t]).sum() + (d[k] * u[i, k, t] if d is not None else 0)
                if z is not None:
                    out = out * F.silu(z[i, k, t])
                y[i, k, t] = out
            last[i, k] = h
    return y, last


@pytest.mark.parametrize("full", [True, False])
def test_selective_scan_ref_matches_naive_loop(full):
    gen = torch.Generator().manual_seed(int(full))
    bsz, ch, n, length = 2, 3, 4, 7

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    u, delta = r(bsz, ch, length), r(bsz, ch, length)
    a = -torch.rand(ch, n, generator=gen, dtype=torch.float64)
    b, c = r(bsz, n, length), r(bsz, n, length)
    d, z, bias, h0 = (r(ch), r(bsz, ch, length), r(ch), r(bsz, ch, n)) if full else (None,) * 4
    if not full:
        delta = delta.abs()
    y, last = selective_scan_ref(u, delta, a, b, c, d, z, bias, full, h0)
    y2, last2 = _naive_selective_scan(u, delta, a, b, c, d, z, bias, full, h0)
    torch.testing.assert_close(y, y2, **F64)
    torch.testing.assert_close(last, last2, **F64)
    # resuming from the state after 3 steps equals the full run
    ya, sa = selective_scan_ref(u[..., :3], delta[..., :3], a, b[..., :3], c[..., :3], d,
                                None if z is None else z[..., :3], bias, full, h0)  # fmt: skip
    yb, sb = selective_scan_ref(u[..., 3:], delta[..., 3:], a, b[..., 3:], c[..., 3:], d,
                                None if z is None else z[..., 3:], bias, full, sa)  # fmt: skip
    torch.testing.assert_close(torch.cat((ya, yb), -1), y, **F64)
    torch.testing.assert_close(sb, last, **F64)


def test_selective_scan_ref_dtypes():
    u = torch.randn(1, 2, 3, dtype=torch.bfloat16)
    y, last = selective_scan_ref(u, u.abs(), -torch.ones(2, 4), torch.randn(1, 4, 3),
                                 torch.randn(1, 4, 3))  # fmt: skip
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32 and last.shape == (1, 2, 4)


def test_ssd_ref_single_step_formula():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 2, 3, generator=gen, dtype=torch.float64)
    dt = torch.rand(1, 1, 2, generator=gen, dtype=torch.float64)
    a = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    b = torch.randn(1, 1, 1, 4, generator=gen, dtype=torch.float64)
    c = torch.randn(1, 1, 1, 4, generator=gen, dtype=torch.float64)
    s0 = torch.randn(1, 2, 3, 4, generator=gen, dtype=torch.float64)
    d = torch.tensor([0.5, 2.0], dtype=torch.float64)
    y, s = ssd_ref(x, dt, a, b, c, d, None, False, s0)
    for hh in range(2):
        want_s = math.exp(dt[0, 0, hh] * a[hh]) * s0[0, hh] + dt[0, 0, hh] * torch.outer(
            x[0, 0, hh], b[0, 0, 0]
        )
        torch.testing.assert_close(s[0, hh], want_s, **F64)
        torch.testing.assert_close(y[0, 0, hh], want_s @ c[0, 0, 0] + d[hh] * x[0, 0, hh], **F64)


# ---------------------------------------------------------------------------------------------
# layout detection and the MambaBlock config
# ---------------------------------------------------------------------------------------------


def _prefixed(module: torch.nn.Module, prefix: str) -> dict:
    return {prefix + k: v for k, v in module.state_dict().items()}


def test_detect_mamba_variant():
    from mblm.model.mamba import check_mamba_variant, detect_mamba_variant

    m1 = Mamba(MambaConfig(d_model=8, n_layers=2, d_state=2))
    m2 = Mamba2Mixer(d_model=8, n_layers=2, d_state=2, d_conv=4, headdim=4, expand=2)
    sd = {
        **_prefixed(m1, "stage_models.0."),
        **_prefixed(m2, "stage_models.1."),
        "stage_models.2.layers.0.0.norm.g": torch.ones(8),
        "to_logits.weight": torch.ones(2, 8),
    }
    assert detect_mamba_variant(sd, "stage_models.0.") == "mamba1"
    assert detect_mamba_variant(sd, "stage_models.1.") == "mamba2"
    assert detect_mamba_variant(sd, "stage_models.2.") is None
    assert detect_mamba_variant(m1.state_dict()) == "mamba1"
    assert detect_mamba_variant(m2.state_dict()) == "mamba2"
    assert detect_mamba_variant({}) is None
    with pytest.raises(ValueError, match="both Mamba layouts"):
        detect_mamba_variant({**m1.state_dict(), **m2.state_dict()})

    check_mamba_variant(sd, "stage_models.0.", "mamba1")
    check_mamba_variant(sd, "stage_models.2.", "mamba2")
    with pytest.raises(ValueError, match="mambapy Mamba1 layout.*block_type='mamba2'.*mamba1"):
        check_mamba_variant(sd, "stage_models.0.", "mamba2", stage=0)
    with pytest.raises(ValueError, match="stage 1"):
        check_mamba_variant(sd, "stage_models.1.", "mamba1", stage=1)


def test_check_mamba_stages():
    from mblm.model.mamba import MambaBlock, check_mamba_stages

    m1 = Mamba(MambaConfig(d_model=8, n_layers=1, d_state=2))
    m2 = Mamba2Mixer(d_model=8, n_layers=1, d_state=2, d_conv=4, headdim=4, expand=2)
    sd = {**_prefixed(m1, "mblm.stage_models.0."), **_prefixed(m2, "mblm.stage_models.1.")}
    kw = dict(d_state=2, d_conv=4, expand=2, headdim=4)
    b1, b2 = MambaBlock(**kw, block_type="mamba1"), MambaBlock(**kw)
    check_mamba_stages([b1, b2], sd, prefix="mblm.")
    with pytest.raises(ValueError, match="stage 1 .*block_type='mamba1'"):
        check_mamba_stages([b1, b1], sd, prefix="mblm.")
    with pytest.raises(ValueError, match="stage 0 "):
        check_mamba_stages([b2, b2], sd, prefix="mblm.")


def test_mamba2_checkpoint_into_mamba1_stage_is_refused_on_load():
    from mblm.model.mamba import MambaBlock

    kw = dict(d_state=2, d_conv=4, expand=2, headdim=4)
    m2 = MambaBlock(**kw).to_model(8, 1)
    m1 = MambaBlock(**kw, block_type="mamba1").to_model(8, 1)
    with pytest.raises(ValueError, match="mamba_ssm Mamba2 layout.*block_type: mamba2"):
        m1.load_state_dict(m2.state_dict())
    m2.load_state_dict(MambaBlock(**kw).to_model(8, 1).state_dict())  # same layout loads


def test_mamba_block_config():
    from pydantic import ValidationError

    from mblm.model.mamba import MambaBlock

    block = MambaBlock(d_state=4, d_conv=3, expand=2, headdim=4)
    assert block.block_type == "mamba2" and block.dropout == 0.0 and block.pos_emb_type is None
    assert isinstance(block.to_model(8, 2), Mamba2Mixer)
    m1 = MambaBlock(d_state=4, d_conv=3, expand=2, headdim=4, block_type="mamba1")
    model = m1.to_model(8, 2)
    assert isinstance(model, Mamba) and len(model.layers) == 2
    assert model.config.d_state == 4 and model.config.d_conv == 3
    assert model.config.expand_factor == 2
    dumped = m1.model_dump()
    assert dumped["block_type"] == "mamba1" and MambaBlock.model_validate(dumped) == m1
    with pytest.raises(ValidationError, match="This model is a mamba block"):
        MambaBlock(d_state=4, d_conv=3, expand=2, headdim=4, block_type="transformer")
    with pytest.raises(ValidationError, match="Unknown Mamba variant block_type='mamba3'"):
        MambaBlock(d_state=4, d_conv=3, expand=2, headdim=4, block_type="mamba3")
    with pytest.raises(ValidationError, match="pos_emb_type"):
        MambaBlock(d_state=4, d_conv=3, expand=2, headdim=4, pos_emb_type="learned")
    with pytest.raises(ValidationError, match="d_state"):
        MambaBlock.model_validate({"d_conv": 3, "expand": 2, "headdim": 4})


def test_mamba_shim_exports_both_variants():
    from mblm.model import mamba_shim

    assert mamba_shim.__all__ == ["Mamba1", "Mamba1Config", "Mamba2Mixer"]
    assert mamba_shim.Mamba1 is Mamba and mamba_shim.Mamba1Config is MambaConfig
    assert mamba_shim.Mamba2Mixer is Mamba2Mixer
