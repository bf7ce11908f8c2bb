"""Patch family: the fused ops vs the reference (the original's op sequence: pad + reshape;
add pos + cat start + pad prev + add; slice + reshape + cat + slice), forward and forward+backward.

    python benchmarks/bench_patch.py [--device cpu|cuda] [--dtype float32] [--repeats 20]

Prints the median time of each side and their ratio; appends rows to results/patch.csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

_common.prefer_checkout()

import mblm.ops  # noqa: E402, F401
from mblm.ops import patch as P  # noqa: E402
from mblm.ops import reference as R  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results", "patch.csv")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, device: str, repeats: int) -> float:
    for _ in range(3):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _cases(device: str, dtype: torch.dtype, scale: int):
    """(name, shape text, kernel fn, reference fn, bytes moved by the fused kernel)."""
    g = torch.Generator(device=device).manual_seed(0)
    esize = torch.empty((), dtype=dtype).element_size()
    cases = []
    # A 2-stage model (seq_lens (P0, 8)), batch B: the local stage sees N = B * P0 sequences of 8.
    batch, p0, p1, d_glob, d_loc = 2 * scale, 1024, 8, 1024, 512
    ids = torch.randint(0, 256, (batch, p0 * p1 - 3), generator=g, device=device)
    cases.append(
        (
            "patch_pad",
            f"B={batch} L={ids.shape[1]} inner=(8,)",
            lambda: P.patch_pad(ids, (p1,), 0),
            lambda: R.patch_pad_ref(ids, (p1,), 0),
            2 * ids.numel() * 8,
        )
    )
    for label, n, s, d, use_pos in (
        ("global", batch, p0, d_glob, False),
        ("local", batch * p0, p1, d_loc, True),
    ):
        x = torch.randn(n, s, d, generator=g, device=device).to(dtype)
        start = torch.randn(d, generator=g, device=device).to(dtype)
        pos = torch.randn(s, d, generator=g, device=device).to(dtype) if use_pos else None
        prev = (
            torch.randn(n, s, d, generator=g, device=device).to(dtype) if label == "local" else None
        )
        moved = (x.numel() * (2 + (prev is not None)) + n * d) * esize
        shape = f"{label} N={n} S={s} D={d} pos={use_pos} prev={prev is not None}"
        cases.append(
            (
                "stage_input fwd",
                shape,
                lambda x=x, s_=start, p=pos, v=prev: P.stage_input(x, s_, p, v),
                lambda x=x, s_=start, p=pos, v=prev: R.stage_input_ref(x, s_, p, v),
                moved,
            )
        )
        leaves = [
            t.clone().requires_grad_() if t is not None else None for t in (x, start, pos, prev)
        ]
        grad = torch.randn(n, s + 1, d, generator=g, device=device).to(dtype)
        req = [t for t in leaves if t is not None]

        def fwd_bwd(fn, leaves=leaves, grad=grad, req=req):
            return torch.autograd.grad(fn(*leaves), req, grad)

        cases.append(
            (
                "stage_input fwd+bwd",
                shape,
                lambda f=fwd_bwd: f(P.stage_input),
                lambda f=fwd_bwd: f(R.stage_input_ref),
                0,
            )
        )
    y = torch.randn(batch, p0, 1 + p1, d_loc, generator=g, device=device).to(dtype)
    length = p0 * p1 - 3
    cases.append(
        (
            "patch_unpatch fwd",
            f"y={tuple(y.shape)} length={length}",
            lambda: P.patch_unpatch(y, length, True),
            lambda: R.patch_unpatch_ref(y, length, True),
            2 * batch * length * d_loc * esize,
        )
    )
    yl = y.clone().requires_grad_()
    gy = torch.randn(batch, length, d_loc, generator=g, device=device).to(dtype)
    cases.append(
        (
            "patch_unpatch fwd+bwd",
            f"y={tuple(y.shape)} length={length}",
            lambda: torch.autograd.grad(P.patch_unpatch(yl, length, True), yl, gy),
            lambda: torch.autograd.grad(R.patch_unpatch_ref(yl, length, True), yl, gy),
            0,
        )
    )
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--scale", type=int, default=None, help="batch multiplier (default 4 cuda, 1 cpu)"
    )
    args = parser.parse_args()
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    scale = args.scale or (4 if device == "cuda" else 1)
    machine = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or platform.machine()
    )
    rows = []
    print(
        f"device={device} ({machine}) dtype={dtype} threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    print(f"{'op':24s} {'shape':52s} {'mblm ms':>9s} {'ref ms':>9s} {'speedup':>8s} {'GB/s':>7s}")
    for name, shape, kernel, ref, moved in _cases(device, dtype, scale):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_k = _median_ms(kernel, device, args.repeats)
        peak_k = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
        t_r = _median_ms(ref, device, args.repeats)
        gbs = moved / t_k / 1e6 if moved else float("nan")
        print(f"{name:24s} {shape:52s} {t_k:9.3f} {t_r:9.3f} {t_r / t_k:7.2f}x {gbs:7.1f}")
        rows.append(
            dict(
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                machine=machine,
                device=device,
                torch=torch.__version__,
                commit=_commit(),
                op=name,
                shape=shape,
                dtype=str(dtype).split(".")[-1],
                threads=torch.get_num_threads(),
                mblm_ms=round(t_k, 4),
                ref_ms=round(t_r, 4),
                speedup=round(t_r / t_k, 3),
                gb_per_s=round(gbs, 1),
                peak_mb=round(peak_k, 1),
            )
        )
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    new = not os.path.exists(RESULTS)
    with open(RESULTS, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
