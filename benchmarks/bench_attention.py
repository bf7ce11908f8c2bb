"""mblm attention (torch.ops.mblm.attn_fwd / attn_bwd) vs torch's scaled_dot_product_attention.

Usage: python benchmarks/bench_attention.py [--quick] [--device cpu|cuda] [--dtype float32]

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
one fwd+bwd step (CPU: sampled resident set size; CUDA: max_memory_allocated). Every row is
appended to benchmarks/results/bench_attention.csv.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

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


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        big = 2 if quick else 8  # the local-stage sequence counts scale with the GPU
        return [
            Case("local", 8192 * big, 9, 16, 64),
            Case("local", 8192 * big, 17, 16, 64),
            Case("local", 2048 * big, 65, 16, 64),
            Case("local", 8192 * big, 17, 4, 16),
            Case("local", 8192 * big, 17, 16, 64, rotary=True),
            Case("global", 4, 1024, 16, 64),
            Case("global", 4, 2048, 16, 64),
            Case("global", 2, 4096, 16, 64),
            Case("global", 1, 8192, 16, 64),
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


def make_fns(case: Case, device: torch.device, dtype: torch.dtype):
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

    def peer_fwd() -> torch.Tensor:
        q, k, v = views()
        if case.rotary:
            q, k = (
                rotate_half_apply(q, cos, sin).to(dtype),
                rotate_half_apply(k, cos, sin).to(dtype),
            )
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=case.causal
        )
        return out.transpose(1, 2).reshape(n, s, h * d)

    def inference(fwd):
        def run():
            with torch.no_grad():
                fwd()

        return run

    def train(fwd):
        def run():
            fwd().backward(grad)
            xq.grad = None
            xkv.grad = None

        return run

    return (inference(mblm_fwd), inference(peer_fwd)), (train(mblm_fwd), train(peer_fwd))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small shapes, 3 repeats (about a minute)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--only", default=None, help="run only cases whose name is this (local / global)"
    )
    parser.add_argument("--no-csv", action="store_true", help="do not append to benchmarks/results")
    parser.add_argument("--note", default="", help="free text stored with every CSV row")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or (3 if args.quick else 5)
    base = _common.base_row(device)
    print(
        f"# {base['device']} | {base['cpu']} | torch {base['torch']} | commit {base['commit']} | {args.dtype}"
    )
    print(
        "# ratio = SDPA time / mblm time (>1: mblm faster); peak = extra memory of one fwd+bwd step\n"
    )

    rows = []
    for case in cases(device, args.quick):
        if args.only and case.name != args.only:
            continue
        (inf_m, inf_p), (tr_m, tr_p) = make_fns(case, device, dtype)
        mem_m = _common.peak_memory_mib(tr_m, device)
        mem_p = _common.peak_memory_mib(tr_p, device)
        for mode, fm, fp in (("fwd", inf_m, inf_p), ("fwd+bwd", tr_m, tr_p)):
            t_m, t_p = _common.time_pair(fm, fp, device, repeats=repeats)
            row = dict(
                base,
                case=case.name,
                shape=case.shape,
                dtype=args.dtype,
                mode=mode,
                impl_ms=t_m * 1e3,
                peer="sdpa",
                peer_ms=t_p * 1e3,
                ratio=t_p / t_m,
                impl_peak_mib=mem_m if mode == "fwd+bwd" else "",
                peer_peak_mib=mem_p if mode == "fwd+bwd" else "",
                repeats=repeats,
                note=" ".join(x for x in ("causal", "quick" if args.quick else "", args.note) if x),
            )
            rows.append(row)
            print(
                f"{case.name:6} {case.shape:28} {mode:7}  mblm {t_m * 1e3:9.1f} ms  sdpa {t_p * 1e3:9.1f} ms"
                f"  x{t_p / t_m:.2f}",
                flush=True,
            )
        del inf_m, inf_p, tr_m, tr_p
        gc.collect()

    print("\nsummary")
    _common.print_table(
        rows,
        ("case", "shape", "mode", "impl_ms", "peer_ms", "ratio", "impl_peak_mib", "peer_peak_mib"),
    )
    if not args.no_csv:
        path = _common.append_rows("bench_attention", rows)
        print(f"\nappended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
