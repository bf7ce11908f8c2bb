"""mblm's Mamba2 layer against the real mamba_ssm ``Mamba2`` module with identical weights (issue 4).

mamba_ssm comes from benchmarks/_mamba_ssm.py: an installed mamba_ssm, else its source
($MBLM_MAMBA_SSM_SRC or build/mamba_ssm_src), which needs triton but not mamba_ssm's compiled
extension; every test here is skipped when it is not found. On CUDA mamba_ssm runs
``Mamba2(use_mem_eff_path=False)``: its Triton SSD scan, Triton gated RMSNorm and nn.Conv1d; mblm
runs its CUDA conv1d and SSD kernels. The CPU case runs mamba_ssm's module on its own
pure-PyTorch references (``_mamba_ssm.torch_reference_kernels``), where mblm runs its CPU kernels.

Everything is float32 with TF32 off: Triton's ``tl.dot`` on float32 defaults to TF32 (10-bit
mantissa) on NVIDIA GPUs, which alone would move mamba_ssm's outputs by ~1e-3 relative, so
``TRITON_F32_DEFAULT=ieee`` is set while these tests run (a cache-invalidating Triton setting:
kernels compiled under another value are not reused), and cuDNN/cuBLAS TF32 is disabled.
Outputs agree within 1e-4 (absolute, on outputs of magnitude ~1), gradients of the input and
of every parameter within 1e-3 relative to their largest entry.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mblm.model.mamba2 import Mamba2
from mblm.ops.ssd import ssd_scan

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _mamba_ssm  # noqa: E402

sys.path.pop(0)

OUT_ATOL = 1e-4
GRAD_RTOL = 1e-3


@pytest.fixture(scope="module")
def mamba_ssm():
    found, why = _mamba_ssm.load_mamba_ssm()
    if found is None:
        pytest.skip(f"mamba_ssm not found: {why}")
    return found


@pytest.fixture
def exact_float32(monkeypatch):
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _layers(mamba_ssm, device: str, **kwargs) -> tuple[Mamba2, torch.nn.Module]:
    """(mblm's layer, mamba_ssm's layer) with mamba_ssm's freshly initialised weights in both."""
    torch.manual_seed(0)
    theirs = mamba_ssm.Mamba2(**kwargs, use_mem_eff_path=False, layer_idx=0)
    ours = Mamba2(**kwargs, layer_idx=0)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.to(device), theirs.to(device)


