"""benchmarks/bench_attention.py: its arithmetic, the choice of peer, failure handling, and a run
of the script on tiny shapes (``--smoke``). Nothing here times anything."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _attention_metrics as metrics  # noqa: E402
import _sdpa_peers as peers  # noqa: E402


def test_minimal_io_bytes_counts_each_tensor_once():
    tensor = 131072 * 8 * 16 * 64 * 2  # one bf16 (N, S, H, Dh) tensor: 2 GiB
    lse = 131072 * 16 * 8 * 4
    assert metrics.minimal_io_bytes(131072, 8, 16, 64, 2, "fwd") == 4 * tensor
    # forward q k v o lse, backward q k v o dO lse dq dk dv
    assert metrics.minimal_io_bytes(131072, 8, 16, 64, 2, "fwd+bwd") == 13 * tensor + 2 * lse
    assert metrics.minimal_io_bytes(131072, 8, 16, 64, 2, "fwd+bwd") / 1e9 == pytest.approx(
        28.05, abs=0.01
    )


def test_attention_flops_causal_convention():
    fwd = 4 * 1 * 16 * 8192 * 8192 * 64 / 2
    assert metrics.attention_flops(1, 8192, 16, 64, "fwd") == fwd
    assert metrics.attention_flops(1, 8192, 16, 64, "fwd+bwd") == 3.5 * fwd
    assert metrics.attention_flops(1, 8192, 16, 64, "fwd", causal=False) == 2 * fwd
    with pytest.raises(ValueError, match="mode"):
        metrics.attention_flops(1, 8, 1, 8, "bwd")


def test_speed_note():
    io = metrics.minimal_io_bytes(4, 8, 2, 16, 2, "fwd")
    note = metrics.speed_note("local", (4, 8, 2, 16), 2, "fwd", {"mblm": io / 1e9}, 2e9)
    assert note == f"min I/O {io / 1e9:.3g} GB; mblm 1 GB/s = 50% of copy; copy 2 GB/s"
    flops = metrics.attention_flops(1, 64, 2, 16, "fwd+bwd")
    note = metrics.speed_note("global", (1, 64, 2, 16), 2, "fwd+bwd", {"x": flops / 1e12}, None)
    assert note.startswith("x 1 TFLOP/s; FLOPs: causal S*S/2, fwd+bwd 3.5 x fwd")


def test_copy_bandwidth_is_positive_on_cpu():
    assert metrics.copy_bandwidth(torch.device("cpu"), 1, repeats=2) > 0


def test_fastest_ignores_failed_and_non_peers():
    times = {"mblm": 0.001, "sdpa-efficient": 0.09, "sdpa-math": 0.3}
    assert peers.fastest(times, ["sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-math"]) == (
        "sdpa-efficient",
        0.09,
    )
    assert peers.fastest({"mblm": 1.0}, ["sdpa"]) is None
    assert peers.fastest({"a": 1.0, "b": 1.0}, ["b", "a"]) == ("b", 1.0)  # tie: first named


def test_parse_peers():
    assert peers.parse_peers("all") == peers.ALL_PEERS
    assert peers.parse_peers("sdpa-math, sdpa") == ("sdpa-math", "sdpa")
    with pytest.raises(ValueError, match="--peers"):
        peers.parse_peers("sdpa,fast")


def test_short_error_takes_first_sentence_and_reason():
    exc = RuntimeError("No available kernel. Aborting execution.\nmore text")
    warned = ["Flash attention kernel not used because:", "Batch size exceeds 65535\nsee ..."]
    assert peers.short_error(exc, warned) == "No available kernel (Batch size exceeds 65535)"
    assert len(peers.short_error(RuntimeError("x" * 500))) == 120


def _failing_after(calls: int):
    count = [0]

    def fn():
        count[0] += 1
        if count[0] > calls:
            raise RuntimeError("CUDA error: invalid argument\nCompile with TORCH_USE_CUDA_DSA")

    return fn


def test_measure_records_failures_and_keeps_the_rest():
    fns = {
        "ok": lambda: None,
        "bad": _failing_after(0),  # fails at once, as flash at >65535 sequences
        "late": _failing_after(2),  # fails while timed: dropped, not half-measured
        "warns": lambda: warnings.warn("from a peer that runs", stacklevel=1),
    }
    with pytest.warns(UserWarning, match="from a peer that runs"):  # not swallowed
        times, failures = peers.measure(fns, torch.device("cpu"), repeats=3)
    assert set(times) == {"ok", "warns"}
    assert failures == {
        "bad": "CUDA error: invalid argument",
        "late": "CUDA error: invalid argument",
    }
    summary = peers.peer_summary(["ok", "bad", "gone"], times, failures, {"gone": "not installed"})
    assert summary.startswith("ok ") and "; bad fails: CUDA error" in summary
    assert summary.endswith("; gone unavailable: not installed")


def test_measure_stops_when_the_context_is_lost(monkeypatch):
    monkeypatch.setattr(peers, "context_usable", lambda device: False)
    fns = {"ok": lambda: None, "bad": _failing_after(0), "never": lambda: None}
    with pytest.raises(peers.CudaContextLost, match="bad failed"):
        peers.measure(fns, torch.device("cpu"), repeats=1)


def test_sdpa_backends_on_cpu_run_or_fail_cleanly():
    fns, unavailable = peers.attend_fns(["sdpa", "sdpa-math", "sdpa-efficient"], causal=True)
    q = torch.randn(2, 5, 3, 8)  # (N, S, H, Dh)
    want = fns["sdpa"](q, q, q)
    torch.testing.assert_close(fns["sdpa-math"](q, q, q), want)
    assert want.shape == q.shape
    _, failures = peers.measure(
        {"eff": lambda: fns["sdpa-efficient"](q, q, q)}, torch.device("cpu"), repeats=1
    )
    assert "eff" in failures  # no efficient-attention kernel on CPU


def _run_bench(*extra: str) -> str:
    cmd = [
        sys.executable,
        str(BENCH / "bench_attention.py"),
        "--smoke",
        "--no-csv",
        "--repeats",
        "1",
    ]
    proc = subprocess.run(cmd + list(extra), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_smoke_cpu_default_peer():
    out = _run_bench("--device", "cpu", "--only", "local")
    assert "# ratio = SDPA time / mblm time" in out
    measured = out.split("\nsummary\n")[0]
    lines = [x for x in measured.splitlines() if x.startswith("local ")]
    assert len(lines) == 4 and all(" sdpa " in x and " x" in x for x in lines)
    assert "fails" not in out


def test_smoke_cpu_several_peers():
    out = _run_bench("--device", "cpu", "--peers", "sdpa,sdpa-cudnn,flash_attn")
    assert "sdpa-cudnn fails: No viable backend" in out  # a failing backend is reported
    assert "flash_attn unavailable" in out or "flash_attn " in out
    assert "GB/s = " in out and "TFLOP/s" in out
    assert "summary" in out


@pytest.mark.cuda
def test_smoke_cuda_all_peers():
    out = _run_bench("--device", "cuda", "--copy-mib", "64")
    assert "summary" in out and "mblm fails" not in out
