"""benchmarks/bench_ssd.py runs its CPU smoke case end to end (nothing recorded)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_ssd_smoke():
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_ssd.py", "--smoke", "--device", "cpu", "--no-record"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ssd_chunked_ref/64: rel_err" in proc.stdout
    errors = [float(e) for e in re.findall(r": rel_err (\S+)", proc.stdout)]
    assert errors and max(errors) < 1e-4, proc.stdout
    assert "failed" not in proc.stdout, proc.stdout
    assert "fwd+bwd" in proc.stdout.split("summary")[1]