def _max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _run(layer, u, upstream, reference: bool):
    context = _mamba_ssm.torch_reference_kernels() if reference else contextlib.nullcontext()
    u = u.detach().clone().requires_grad_()
    with context:
        out = layer(u)
        (out * upstream).sum().backward()
    grads = {"input": u.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    return out.detach(), grads


CASES = [
    pytest.param("cuda", 1, 1000, marks=pytest.mark.cuda, id="cuda-g1-L1000"),
    pytest.param("cuda", 2, 512, marks=pytest.mark.cuda, id="cuda-g2-L512"),
    pytest.param("cpu", 2, 200, id="cpu-torch-refs-g2-L200"),
]


@pytest.mark.parametrize("device, ngroups, length", CASES)
def test_layer_matches_mamba_ssm(mamba_ssm, exact_float32, device, ngroups, length):
    """One layer, forward and backward, mblm vs mamba_ssm on the same weights and input.
    Lengths that are not multiples of the chunk size exercise mamba_ssm's padding."""
    chunk = 256 if device == "cuda" else 64
    kwargs = dict(d_model=256, d_state=64, headdim=64, expand=2, ngroups=ngroups, chunk_size=chunk)
    ours, theirs = _layers(mamba_ssm, device, **kwargs)
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(2, length, 256, generator=gen).to(device)
    upstream = torch.randn(2, length, 256, generator=gen).to(device)

    out_theirs, grads_theirs = _run(theirs, u, upstream, reference=device == "cpu")
    out_ours, grads_ours = _run(ours, u, upstream, reference=False)

    assert out_theirs.abs().max() > 0.1  # a meaningful scale for the absolute tolerance
    torch.testing.assert_close(out_ours, out_theirs, atol=OUT_ATOL, rtol=0)
    assert grads_ours.keys() == grads_theirs.keys()
    errors = {k: _max_rel(grads_ours[k], grads_theirs[k]) for k in grads_theirs}
    assert max(errors.values()) < GRAD_RTOL, errors


@pytest.mark.cuda
def test_final_states_and_decode_step_match_mamba_ssm(mamba_ssm, exact_float32):
    """The states after a prompt (mamba_ssm returns them through its inference cache) and one
    decode step from them (its Triton selective_state_update and torch conv step; mblm's CUDA
    ssd_update and conv1d_update)."""
    ours, theirs = _layers(mamba_ssm, "cuda", d_model=256, d_state=64, headdim=64, ngroups=2)
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randn(2, 300, 256, generator=gen).cuda()
    token = torch.randn(2, 1, 256, generator=gen).cuda()

    with torch.no_grad():
        cache = SimpleNamespace(key_value_memory_dict={}, seqlen_offset=0)
        out_theirs = theirs(prompt, inference_params=cache)
        conv_theirs, ssm_theirs = cache.key_value_memory_dict[0]
        out_ours, conv_ours, ssm_ours = ours.forward_with_state(prompt, None, None)
        torch.testing.assert_close(out_ours, out_theirs, atol=OUT_ATOL, rtol=0)
        # mamba_ssm keeps the last d_conv conv inputs, mblm the last d_conv - 1
        torch.testing.assert_close(conv_ours, conv_theirs[..., 1:], atol=1e-6, rtol=0)
        assert _max_rel(ssm_ours, ssm_theirs) < 1e-4

        step_theirs, conv_theirs, ssm_theirs = theirs.step(token, conv_theirs, ssm_theirs)
        step_ours, conv_ours, ssm_ours = ours.step(token, conv_ours, ssm_ours)
        torch.testing.assert_close(step_ours, step_theirs, atol=OUT_ATOL, rtol=0)
        torch.testing.assert_close(conv_ours, conv_theirs[..., 1:], atol=1e-6, rtol=0)
        assert _max_rel(ssm_ours, ssm_theirs) < 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("length", [256, 777])
def test_ssd_scan_with_states_matches_mamba_chunk_scan_combined(mamba_ssm, exact_float32, length):
    """An initial state in, the final state out, gradients through both: mamba_ssm's Mamba2
    module passes no initial state, so this is checked on the scan both layers call. D per
    channel (H, P), groups, dt_bias with softplus."""
    b, h, p, g, n = 2, 8, 32, 2, 64
    gen = torch.Generator().manual_seed(3)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).cuda().requires_grad_()

    x, dt = randn(b, length, h, p), randn(b, length, h)
    B, C = randn(b, length, g, n), randn(b, length, g, n)
    A = (-torch.rand(h, generator=gen) * 8 - 1).cuda().requires_grad_()
    D, bias = randn(h, p), randn(h, scale=0.5)
    s0 = randn(b, h, p, n)
    up_y, up_s = torch.randn(b, length, h, p).cuda(), torch.randn(b, h, p, n).cuda()
    inputs = (x, dt, A, B, C, D, bias, s0)

    def grads(y, s):
        return torch.autograd.grad((y * up_y).sum() + (s * up_s).sum(), inputs)

    y_ours, s_ours = ssd_scan(x, dt, A, B, C, D, bias, True, s0)
    y_theirs, s_theirs = _mamba_ssm.chunk_scan_like_ssd_scan(
        mamba_ssm.chunk_scan_combined, 256, x, dt, A, B, C, D, bias, True, s0, final_state=True
    )
    torch.testing.assert_close(y_ours, y_theirs, atol=OUT_ATOL, rtol=OUT_ATOL)
    assert _max_rel(s_ours, s_theirs.float()) < 1e-4
    names = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")
    g_ours, g_theirs = grads(y_ours, s_ours), grads(y_theirs, s_theirs)
    errors = {k: _max_rel(a, b) for k, a, b in zip(names, g_ours, g_theirs, strict=True)}
    assert max(errors.values()) < GRAD_RTOL, errors
