"""benchmarks/bench_scan.py: its CPU smoke case runs end to end (nothing recorded), and the
mamba_ssm peer passes selective_scan_fn the arguments mblm's selective_scan gets (checked with
selective_scan itself, whose signature selective_scan_fn shares; the real one needs CUDA)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_bench_scan_smoke():
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_scan.py", "--smoke", "--no-record"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mambapy pscan (re-implementation) fwd+bwd: mblm" in proc.stdout, proc.stdout
    assert "failed" not in proc.stdout and "disagrees" not in proc.stdout, proc.stdout


def test_mamba_ssm_peer_arguments():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_scan
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from mblm.ops.scan import selective_scan

    case = bench_scan.Case(1, 32, 16)
    inputs = bench_scan.make_inputs(case, torch.device("cpu"), torch.float32)
    peer = bench_scan.mamba_ssm_peer(lambda *args: selective_scan(*args)[0])
    with torch.no_grad():
        torch.testing.assert_close(peer(*inputs), bench_scan.run_mblm(*inputs))
