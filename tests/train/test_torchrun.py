"""End-to-end: training under torchrun with 2 CPU processes (Gloo), and surviving a worker
killed with SIGKILL under ``--max-restarts 1``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import read_loss_rows, without_timestamps

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("run_train.py")


def torchrun(out: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    environment = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    environment.pop("JOB_ID", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--monitor-interval=0.2",
        *extra,
        str(SCRIPT),
        str(out),
    ]
    result = subprocess.run(
        cmd, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=180
    )
    if result.returncode != 0:
        raise AssertionError(
            f"torchrun failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout + result.stderr


def final_weights(output: str) -> dict[str, str]:
    return dict(re.findall(r"FINAL_WEIGHTS rank=(\d) sum=(\S+)", output))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    output = torchrun(out)
    (run_dir,) = [p for p in out.iterdir() if p.is_dir() and p.name.startswith("tiny_")]
    return run_dir, output


def test_two_processes_agree_and_learn(two_process_run):
    run_dir, output = two_process_run
    weights = final_weights(output)
    assert set(weights) == {"0", "1"} and weights["0"] == weights["1"]
    rows = read_loss_rows(run_dir)
    by_rank = {r: [x for x in rows if x["gpu_rank"] == r] for r in ("0", "1")}
    valid = {r: [x["loss"] for x in by_rank[r] if x["kind"] == "valid"] for r in by_rank}
    assert len(valid["0"]) == 6 and valid["0"] == valid["1"]  # all-reduced validation
    train = {r: [x["loss"] for x in by_rank[r] if x["kind"] == "train"] for r in by_rank}
    assert train["0"] != train["1"]  # different shards
    losses = [float(v) for v in valid["0"]]
    assert losses[-1] < losses[0] - 0.5, losses
    # 24 * 128 * 2 elements in all: 12 iterations per rank
    assert max(int(x["cum_batch"]) for x in by_rank["0"]) == 11
    # only global rank 0 writes files
    assert sorted(p.name for p in run_dir.glob("*.pth")) == ["tiny_top1.pth", "tiny_top2.pth"]


def test_killed_worker_is_restarted_and_resumes(two_process_run, tmp_path):
    run_dir, output = two_process_run
    killed_output = torchrun(tmp_path, "--max-restarts=1", env={"KILL_AT_ITER": "9"})
    (resumed_dir,) = [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith("tiny_")]
    assert "Resuming the run" in (resumed_dir / "train.log").read_text()
    assert final_weights(killed_output) == final_weights(output)

    # the two ranks' rows interleave in any order; each rank's own rows are in order
    def per_rank(rows):
        return sorted(without_timestamps(rows), key=lambda r: r["gpu_rank"])

    assert per_rank(read_loss_rows(resumed_dir)) == per_rank(read_loss_rows(run_dir))
