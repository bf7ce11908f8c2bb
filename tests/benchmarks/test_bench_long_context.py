"""benchmarks/bench_long_context.py: length parsing, presets, the ladder's stop rules (with fake
workers) and one real CPU smoke ladder through worker subprocesses (nothing timed, no CSV)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mblm import MBLMModelConfig

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_long_context.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_long_context", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("256", 256), ("128K", 128 * 1024), ("10M", 10 * 2**20), ("1_048_576", 2**20), ("1.5K", 1536)],
)
def test_parse_length(text, expected):
    assert bench.parse_length(text) == expected


@pytest.mark.parametrize(("text", "needle"), [("100", "multiple of 128"), ("abc", "not a length"),
                                              ("0", "positive"), ("1.3K", "whole")])  # fmt: skip
def test_parse_length_rejects(text, needle):
    with pytest.raises(argparse.ArgumentTypeError, match=needle):
        bench.parse_length(text)


def test_bad_lengths_fail_before_any_worker():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--no-csv", "--lengths", "300"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "--lengths" in out.stderr and "multiple of 128" in out.stderr


def test_chunks_scale_with_length():
    assert bench.scaled_chunks([10, 20], 2**20, fixed=False) == [10, 20]
    assert bench.scaled_chunks([10, 20], 10 * 2**20, fixed=False) == [100, 200]
    assert bench.scaled_chunks([10, 20], 256, fixed=False) == [1, 1]
    assert bench.scaled_chunks([10, 20], 10 * 2**20, fixed=True) == [10, 20]


@pytest.mark.parametrize("preset", ["paper-hybrid", "paper-transformer"])
@pytest.mark.parametrize("smoke", [False, True])
def test_presets_validate(preset, smoke):
    length = 10 * 2**20
    raw = bench.model_config(preset, length, [100, 200], smoke)
    cfg = MBLMModelConfig.model_validate(raw)
    assert list(cfg.seq_lens) == [length // 128, 16, 8]
    assert cfg.train_checkpoint_chunks == [100, 200]
    blocks = cfg.stage_blocks()
    assert blocks[0].block_type == ("mamba2" if preset == "paper-hybrid" else "transformer")
    assert [b.block_type for b in blocks[1:]] == ["transformer", "transformer"]
    if not smoke:
        assert list(cfg.hidden_dims) == [1024] * 3 and list(cfg.num_layers) == [9, 8, 8]


def _ladder_args(**overrides) -> argparse.Namespace:
    args = dict(
        preset="paper-hybrid", lengths=[256, 512, 1024, 2048], chunks=[10, 20],
        fixed_chunks=False, batch=1, warmup=1, steps=2, device="cpu", dtype="float32", seed=0,
        smoke=True, keep_going=False, time_budget=1000.0, worker_timeout=100.0, min_worker_s=1.0,
        alloc_conf="", results_json=None, no_csv=True, simulate_oom_above=0, refine=0,
    )  # fmt: skip
    args.update(overrides)
    return argparse.Namespace(**args)


def _fake_launch(fail_above: int, status: str = "oom"):
    launched = []

    def launch(args, length, timeout):
        launched.append(length)
        chunks = bench.scaled_chunks(args.chunks, length, args.fixed_chunks)
        if length > fail_above:
            return {"seq_len": length, "chunks": chunks, "status": status, "peak_gib": 1.0}
        return {
            "seq_len": length, "chunks": chunks, "status": "ok", "step_s": 0.5,
            "bytes_per_s": length / 0.5, "peak_gib": 0.25,
        }  # fmt: skip

    return launch, launched


@pytest.mark.parametrize("status", ["oom", "error", "crash", "timeout"])
def test_ladder_stops_at_first_failure(monkeypatch, capsys, status):
    launch, launched = _fake_launch(512, status)
    monkeypatch.setattr(bench, "launch_worker", launch)
    results = bench.run_ladder(_ladder_args())
    assert launched == [256, 512, 1024]
    assert [r["status"] for r in results] == ["ok", "ok", status]
    out = capsys.readouterr().out
    assert f"stopping after {status} at 1K: not tried 2K" in out
    assert "largest length that trained: 512 (512 bytes)" in out


def test_ladder_refines_between_the_last_success_and_the_first_oom(monkeypatch, capsys):
    launch, launched = _fake_launch(700)
    monkeypatch.setattr(bench, "launch_worker", launch)
    results = bench.run_ladder(_ladder_args(refine=3))
    # 1024 fails; then 768 (fails) and 640 (trains); no multiple of 128 lies between 640 and
    # 768, so the third try is not made
    assert launched == [256, 512, 1024, 768, 640]
    assert [r["status"] for r in results] == ["ok", "ok", "oom", "oom", "ok"]
    assert "largest length that trained: 640 (640 bytes)" in capsys.readouterr().out


@pytest.mark.parametrize("status", ["error", "timeout"])
def test_ladder_refines_only_after_an_oom(monkeypatch, status):
    launch, launched = _fake_launch(512, status)
    monkeypatch.setattr(bench, "launch_worker", launch)
    bench.run_ladder(_ladder_args(refine=3))
    assert launched == [256, 512, 1024]


def test_ladder_keep_going_tries_every_length(monkeypatch, capsys):
    launch, launched = _fake_launch(256)
    monkeypatch.setattr(bench, "launch_worker", launch)
    bench.run_ladder(_ladder_args(keep_going=True))
    assert launched == [256, 512, 1024, 2048]
    assert "largest length that trained: 256 (256 bytes)" in capsys.readouterr().out


def test_ladder_none_trained(monkeypatch, capsys):
    launch, launched = _fake_launch(0)
    monkeypatch.setattr(bench, "launch_worker", launch)
    bench.run_ladder(_ladder_args())
    assert launched == [256]
    assert "largest length that trained: none" in capsys.readouterr().out


def test_ladder_respects_time_budget(monkeypatch, capsys):
    launch, launched = _fake_launch(10**9)
    monkeypatch.setattr(bench, "launch_worker", launch)
    bench.run_ladder(_ladder_args(time_budget=5.0, min_worker_s=10.0))
    assert launched == []
    assert "time budget spent (5 s): not tried 256, 512, 1K, 2K" in capsys.readouterr().out


def test_smoke_ladder_through_workers(tmp_path):
    """Two real worker processes: 256 bytes trains, 512 bytes hits the simulated OOM, and the
    ladder stops there (1K is never started)."""
    results_json = tmp_path / "results.json"
    cmd = [
        sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--no-csv",
        "--lengths", "256,512,1K", "--simulate-oom-above", "256", "--chunks", "2,3",
        "--fixed-chunks", "--results-json", str(results_json),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    stdout = out.stdout
    assert "[256] ok" in stdout and "[512] oom" in stdout
    assert "stopping after oom at 512: not tried 1K" in stdout
    header = next(line for line in stdout.splitlines() if line.strip().startswith("length"))
    assert header.split() == list(bench.TABLE_COLUMNS)
    assert "largest length that trained: 256 (256 bytes)" in stdout
    assert "not measured here" in stdout  # the original's figures are stated, not measured

    ok, oom = json.loads(results_json.read_text())
    assert ok["status"] == "ok" and ok["oom"] is False
    assert ok["seq_len"] == 256 and ok["chunks"] == [2, 3] and ok["params"] > 0
    assert ok["step_s"] > 0 and math.isclose(ok["bytes_per_s"], 256 / ok["step_s"])
    assert len(ok["losses"]) == 3 and all(math.isfinite(v) for v in ok["losses"])
    assert ok["peak_gib"] > 0 and ok["fallbacks"] == []
    if any((ROOT / "mblm").glob("_C*.so")):  # the checkout's build is the one measured
        assert Path(ok["mblm_file"]).resolve().is_relative_to(ROOT)
    assert oom["status"] == "oom" and oom["oom"] is True and "simulated" in oom["message"]


def test_csv_rows_have_no_peer_and_state_the_reference():
    args = _ladder_args()
    ok = {
        "seq_len": 256, "chunks": [1, 1], "status": "ok", "step_s": 0.5, "bytes_per_s": 512.0,
        "peak_gib": 0.25, "params": 10, "device": "cpu x2 threads",
    }  # fmt: skip
    oom = {"seq_len": 512, "chunks": [1, 1], "status": "oom", "message": "OutOfMemoryError: x"}
    row_ok, row_oom = bench.csv_row(args, ok), bench.csv_row(args, oom)
    assert row_ok["impl_ms"] == 500.0 and row_ok["impl_peak_mib"] == 256.0
    assert row_oom["impl_ms"] == "" and row_oom["impl_peak_mib"] == ""
    for row in (row_ok, row_oom):
        assert row["peer"] == row["peer_ms"] == row["ratio"] == ""
        assert "not measured here" in row["note"]
    assert "status=oom" in row_oom["note"] and "OutOfMemoryError" in row_oom["note"]
