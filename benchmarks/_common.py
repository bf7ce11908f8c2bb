"""Shared helpers of the benchmark scripts: timing, peak memory, machine facts and CSV rows.

Every benchmark measures mblm-cpp and its peer in the same process, reports medians of several
repeats (the 2-core development machines are noisy) and appends one row per measured case to
``benchmarks/results/<name>.csv`` with the columns of ``CSV_COLUMNS`` (design §8).
"""

from __future__ import annotations

import csv
import datetime
import gc
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CHECKOUT = Path(__file__).resolve().parent.parent


def prefer_checkout() -> None:
    """Import ``mblm`` from this checkout when it has a built extension (``tools/dev_build.sh``),
    else from the installed package: an older installed copy must not shadow the code measured."""
    import sys

    if any((CHECKOUT / "mblm").glob("_C*.so")):
        sys.path.insert(0, str(CHECKOUT))
    elif str(CHECKOUT) not in sys.path:
        sys.path.append(str(CHECKOUT))


CSV_COLUMNS = (
    "date",
    "machine",
    "cpu",
    "device",
    "threads",
    "torch",
    "commit",
    "case",
    "shape",
    "dtype",
    "mode",
    "impl_ms",
    "peer",
    "peer_ms",
    "ratio",
    "impl_peak_mib",
    "peer_peak_mib",
    "repeats",
    "note",
)


def original_python(given: str | None = None) -> str:
    """The python of a venv with the original mblm==0.4.2: ``given``, or the one
    benchmarks/setup_original.sh creates (on first use) in build/orig-venv. An absolute path, so
    that workers started in another directory find it."""
    if given:
        return str(Path(given).absolute())
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        ["bash", str(root / "benchmarks" / "setup_original.sh")],
        capture_output=True,
        text=True,
        check=True,
    )
    return str(root / out.stdout.strip().splitlines()[-1])  # the script prints a relative path


def cpu_model() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()} threads"


def git_commit() -> str:
    """The checkout's commit (with '+dirty' when the tree has changes), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any], device: torch.device, *, repeats: int, warmup: int = 1
) -> list[float]:
    """Wall times in seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def time_pair(
    fn_a: Callable[[], Any],
    fn_b: Callable[[], Any],
    device: torch.device,
    *,
    repeats: int,
    warmup: int = 1,
) -> tuple[float, float]:
    """Median seconds of two functions measured alternately (a, b, a, b, ...), so that slow
    drifts of a shared machine hit both alike."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a += time_fn(fn_a, device, repeats=1, warmup=0)
        times_b += time_fn(fn_b, device, repeats=1, warmup=0)
    return statistics.median(times_a), statistics.median(times_b)


def require_kernels(device: torch.device) -> None:
    """Exits when ``device`` is CUDA and mblm was built without its CUDA kernels: its ops would
    fall back to the PyTorch references (sequential loops), and the timings would mean nothing."""
    from mblm.ops._loader import cuda_kernels_available

    if device.type == "cuda" and not cuda_kernels_available():
        raise SystemExit(
            "mblm was built without CUDA kernels (mblm.ops.build_info()['cuda'] is false): "
            "build with -DMBLM_CUDA=ON (tools/gpu_check.sh) before benchmarking on CUDA"
        )


def attempt(fn: Callable[[], Any], device: torch.device) -> tuple[Any, str]:
    """(fn(), "") or, when fn raises, (None, a one-line reason): one backend failing (out of
    memory, a kernel error) is reported in its row instead of ending the whole run. After a
    failure the CUDA cache is emptied so the next case starts from free memory."""
    try:
        return fn(), ""
    except Exception as exc:  # any backend error: the run goes on to the next measurement
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    gc.collect()  # the failed call's frames may still hold its tensors
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return None, reason[:200]


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the bytes allocated through torch's CPU allocator during fn, from the profiler's
    memory records (allocations are charged to the op that made them, at its start; frees are
    separate records), minus nothing: the result counts from zero at the call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = []
    for event in prof.events():
        change = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if change:
            deltas.append((event.time_range.start, change))
    deltas.sort(key=lambda item: item[0])
    live = peak = 0
    for _, change in deltas:
        live += change
        peak = max(peak, live)
    return peak


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory one call of ``fn`` allocates beyond what exists before it, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` over the call. CPU: the peak of live bytes
    allocated through torch's CPU allocator during the call (torch.profiler memory records);
    kernels' internal scratch that bypasses the allocator (per-thread std::vector buffers) is not
    counted. Results that ``fn`` returns count; drop them inside ``fn`` to measure temporaries.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return _cpu_peak_bytes(fn) / 2**20


def base_row(device: torch.device) -> dict[str, Any]:
    """The columns every row shares: when, where and with what it was measured."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": socket.gethostname(),
        "cpu": cpu_model(),
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": git_commit(),
    }


def append_rows(name: str, rows: Iterable[dict[str, Any]]) -> Path:
    """Appends rows to ``benchmarks/results/<name>.csv`` (header written once)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.csv"
    new_file = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in CSV_COLUMNS})
    return path


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Prints rows as an aligned text table."""
    cells = [[str(_fmt(row.get(c, ""))) for c in columns] for row in rows]
    widths = [
        max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
