"""What an attention time means: minimal memory traffic, FLOP counts and the copy bandwidth of
the device, for bench_attention.py. Pure functions except ``copy_bandwidth``."""

from __future__ import annotations

import torch

MODES = ("fwd", "fwd+bwd")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def minimal_io_bytes(n: int, s: int, h: int, d: int, elem_bytes: int, mode: str) -> int:
    """The bytes attention over (N, S, H, Dh) tensors must move to and from memory at least,
    every tensor read or written exactly once.

    fwd (inference): read q, k, v; write o (no log-sum-exp is needed).
    fwd+bwd (training): the forward reads q, k, v and writes o and the float32 log-sum-exp (one
    per row and head); the backward, a separate pass since dO exists only after the forward
    returns, reads q, k, v, o, dO and the log-sum-exp and writes dq, dk, dv. That is 13 tensors
    of N*S*H*Dh elements and 2 of N*H*S float32 (131,072 x 8 x 16 x 64 in bf16: 28.0 GB).
    """
    _check_mode(mode)
    tensor = n * s * h * d * elem_bytes
    if mode == "fwd":
        return 4 * tensor
    lse = n * h * s * 4
    return (4 + 9) * tensor + 2 * lse


def attention_flops(n: int, s: int, h: int, d: int, mode: str, causal: bool = True) -> float:
    """Matmul FLOPs of attention, by the usual convention.

    fwd: two matmuls per head and sequence (Q K^T and P V), 2*S*S*Dh each: 4*N*H*S*S*Dh, halved
    when causal (S*S/2 rather than the exact S*(S+1)/2). fwd+bwd: 3.5 x fwd, since the backward
    has five such matmuls (Q K^T recomputed, dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q),
    2.5 x the forward's two. Every implementation is charged the same count.
    """
    _check_mode(mode)
    fwd = 4.0 * n * h * s * s * d * (0.5 if causal else 1.0)
    return fwd if mode == "fwd" else 3.5 * fwd


def copy_bandwidth(device: torch.device, mib: int, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device ``copy_`` of ``mib`` MiB (bytes read + written over
    the fastest of ``repeats`` copies): the memory bandwidth the device reaches in practice."""
    import time

    if mib <= 0:
        raise ValueError(f"copy size (MiB) must be positive, got {mib}")
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        best = min(best, seconds)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * mib * 2**20 / best


def speed_note(
    kind: str,
    shape: tuple[int, int, int, int],
    elem_bytes: int,
    mode: str,
    times: dict[str, float],
    copy_bandwidth: float | None,
) -> str:
    """What the times (name -> seconds) mean for a case of ``kind`` 'local' (memory-bound:
    GB/s of the minimal I/O, and % of ``copy_bandwidth`` in bytes/s when known) or 'global'
    (compute-bound: TFLOP/s)."""
    n, s, h, d = shape
    if kind == "local":
        io = minimal_io_bytes(n, s, h, d, elem_bytes, mode)
        parts = [f"min I/O {io / 1e9:.3g} GB"]
        for name, seconds in times.items():
            text = f"{name} {io / seconds / 1e9:.3g} GB/s"
            if copy_bandwidth:
                text += f" = {io / seconds / copy_bandwidth:.0%} of copy"
            parts.append(text)
        if copy_bandwidth:
            parts.append(f"copy {copy_bandwidth / 1e9:.0f} GB/s")
    elif kind == "global":
        flops = attention_flops(n, s, h, d, mode)
        parts = [f"{name} {flops / t / 1e12:.3g} TFLOP/s" for name, t in times.items()]
        parts.append("FLOPs: causal S*S/2" + (", fwd+bwd 3.5 x fwd" if mode == "fwd+bwd" else ""))
    else:
        raise ValueError(f"kind must be 'local' or 'global', got {kind!r}")
    return "; ".join(parts)
