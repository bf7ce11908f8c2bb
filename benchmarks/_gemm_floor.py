"""The matrix-multiplication floor of a train step: the step's GEMMs timed alone.

A train step's Linear layers do the same GEMMs in any implementation of the model, so the time
they take alone bounds how fast the step can get: ``peer step time / GEMM time`` is the largest
speed-up any implementation could reach at that GEMM speed. Torch-only (importable from the
original's venv too).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class _RecordGemms(TorchDispatchMode):
    """Counts the (op, operand shapes, dtype) of every GEMM that runs under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[tuple[Any, tuple[tuple[int, ...], ...], torch.dtype, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _GEMMS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            key = (
                func,
                tuple(tuple(t.shape) for t in tensors),
                tensors[-1].dtype,
                tensors[-1].device.type,
            )
            self.calls[key] += 1
        return func(*args, **(kwargs or {}))


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gemm_floor_seconds(step: Callable[[], Any], repeats: int = 3) -> tuple[float, float]:
    """Runs ``step`` once recording its GEMMs, then times those GEMMs alone on fresh operands of
    the same shapes (median of ``repeats``). Returns (seconds per step, GFLOP per step)."""
    recorder = _RecordGemms()
    with recorder:
        step()
    work = []
    flop = 0.0
    device_type = next((key[3] for key in recorder.calls), "cpu")
    for (func, shapes, dtype, device), count in recorder.calls.items():
        operands = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
        work.append((func, operands, count))
        m_k, k_n = shapes[-2], shapes[-1]
        batch = shapes[-2][0] if func is torch.ops.aten.bmm.default else 1
        flop += 2.0 * batch * m_k[-2] * m_k[-1] * k_n[-1] * count
    times = []
    for _ in range(repeats + 1):  # the first pass warms up
        _synchronize(device_type)
        start = time.perf_counter()
        for func, operands, count in work:
            for _ in range(count):
                func(*operands)
        _synchronize(device_type)
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return times[len(times) // 2], flop / 1e9
