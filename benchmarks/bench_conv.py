"""Causal depthwise conv1d (+ SiLU) fwd and fwd+bwd: mblm's conv op vs the PyTorch peer.

The peer is what mambapy and mamba_ssm's fallback compute: ``F.conv1d(groups=C, padding=K-1)``
on the (B, C, L) transpose of the projection output, sliced to L, then SiLU. Both read x as that
transposed view of a (B, L, 2C) projection slice, as the Mamba mixers do.

    python benchmarks/bench_conv.py [--quick] [--device cpu] [--no-csv] [--note TEXT]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

_common.prefer_checkout()

from mblm.ops.conv import causal_conv1d  # noqa: E402

# (batch, length, channels, width): Mamba1 d_model 512 (ED 1024), Mamba2 d_model 512
# (conv over x, B, C: 1024 + 2 * 128), Mamba2 d_model 1024.
CASES = [(2, 4096, 1024, 4), (2, 4096, 1280, 4), (2, 8192, 2304, 4)]
QUICK = [(2, 1024, 1024, 4), (1, 2048, 1280, 4)]


def make_fns(batch, length, channels, width, device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    proj = torch.randn(batch, length, 2 * channels, device=device, dtype=dtype, generator=gen)
    proj.requires_grad_()
    weight = torch.randn(channels, 1, width, device=device, dtype=dtype, generator=gen) * 0.3
    bias = torch.randn(channels, device=device, dtype=dtype, generator=gen)
    weight.requires_grad_()
    bias.requires_grad_()
    grad = torch.randn(batch, channels, length, device=device, dtype=dtype, generator=gen)

    def ours():
        x = proj[:, :, :channels].transpose(1, 2)
        return causal_conv1d(x, weight[:, 0], bias, None, activation=True)[0]

    def peer():
        x = proj[:, :, :channels].transpose(1, 2)
        y = F.conv1d(x, weight, bias, padding=width - 1, groups=channels)[:, :, :length]
        return F.silu(y)

    def inference(fwd):
        def run():
            with torch.no_grad():
                fwd()

        return run

    def train(fwd):
        def run():
            fwd().backward(grad)
            proj.grad = weight.grad = bias.grad = None

        return run

    return (inference(ours), inference(peer)), (train(ours), train(peer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-csv", action="store_true", help="do not append to benchmarks/results")
    parser.add_argument("--note", default="", help="free text stored with every CSV row")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or (3 if args.quick else 7)
    base = _common.base_row(device)
    print(f"# {base['device']} | {base['cpu']} | torch {base['torch']} | commit {base['commit']}")
    print("# ratio = F.conv1d+silu time / mblm time (>1: mblm faster)\n")
    rows = []
    for batch, length, channels, width in QUICK if args.quick else CASES:
        shape = f"B={batch} L={length} C={channels} K={width}"
        (inf_m, inf_p), (tr_m, tr_p) = make_fns(batch, length, channels, width, device, dtype)
        mem_m = _common.peak_memory_mib(tr_m, device)
        mem_p = _common.peak_memory_mib(tr_p, device)
        for mode, fm, fp in (("fwd", inf_m, inf_p), ("fwd+bwd", tr_m, tr_p)):
            t_m, t_p = _common.time_pair(fm, fp, device, repeats=repeats)
            rows.append(
                dict(
                    base,
                    case="causal_conv1d_silu",
                    shape=shape,
                    dtype=args.dtype,
                    mode=mode,
                    impl_ms=t_m * 1e3,
                    peer="F.conv1d+silu",
                    peer_ms=t_p * 1e3,
                    ratio=t_p / t_m,
                    impl_peak_mib=mem_m if mode == "fwd+bwd" else "",
                    peer_peak_mib=mem_p if mode == "fwd+bwd" else "",
                    repeats=repeats,
                    note=" ".join(x for x in ("quick" if args.quick else "", args.note) if x),
                )
            )
            print(
                f"{shape:30} {mode:7} mblm {t_m * 1e3:8.2f} ms  peer {t_p * 1e3:8.2f} ms"
                f"  x{t_p / t_m:.2f}",
                flush=True,
            )
    print("\nsummary")
    _common.print_table(
        rows, ("shape", "mode", "impl_ms", "peer_ms", "ratio", "impl_peak_mib", "peer_peak_mib")
    )
    if not args.no_csv:
        print(f"\nappended {len(rows)} rows to {_common.append_rows('bench_conv', rows)}")


if __name__ == "__main__":
    main()
