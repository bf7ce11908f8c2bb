"""mblm ssd_scan (torch.ops.mblm.ssd_fwd / ssd_bwd) vs the chunked SSD algorithm in PyTorch.

Usage: python benchmarks/bench_ssd.py [--quick] [--device cpu|cuda] [--dtype float32]
                                      [--no-record] [--note TEXT]

The peer is ``ssd_chunked_ref`` (mblm/ops/reference.py): the "SSD minimal" algorithm of the
Mamba2 paper (intra-chunk masked products, chunk states, a recurrence over chunks), batched
matrix products with torch autograd, which is what a user without mamba_ssm's Triton kernels
would run. Both sides get what the Mamba2 layer passes: x, B and C split (torch.split) from one
(B, L, d_inner + 2 G N) conv output and dt split from the in_proj output, all requiring grad,
with D (H,), dt_bias and softplus. Shapes: Mamba2 defaults (headdim 64, expand 2, G = 1) at
d_model 512 (H = 16), batch 2, L 4096, d_state 128 and 16.

"fwd" runs under no_grad; "fwd+bwd" runs the forward and the backward of a fixed upstream
gradient. Times are medians of alternating runs; ratio = peer time / mblm time (> 1: mblm is
faster). Rows are appended to benchmarks/results/bench_ssd.csv unless --no-record; timings
taken while other processes load the machine are not comparable (say so with --note).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

_common.prefer_checkout()

from mblm.ops.reference import ssd_chunked_ref  # noqa: E402
from mblm.ops.ssd import ssd_scan  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    length: int
    d_model: int
    d_state: int
    headdim: int = 64
    expand: int = 2
    groups: int = 1

    @property
    def heads(self) -> int:
        return self.expand * self.d_model // self.headdim

    @property
    def shape(self) -> str:
        return (
            f"B={self.batch} L={self.length} H={self.heads} P={self.headdim} "
            f"G={self.groups} N={self.d_state}"
        )


def cases(quick: bool) -> list[Case]:
    length = 1024 if quick else 4096
    return [Case(2, length, 512, 128), Case(2, length, 512, 16)]


def make_fns(case: Case, device: torch.device, dtype: torch.dtype, chunk_size: int):
    b, length, h, p, g, n = (
        case.batch, case.length, case.heads, case.headdim, case.groups, case.d_state
    )  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    xbc = randn(b, length, h * p + 2 * g * n).requires_grad_()
    proj = randn(b, length, 2 * h * p + h).requires_grad_()
    A = (-torch.empty(h, device=device).uniform_(1, 16, generator=gen)).requires_grad_()
    D = torch.ones(h, device=device).requires_grad_()
    dt_bias = (torch.rand(h, device=device, generator=gen) * 2 - 4).requires_grad_()
    grad = randn(b, length, h, p)

    def views():
        # torch.split, as the Mamba2 layer splits its tensors: the backward assembles each
        # base's gradient once (slicing would zero-fill a full base per slice)
        x, B, C = torch.split(xbc, [h * p, g * n, g * n], dim=-1)
        dt = torch.split(proj, [2 * h * p, h], dim=-1)[1]
        return x.view(b, length, h, p), dt, B.view(b, length, g, n), C.view(b, length, g, n)

    def mblm_fwd():
        x, dt, B, C = views()
        return ssd_scan(x, dt, A, B, C, D, dt_bias, True)[0]

    def peer_fwd():
        x, dt, B, C = views()
        return ssd_chunked_ref(x, dt, A, B, C, D, dt_bias, True, None, chunk_size)[0]

    def inference(fwd):
        def run():
            with torch.no_grad():
                fwd()

        return run

    def train(fwd):
        def run():
            fwd().backward(grad)
            for t in (xbc, proj, A, D, dt_bias):
                t.grad = None

        return run

    return (inference(mblm_fwd), inference(peer_fwd)), (train(mblm_fwd), train(peer_fwd))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="L = 1024, 2 repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--chunk-size", type=int, default=64, help="the peer's chunk size (mamba_ssm uses 256)"
    )
    parser.add_argument("--no-record", action="store_true", help="do not append to the CSV")
    parser.add_argument("--note", default="", help="free text stored with every CSV row")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or (2 if args.quick else 5)
    base = _common.base_row(device)
    print(
        f"# {base['device']} | {base['cpu']} | torch {base['torch']} | commit {base['commit']}"
        f" | {args.dtype}"
    )
    print(f"# ratio = ssd_chunked_ref (chunk {args.chunk_size}) time / mblm time (>1: mblm faster)")
    print("# peak = extra memory of one fwd+bwd step\n")

    rows = []
    for case in cases(args.quick):
        (inf_m, inf_p), (tr_m, tr_p) = make_fns(case, device, dtype, args.chunk_size)
        mem_m = _common.peak_memory_mib(tr_m, device)
        mem_p = _common.peak_memory_mib(tr_p, device)
        for mode, fm, fp in (("fwd", inf_m, inf_p), ("fwd+bwd", tr_m, tr_p)):
            t_m, t_p = _common.time_pair(fm, fp, device, repeats=repeats)
            note = " ".join(x for x in ("quick" if args.quick else "", args.note) if x)
            row = dict(
                base,
                case="mamba2",
                shape=case.shape,
                dtype=args.dtype,
                mode=mode,
                impl_ms=t_m * 1e3,
                peer=f"ssd_chunked_ref/{args.chunk_size}",
                peer_ms=t_p * 1e3,
                ratio=t_p / t_m,
                impl_peak_mib=mem_m if mode == "fwd+bwd" else "",
                peer_peak_mib=mem_p if mode == "fwd+bwd" else "",
                repeats=repeats,
                note=note,
            )
            rows.append(row)
            print(
                f"{case.shape:36} {mode:7}  mblm {t_m * 1e3:9.1f} ms  chunked {t_p * 1e3:9.1f} ms"
                f"  x{t_p / t_m:.2f}",
                flush=True,
            )
        del inf_m, inf_p, tr_m, tr_p
        gc.collect()

    print("\nsummary")
    _common.print_table(
        rows, ("shape", "mode", "impl_ms", "peer_ms", "ratio", "impl_peak_mib", "peer_peak_mib")
    )
    if not args.no_record:
        path = _common.append_rows("bench_ssd", rows)
        print(f"\nappended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
