"""mblm attention (torch.ops.mblm.attn_fwd / attn_bwd) vs torch's scaled_dot_product_attention.

Usage: python benchmarks/bench_attention.py [--quick | --smoke] [--device cpu|cuda]
           [--dtype D] [--only local|global] [--peers all|sdpa,sdpa-flash,...] [--no-csv]

What is timed, for both sides, is what a MEGABYTE stage does around attention, starting from
the outputs of the ``to_q`` linear (N, S, H*Dh) and the ``to_kv`` linear (N, S, 2*H*Dh), both
requiring grad:
- mblm: q and the packed kv (N, S, 2, H, Dh) are views of those tensors, then
  ``mblm.ops.attention.attention_kv`` (rotary fused when enabled; the gradient of to_kv's output
  is written packed, no concatenation), as the model's Attention calls it, then a view back to
  (N, S, H*Dh).
- peer: the same views transposed to SDPA's (N, H, S, Dh) layout (free), rotary (when enabled)
  as PyTorch element-wise ops on q and k (as MEGABYTE applies it), ``F.scaled_dot_product_attention``
  with is_causal, and the (N, H, S, Dh) -> (N, S, H*Dh) transpose + reshape (a copy) that the
  model needs before ``to_out``.
"fwd" runs under no_grad (inference); "fwd+bwd" runs the forward and ``backward`` of a fixed
upstream gradient into the two linear outputs. Times are medians of ``--repeats`` alternating
runs; ratio = peer time / mblm time (> 1: mblm is faster). Peak memory is the extra memory of
one fwd+bwd step (CPU: torch allocator, profiler; CUDA: max_memory_allocated). Every row is
appended to benchmarks/results/bench_attention.csv.

On CUDA (bf16; the shapes of issue 8) the peer is the fastest that runs of: the default SDPA
call ("sdpa"), each SDPA backend forced alone (sdpa-flash, sdpa-cudnn, sdpa-efficient,
sdpa-math) and FlashAttention's flash_attn_func when it imports (_sdpa_peers.py). Failures are
recorded, not fatal; a failure that leaves the CUDA context unusable stops the run (exit 1) after
writing the rows measured. The row's ``peer`` names the fastest, its ``note`` lists every peer's
time or failure and, for local shapes, the GB/s of the minimal I/O (_attention_metrics.py) as %
of a device-to-device copy measured at the start, for global shapes the TFLOP/s. On CPU the
peer is the default call alone (``--peers all`` shows all there too).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _attention_metrics  # noqa: E402
import _common  # noqa: E402
import _sdpa_peers  # noqa: E402

_common.prefer_checkout()

from mblm.ops.attention import attention_kv  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    n: int
    s: int
    h: int
    d: int
    rotary: bool = False
    causal: bool = True

    @property
    def shape(self) -> str:
        return f"N={self.n} S={self.s} H={self.h} Dh={self.d}" + (" rot" if self.rotary else "")


def cases(device: torch.device, quick: bool, smoke: bool = False) -> list[Case]:
    if smoke:  # seconds on any device: exercises the script, measures nothing of interest
        return [
            Case("local", 64, 9, 4, 16),
            Case("local", 64, 17, 4, 16, rotary=True),
            Case("global", 1, 128, 2, 16),
        ]
    if device.type == "cuda":
        # issue 8: local stages of 65,536-131,072 sequences of 8-17 bytes (more than 65,535
        # sequences: launch grids must not put N on a limited axis), global stages of 8K-64K
        if quick:
            local = [(131072, 8), (65536, 17)]
            global_lengths = (8192, 32768)
        else:
            local = [(n, s) for n in (65536, 131072) for s in (8, 9, 16, 17)]
            global_lengths = (8192, 16384, 32768, 65536)
        return [
            *(Case("local", n, s, 16, 64) for n, s in local),
            Case("local", 65536, 17, 16, 64, rotary=True),
            *(Case("global", 1, s, 16, 64) for s in global_lengths),
        ]
    if quick:
        return [
            Case("local", 1024, 9, 16, 64),
            Case("local", 1024, 17, 16, 64),
            Case("local", 256, 65, 16, 64),
            Case("local", 4096, 17, 4, 16),
            Case("local", 1024, 17, 16, 64, rotary=True),
            Case("global", 1, 1024, 8, 64),
            Case("global", 1, 2048, 8, 64),
        ]
    # 2-core CPU: 8192 sequences for S = 9 / 17, 1024 for S = 65 (8192 x 65 would need ~10 GiB
    # and minutes per repeat); global stages with N * H = 8.
    return [
        Case("local", 8192, 9, 16, 64),
        Case("local", 8192, 17, 16, 64),
        Case("local", 1024, 65, 16, 64),
        Case("local", 8192, 17, 4, 16),
        Case("local", 8192, 17, 16, 64, rotary=True),
        Case("global", 1, 1024, 8, 64),
        Case("global", 1, 2048, 8, 64),
        Case("global", 1, 4096, 8, 64),
        Case("global", 1, 8192, 8, 64),
    ]


def rotary_tables(case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, case.d, 2, device=device).float() / case.d)
    freqs = torch.arange(case.s, device=device).float()[:, None] * inv_freq[None]
    freqs = torch.cat((freqs, freqs), dim=-1)
    return freqs.cos(), freqs.sin()


def rotate_half_apply(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """MEGABYTE's rotary on (N, S, H, Dh) in fp32: t * cos + rotate_half(t) * sin."""
    a, b = t.float().chunk(2, dim=-1)
    return t.float() * cos[:, None] + torch.cat((-b, a), dim=-1) * sin[:, None]


