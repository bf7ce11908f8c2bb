"""benchmarks/bench_mamba_layer.py runs its CPU smoke path end to end (nothing recorded). With
triton and mamba_ssm's source at hand (see test_mamba_ssm_loader.py) the smoke run also compares
mblm's layer with mamba_ssm's, on its pure-PyTorch references, with identical weights."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_mamba_layer_smoke():
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_mamba_layer.py", "--device", "cpu", "--smoke"]
        + ["--no-csv"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "failed" not in out, out
    assert "fwd+bwd" in out.split("summary")[1], out
    diffs = [float(d) for d in re.findall(r"max \|out_mblm - out_peer\| = (\S+)", out)]
    assert all(d < 1e-4 for d in diffs), out  # float32 on CPU: same function, same weights
    if "# mamba_ssm: not measured" not in out:
        assert diffs, out
