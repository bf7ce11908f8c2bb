"""benchmarks/_mamba_ssm.py finds mamba_ssm's source without its compiled extension, and its
argument mapping gives ssd_scan's result on CPU (through mamba_ssm's pure-PyTorch reference).

Needs triton and einops (mamba_ssm imports them at module level; importing triton-decorated
modules needs no GPU) and mamba_ssm's unpacked source: $MBLM_MAMBA_SSM_SRC, build/mamba_ssm_src
or /work/mamba_ssm_src; skipped otherwise (CI has none of them). Each check runs in a fresh
interpreter: the loader registers modules (the bare package, stand-ins) in sys.modules.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CANDIDATES = [os.environ.get("MBLM_MAMBA_SSM_SRC"), ROOT / "build" / "mamba_ssm_src"]
CANDIDATES.append("/work/mamba_ssm_src")
SOURCE = next((Path(c) for c in CANDIDATES if c and Path(c).is_dir()), None)

pytestmark = [
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("triton", "einops")),
        reason="needs triton and einops (mamba_ssm imports them)",
    ),
    pytest.mark.skipif(SOURCE is None, reason="no mamba_ssm source folder"),
]


def run_python(code: str) -> str:
    prelude = f"import sys\nsys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_finds_the_three_names_from_source():
    out = run_python(
        f"""
        import _mamba_ssm

        ms, why = _mamba_ssm.load_mamba_ssm({str(SOURCE)!r})
        assert ms is not None, why
        assert ms.chunk_scan_combined.__name__ == "mamba_chunk_scan_combined"
        assert ms.Mamba2.__name__ == "Mamba2" and ms.Mamba2.__module__ == "mamba_ssm.modules.mamba2"
        if "stand-ins: selective_scan_cuda" in why:
            assert ms.selective_scan_fn is None
        # the package __init__ (which imports the compiled extension) did not run
        assert not hasattr(sys.modules["mamba_ssm"], "Mamba3")
        assert _mamba_ssm.load_mamba_ssm("/no/such/folder")[0] is ms  # one load per process
        print(why)
        """
    )
    assert "mamba_ssm 2." in out


def test_missing_source_gives_a_reason():
    out = run_python(
        """
        import _mamba_ssm

        ms, why = _mamba_ssm.load_mamba_ssm("/no/such/folder")
        if ms is None:  # a failure leaves nothing behind
            assert "mamba_ssm" not in sys.modules
        print(ms, why)
        """
    )
    if "installed mamba_ssm" not in out:
        assert out.startswith("None no mamba_ssm source at /no/such/folder"), out


def test_stand_ins_raise_clearly():
    run_python(
        f"""
        import importlib.util
        if importlib.util.find_spec("selective_scan_cuda") is not None:
            raise SystemExit(0)  # the real extension is there: no stand-in to check
        import _mamba_ssm

        assert _mamba_ssm.load_mamba_ssm({str(SOURCE)!r})[0] is not None
        import selective_scan_cuda

        try:
            selective_scan_cuda.fwd()
        except RuntimeError as exc:
            assert "compiled extension is not installed" in str(exc)
        else:
            raise AssertionError("the stand-in did not raise")
        """
    )


def test_mapping_matches_ssd_scan_on_cpu():
    """dt_eff = softplus(dt + dt_bias), D of (H,) or (H, P), groups: ssd_scan's arguments mapped
    onto mamba_chunk_scan_combined's give ssd_scan's result, through mamba_ssm's own reference
    of that function (``ssd_chunk_scan_combined_ref``: its conventions, forward only) and through
    ``reference_chunk_scan`` (the CPU stand-in for the Triton function in the benchmarks)."""
    run_python(
        f"""
        import sys
        import torch
        import _mamba_ssm
        from mblm.ops.ssd import ssd_scan

        assert _mamba_ssm.load_mamba_ssm({str(SOURCE)!r})[0] is not None
        combined_ref = sys.modules["mamba_ssm.ops.triton.ssd_combined"].ssd_chunk_scan_combined_ref

        def mamba_ref(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                      initial_states=None, dt_softplus=False, return_final_states=False):
            assert initial_states is None and not return_final_states
            return combined_ref(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus)

        g = torch.Generator().manual_seed(0)
        b, length, h, p, groups, n = 2, 64, 4, 8, 2, 16

        def randn(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        x, dt = randn(b, length, h, p), randn(b, length, h)
        B, C = randn(b, length, groups, n), randn(b, length, groups, n)
        A = -torch.rand(h, generator=g, dtype=torch.float64) * 4 - 0.5
        for D in (None, randn(h), randn(h, p)):
            for bias in (None, randn(h)):
                for softplus in (False, True):
                    d = dt if softplus else dt.abs() * 0.1  # raw dt must be a step size
                    want = ssd_scan(x, d, A, B, C, D, bias, softplus)[0]
                    for scan, tol in ((mamba_ref, 1e-5), (_mamba_ssm.reference_chunk_scan, 1e-12)):
                        got = _mamba_ssm.chunk_scan_like_ssd_scan(
                            scan, 16, x, d, A, B, C, D, bias, softplus
                        )
                        # mamba_ssm's reference casts dt to float32 before its cumulative sums
                        err = (got - want).abs().max() / want.abs().max()
                        assert err < tol, (scan, D is None, bias is None, softplus, err)
        """
    )


def test_reference_chunk_scan_states_and_gradients_on_cpu():
    """reference_chunk_scan with an initial state, its final state, a length that is not a
    multiple of the chunk, and gradients, against ssd_scan (float64)."""
    run_python(
        f"""
        import torch
        import _mamba_ssm
        from mblm.ops.ssd import ssd_scan

        assert _mamba_ssm.load_mamba_ssm({str(SOURCE)!r})[0] is not None
        g = torch.Generator().manual_seed(1)
        b, length, h, p, groups, n = 2, 50, 4, 8, 2, 16

        def randn(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

        inputs = (randn(b, length, h, p), randn(b, length, h), -torch.rand(h, generator=g,
                  dtype=torch.float64).mul(8).add(1).requires_grad_(), randn(b, length, groups, n),
                  randn(b, length, groups, n), randn(h, p), randn(h), randn(b, h, p, n))
        x, dt, A, B, C, D, bias, s0 = inputs
        up_y, up_s = torch.randn(b, length, h, p, dtype=torch.float64), torch.randn(b, h, p, n,
                                                                                   dtype=torch.float64)
        y1, s1 = ssd_scan(x, dt, A, B, C, D, bias, True, s0)
        y2, s2 = _mamba_ssm.chunk_scan_like_ssd_scan(
            _mamba_ssm.reference_chunk_scan, 16, x, dt, A, B, C, D, bias, True, s0, final_state=True
        )
        torch.testing.assert_close(y2, y1, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s2, s1, rtol=1e-10, atol=1e-10)
        g1 = torch.autograd.grad((y1 * up_y).sum() + (s1 * up_s).sum(), inputs)
        g2 = torch.autograd.grad((y2 * up_y).sum() + (s2 * up_s).sum(), inputs)
        for a, b_ in zip(g1, g2):
            torch.testing.assert_close(b_, a, rtol=1e-9, atol=1e-9)
        """
    )


def test_reference_chunk_scan_refuses_what_it_cannot_do():
    run_python(
        f"""
        import torch
        import _mamba_ssm

        assert _mamba_ssm.load_mamba_ssm({str(SOURCE)!r})[0] is not None
        x, dt = torch.zeros(1, 8, 2, 4), torch.zeros(1, 8, 2)
        A, B = torch.zeros(2), torch.zeros(1, 8, 1, 4)
        for kwargs in (dict(seq_idx=torch.zeros(1, 8)), dict(return_varlen_states=True)):
            try:
                _mamba_ssm.reference_chunk_scan(x, dt, A, B, B, 8, **kwargs)
            except NotImplementedError as exc:
                assert next(iter(kwargs)) in str(exc)
            else:
                raise AssertionError(kwargs)
        """
    )