def make_fns(
    case: Case, device: torch.device, dtype: torch.dtype, peers: dict[str, _sdpa_peers.Attend]
) -> dict[str, dict[str, Callable[[], None]]]:
    """mode ('fwd' / 'fwd+bwd') -> {'mblm': fn, peer name: fn}: what each side runs per step."""
    n, s, h, d = case.n, case.s, case.h, case.d
    gen = torch.Generator(device=device).manual_seed(0)
    xq = torch.randn(n, s, h * d, device=device, dtype=dtype, generator=gen).requires_grad_()
    xkv = torch.randn(n, s, 2 * h * d, device=device, dtype=dtype, generator=gen).requires_grad_()
    grad = torch.randn(n, s, h * d, device=device, dtype=dtype, generator=gen)
    cos, sin = rotary_tables(case, device) if case.rotary else (None, None)

    def views():
        k, v = xkv.chunk(2, dim=-1)  # as MEGABYTE's Attention splits to_kv's output
        return xq.view(n, s, h, d), k.view(n, s, h, d), v.view(n, s, h, d)

    def mblm_fwd() -> torch.Tensor:
        # the model's call: k and v packed as to_kv's output, whose gradient then needs no concat
        q, kv = xq.view(n, s, h, d), xkv.view(n, s, 2, h, d)
        return attention_kv(q, kv, causal=case.causal, cos=cos, sin=sin).reshape(n, s, h * d)

    def peer_fwd(attend):
        def fwd() -> torch.Tensor:
            q, k, v = views()
            if case.rotary:
                q, k = (
                    rotate_half_apply(q, cos, sin).to(dtype),
                    rotate_half_apply(k, cos, sin).to(dtype),
                )
            return attend(q, k, v).reshape(n, s, h * d)

        return fwd

    def inference(fwd):
        def run():
            with torch.no_grad():
                fwd()

        return run

    def train(fwd):
        def run():
            try:
                fwd().backward(grad)
            finally:  # also after a failure: the next function must not accumulate into these
                xq.grad = None
                xkv.grad = None

        return run

    fwds = {"mblm": mblm_fwd, **{name: peer_fwd(attend) for name, attend in peers.items()}}
    return {
        "fwd": {name: inference(f) for name, f in fwds.items()},
        "fwd+bwd": {name: train(f) for name, f in fwds.items()},
    }


def peak_mib(fn: Callable[[], None] | None, device: torch.device) -> float | str:
    """Peak memory of one call, or '' when there is no function or it fails."""
    if fn is None:
        return ""
    try:
        return _common.peak_memory_mib(fn, device)
    except RuntimeError as exc:
        if not _sdpa_peers.context_usable(device):
            raise _sdpa_peers.CudaContextLost(f"memory measurement failed: {exc}") from exc
        return ""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="fewer, smaller shapes, 3 repeats (about a minute)")
    add("--smoke", action="store_true", help="three tiny shapes: checks that the script runs")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 CUDA, f32 CPU")
    add("--repeats", type=int, default=None)
    add("--only", choices=["local", "global"], help="run only the cases of this name")
    add("--peers", help=f"'all' or some of {','.join(_sdpa_peers.ALL_PEERS)} (default: all on "
        "CUDA, sdpa on CPU)")  # fmt: skip
    add("--copy-mib", type=int, help="the bandwidth copy's size (default: 2048 CUDA, 64 CPU)")
    add("--no-csv", action="store_true", help="do not append to benchmarks/results")
    add("--note", default="", help="free text stored with every CSV row")
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.repeats = args.repeats or (3 if args.quick or args.smoke else 5)
    try:
        args.peers = _sdpa_peers.parse_peers(args.peers or ("all" if cuda else "sdpa"))
    except ValueError as exc:
        parser.error(str(exc))
    return args


