"""The peers of bench_attention.py and their guarded measurement.

Peers are attention functions on (N, S, H, Dh) q, k, v views returning (N, S, H, Dh): the
default ``F.scaled_dot_product_attention`` call ("sdpa"), each SDPA backend forced alone
(``sdpa_kernel``), and FlashAttention's ``flash_attn_func`` when it imports. At the local-stage
shapes some backends fail (invalid launch configurations, cuDNN graph errors): ``measure`` runs
every function in a guard, records the failure, checks that the CUDA context still works and
stops the whole run (``CudaContextLost``) when it does not, since later numbers would be garbage.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# peer name -> SDPBackend member; "sdpa" is the default call (torch picks the backend)
SDPA_BACKENDS = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-math": "MATH",
}
ALL_PEERS = ("sdpa", *SDPA_BACKENDS, "flash_attn")

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CudaContextLost(RuntimeError):
    """A failure left the CUDA context unusable (a sticky error): nothing more can be measured."""


def parse_peers(text: str) -> tuple[str, ...]:
    """``--peers``: 'all' or a comma-separated subset of ALL_PEERS, in the order given."""
    if text == "all":
        return ALL_PEERS
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [x for x in names if x not in ALL_PEERS]
    if unknown or not names:
        raise ValueError(f"--peers: unknown {unknown or text!r}; choose 'all' or from {ALL_PEERS}")
    return names


def _sdpa(backend: str | None, causal: bool) -> Attend:
    def attend(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA's (N, H, S, Dh), free
        if backend is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([getattr(SDPBackend, backend)]):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return out.transpose(1, 2)

    return attend


def attend_fns(names: Sequence[str], causal: bool) -> tuple[dict[str, Attend], dict[str, str]]:
    """The attention function of each peer, and why the unavailable ones are (name -> reason)."""
    fns: dict[str, Attend] = {}
    unavailable: dict[str, str] = {}
    for name in names:
        if name == "sdpa":
            fns[name] = _sdpa(None, causal)
        elif name in SDPA_BACKENDS:
            fns[name] = _sdpa(SDPA_BACKENDS[name], causal)
        elif name == "flash_attn":
            try:
                from flash_attn import flash_attn_func
            except Exception as exc:  # ImportError, or a broken build (OSError, RuntimeError)
                broken = not isinstance(exc, ImportError)
                unavailable[name] = short_error(exc) if broken else "not installed"
                continue
            fns[name] = lambda q, k, v, f=flash_attn_func: f(q, k, v, causal=causal)
        else:
            raise ValueError(f"unknown peer {name!r}; choose from {ALL_PEERS}")
    return fns, unavailable


def short_error(exc: BaseException, warned: Sequence[str] = (), limit: int = 120) -> str:
    """The first sentence of an error, with the first reason among the warnings raised before it
    (SDPA warns "<backend> not used because:" and then why), at most ``limit`` characters."""
    text = next((x.strip() for x in str(exc).splitlines() if x.strip()), type(exc).__name__)
    text = text.split(". ")[0].rstrip(".")
    reasons = [w.strip().splitlines()[0] for w in warned if w.strip()]
    reasons = [w for w in reasons if not w.endswith(":")]
    if reasons:
        text += f" ({reasons[0]})"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def context_usable(device: torch.device) -> bool:
    """Whether the device still runs work after a failure (a sticky CUDA error fails every call)."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return int((torch.ones(8, device=device) + 1).sum().item()) == 16
    except RuntimeError:
        return False


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call: CUDA events on a GPU (no host overhead at sub-millisecond times),
    else wall time."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _guarded(name: str, fn: Callable[[], object], device: torch.device):
    """(seconds, None) or (None, failure message). The call's warnings are recorded, so that a
    failure can say why (SDPA warns why it did not use a backend); on success they are re-issued
    (from here, so the default filter shows each text once)."""
    message = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            seconds = time_once(fn, device)
        except RuntimeError as exc:  # also torch.OutOfMemoryError, AcceleratorError
            message = short_error(exc, [str(w.message) for w in caught])
    if message is None:
        for w in caught:
            warnings.warn(w.message, stacklevel=1)
        return seconds, None
    if device.type == "cuda":
        torch.cuda.empty_cache()  # an out-of-memory failure must not crowd out the next peer
    if not context_usable(device):
        raise CudaContextLost(f"{name} failed with '{message}' and left the CUDA context unusable")
    return None, message


def measure(
    fns: dict[str, Callable[[], object]], device: torch.device, *, repeats: int, warmup: int = 1
) -> tuple[dict[str, float], dict[str, str]]:
    """Median seconds of each function that runs, measured in rounds (a, b, c, a, b, c, ...) so
    that slow drifts of a shared machine hit all alike, and the failure of each that does not
    (dropped from the rounds at its first failure). Raises CudaContextLost on a sticky error."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    failures: dict[str, str] = {}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            if name in failures:
                continue
            seconds, failure = _guarded(name, fn, device)
            if failure is not None:
                failures[name] = failure
            elif round_ >= warmup:
                samples[name].append(seconds)
    times = {n: statistics.median(t) for n, t in samples.items() if n not in failures and t}
    return times, failures


def fastest(times: dict[str, float], among: Sequence[str]) -> tuple[str, float] | None:
    """The name and time of the fastest of ``among`` that has a time (first named on a tie), or
    None when none ran."""
    ran = [(times[n], i, n) for i, n in enumerate(among) if n in times]
    if not ran:
        return None
    t, _, name = min(ran)
    return name, t


def peer_summary(
    names: Sequence[str],
    times: dict[str, float],
    failures: dict[str, str],
    unavailable: dict[str, str],
) -> str:
    """'name 1.234 ms; name fails: ...; name unavailable: ...' for every peer, in order."""
    parts = []
    for n in names:
        if n in times:
            parts.append(f"{n} {times[n] * 1e3:.4g} ms")
        elif n in failures:
            parts.append(f"{n} fails: {failures[n]}")
        elif n in unavailable:
            parts.append(f"{n} unavailable: {unavailable[n]}")
    return "; ".join(parts)