def measure_mode(case, mode, fns, unavailable, args, detailed, copy_bw):
    """One row (the base columns left out) and the lines printed for it, for one case and mode:
    ``fns`` are mblm's and the peers' functions of the mode (``make_fns``)."""
    device, peers = torch.device(args.device), args.peers
    times, failures = _sdpa_peers.measure(fns, device, repeats=args.repeats)
    peer, t_p = _sdpa_peers.fastest(times, peers) or ("", None)
    t_m = times.get("mblm")
    tags = ("causal", "quick" if args.quick else "", "smoke" if args.smoke else "", args.note)
    note = " ".join(x for x in tags if x)
    details = []
    if detailed:
        if "mblm" in failures:
            details.append(f"mblm fails: {failures['mblm']}")
        details.append(_sdpa_peers.peer_summary(peers, times, failures, unavailable))
        ran = {k: times[k] for k in ("mblm", peer) if k in times}
        shape = (case.n, case.s, case.h, case.d)
        itemsize = getattr(torch, args.dtype).itemsize
        details.append(
            _attention_metrics.speed_note(case.name, shape, itemsize, mode, ran, copy_bw)
        )
        note = "; ".join(x for x in (note, *details) if x)
    train = mode == "fwd+bwd"
    row = dict(
        case=case.name,
        shape=case.shape,
        dtype=args.dtype,
        mode=mode,
        impl_ms=t_m * 1e3 if t_m else "",
        peer=peer if detailed else "sdpa",
        peer_ms=t_p * 1e3 if t_p else "",
        ratio=t_p / t_m if t_m and t_p else "",
        impl_peak_mib=peak_mib(fns["mblm"] if t_m else None, device) if train else "",
        peer_peak_mib=peak_mib(fns[peer] if t_p else None, device) if train else "",
        repeats=args.repeats,
        note=note,
    )
    prec = 3 if device.type == "cuda" else 1  # decimals of printed milliseconds
    ms_m = f"{t_m * 1e3:9.{prec}f} ms" if t_m else "    fails   "
    ms_p = f"{t_p * 1e3:9.{prec}f} ms" if t_p else "    fails   "
    ratio = f"x{t_p / t_m:.2f}" if t_m and t_p else "x -"
    line = f"{case.name:6} {case.shape:28} {mode:7}  mblm {ms_m}  {peer or 'peers'} {ms_p}  {ratio}"
    return row, [line, *(f"{'':8}{x}" for x in details)]


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    # CPU with the default peer: the rows and output of the original CPU benchmark
    detailed = device.type == "cuda" or args.peers != ("sdpa",)
    attends, unavailable = _sdpa_peers.attend_fns(args.peers, causal=True)
    selected = [c for c in cases(device, args.quick, args.smoke) if args.only in (None, c.name)]

    base = _common.base_row(device)
    print(
        f"# {base['device']} | {base['cpu']} | torch {base['torch']} | commit {base['commit']}"
        f" | {args.dtype}"
    )
    if detailed:
        print(
            f"# peers: {', '.join(args.peers)}; ratio = time of the fastest peer that runs / mblm"
        )
        print("# time (>1: mblm faster); peak = extra memory of one fwd+bwd step")
    else:
        print(
            "# ratio = SDPA time / mblm time (>1: mblm faster); peak = extra memory of one fwd+bwd step"
        )
    copy_bw = None
    if detailed and any(c.name == "local" for c in selected):
        copy_mib = args.copy_mib or (2048 if device.type == "cuda" else 64)
        copy_bw = _attention_metrics.copy_bandwidth(device, copy_mib)
        print(f"# copy bandwidth ({copy_mib} MiB copy_, read + written): {copy_bw / 1e9:.0f} GB/s")
    print()

    rows, stopped = [], ""
    try:
        for case in selected:
            fns = make_fns(case, device, getattr(torch, args.dtype), attends)
            for mode in _attention_metrics.MODES:
                row, lines = measure_mode(
                    case, mode, fns[mode], unavailable, args, detailed, copy_bw
                )
                rows.append(dict(base, **row))
                print("\n".join(lines), flush=True)
            del fns
            gc.collect()
    except _sdpa_peers.CudaContextLost as exc:
        stopped = str(exc)

    print("\nsummary")
    columns = ["case", "shape", "mode", "impl_ms", "peer_ms", "ratio", "impl_peak_mib"]
    _common.print_table(
        rows, [*columns[:4], *(["peer"] if detailed else []), *columns[4:], "peer_peak_mib"]
    )
    if not args.no_csv and rows:
        path = _common.append_rows("bench_attention", rows)
        print(f"\nappended {len(rows)} rows to {path}")
    if stopped:
        print(
            f"\nSTOPPED: {stopped}; the cases after it were not measured (run them in a new process)"
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
