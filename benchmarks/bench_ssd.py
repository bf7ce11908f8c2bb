"""mblm ssd_scan (torch.ops.mblm.ssd_fwd / ssd_bwd) vs the chunked SSD algorithm in PyTorch and,
on CUDA, mamba_ssm's Triton kernels.

Usage: python benchmarks/bench_ssd.py [--quick | --smoke] [--device cpu|cuda] [--dtype float32]
                                      [--tokens N] [--mamba-ssm-src DIR] [--no-record]
                                      [--note TEXT]

Peers, each timed against mblm in the same run:

- ``ssd_chunked_ref`` (mblm/ops/reference.py): the "SSD minimal" algorithm of the Mamba2 paper
  (intra-chunk masked products, chunk states, a recurrence over chunks), batched matrix products
  with torch autograd, which is what a user without mamba_ssm's Triton kernels would run.
- mamba_ssm's ``mamba_chunk_scan_combined`` (what its Mamba2 layer calls, chunk 256), on CUDA,
  when benchmarks/_mamba_ssm.py finds mamba_ssm (installed, or its source: --mamba-ssm-src,
  $MBLM_MAMBA_SSM_SRC, build/mamba_ssm_src; triton needed, its compiled extension not). On CPU
  the same slot runs ``_mamba_ssm.reference_chunk_scan`` (mamba_ssm's pure-PyTorch
  ``ssd_minimal_discrete`` behind the Triton function's signature) when mamba_ssm loads, so that
  the argument mapping is exercised there too.

All get what the Mamba2 layer passes: x, B and C split (torch.split) from one
(B, L, d_inner + 2 G N) conv output and dt split from the in_proj output, all requiring grad, with
D (H,), dt_bias and softplus; ssd_scan's arguments map one to one onto mamba_ssm's
(``_mamba_ssm.chunk_scan_like_ssd_scan``: same layouts, dt_eff = softplus(dt + dt_bias) on both).
Shapes: Mamba2 defaults (headdim 64, expand 2, G = 1) at d_model 512 (H = 16), batch 2, L 4096,
d_state 128 and 16; on CUDA also issue 8's shape, d_model 1024 (H = 32 heads of 64), d_state 128
at --tokens tokens (default 2^20 = 1M in 16-bit dtypes, 2^19 in float32, whose fwd+bwd tensors at
1M tokens pass 80 GB), as 1 x tokens and 16 x tokens/16.

Before timing, each peer's y is compared with mblm's: rel_err = max |y_peer - y_mblm| /
max |y_mblm|, printed and kept in the row's note. "fwd" runs under no_grad; "fwd+bwd" runs the
forward and the backward of a fixed upstream gradient; peak = extra memory of one fwd+bwd step.
Times are medians of alternating runs; ratio = peer time / mblm time (> 1: mblm is faster). A
backend that fails (out of memory, a kernel error) gets a row whose note says why, and the run
goes on. Rows are appended to benchmarks/results/bench_ssd.csv unless --no-record; timings taken
while other processes load the machine are not comparable (say so with --note).
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

import _common  # noqa: E402
import _mamba_ssm  # noqa: E402

_common.prefer_checkout()

from mblm.ops.reference import ssd_chunked_ref  # noqa: E402
from mblm.ops.ssd import ssd_scan  # noqa: E402

MAMBA_SSM_CHUNK = 256  # mamba_ssm's Mamba2 default chunk_size


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


def cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    if args.smoke:
        return [Case(1, 256, 32, 16, headdim=16)]
    length = 1024 if args.quick else 4096
    out = [Case(2, length, 512, 128), Case(2, length, 512, 16)]
    if device.type == "cuda":
        tokens = args.tokens or (2**19 if args.dtype == "float32" else 2**20)
        if args.quick:
            tokens //= 8
        out += [Case(1, tokens, 1024, 128), Case(16, tokens // 16, 1024, 128)]
    return out


@dataclasses.dataclass
class Inputs:
    case: Case
    xbc: torch.Tensor  # (B, L, H P + 2 G N): the conv output x, B and C are split from
    proj: torch.Tensor  # (B, L, 2 H P + H): the in_proj output dt is split from
    A: torch.Tensor
    D: torch.Tensor
    dt_bias: torch.Tensor
    grad: torch.Tensor  # upstream gradient of y

    def leaves(self) -> tuple[torch.Tensor, ...]:
        return self.xbc, self.proj, self.A, self.D, self.dt_bias

    def views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, dt, B, C) as the Mamba2 layer makes them: torch.split, so that the backward
        assembles each base's gradient once (slicing would zero-fill a full base per slice)."""
        c = self.case
        b, length, h, p, g, n = c.batch, c.length, c.heads, c.headdim, c.groups, c.d_state
        x, B, C = torch.split(self.xbc, [h * p, g * n, g * n], dim=-1)
        dt = torch.split(self.proj, [2 * h * p, h], dim=-1)[1]
        return x.view(b, length, h, p), dt, B.view(b, length, g, n), C.view(b, length, g, n)


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype) -> Inputs:
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
    return Inputs(case, xbc, proj, A, D, dt_bias, randn(b, length, h, p))


Scan = Callable[[Inputs], torch.Tensor]  # inputs -> y (B, L, H, P)


def run_mblm(inp: Inputs) -> torch.Tensor:
    x, dt, B, C = inp.views()
    return ssd_scan(x, dt, inp.A, B, C, inp.D, inp.dt_bias, True)[0]


def chunked_ref_peer(chunk_size: int) -> Scan:
    def run(inp: Inputs) -> torch.Tensor:
        x, dt, B, C = inp.views()
        return ssd_chunked_ref(x, dt, inp.A, B, C, inp.D, inp.dt_bias, True, None, chunk_size)[0]

    return run


def mamba_ssm_peer(chunk_scan: Callable, chunk_size: int) -> Scan:
    def run(inp: Inputs) -> torch.Tensor:
        x, dt, B, C = inp.views()
        return _mamba_ssm.chunk_scan_like_ssd_scan(
            chunk_scan, chunk_size, x, dt, inp.A, B, C, inp.D, inp.dt_bias, True
        )

    return run


def peers(args: argparse.Namespace, device: torch.device) -> dict[str, Scan]:
    """The peers this run measures, by the name stored in the rows' peer column."""
    out = {f"ssd_chunked_ref/{args.chunk_size}": chunked_ref_peer(args.chunk_size)}
    ms, why = _mamba_ssm.load_mamba_ssm(args.mamba_ssm_src)
    print(f"# mamba_ssm: {why}")
    if ms is None:
        print("# mamba_ssm peer: not measured")
    elif device.type == "cuda":
        out[f"mamba_ssm/{MAMBA_SSM_CHUNK}"] = mamba_ssm_peer(
            ms.chunk_scan_combined, MAMBA_SSM_CHUNK
        )
    else:
        print("# mamba_ssm's Triton kernels need CUDA: on CPU its pure-PyTorch reference runs")
        out[f"mamba_ssm-torch-ref/{MAMBA_SSM_CHUNK}"] = mamba_ssm_peer(
            _mamba_ssm.reference_chunk_scan, MAMBA_SSM_CHUNK
        )
    return out


def inference(run: Scan, inp: Inputs) -> Callable[[], None]:
    def call() -> None:
        with torch.no_grad():
            run(inp)

    return call


def train(run: Scan, inp: Inputs) -> Callable[[], None]:
    def call() -> None:
        run(inp).backward(inp.grad)
        for t in inp.leaves():
            t.grad = None

    return call


def relative_error(run: Scan, inp: Inputs, want: torch.Tensor) -> float:
    with torch.no_grad():
        got = run(inp)
        err = (got.float() - want.float()).abs().max() / want.float().abs().max()
    return err.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="L = 1024, 1/8 tokens, 2 repeats")
    mode.add_argument("--smoke", action="store_true", help="one tiny case, 1 repeat (tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=64, help="ssd_chunked_ref's chunk size")
    parser.add_argument(
        "--tokens", type=int, default=0, help="tokens of the CUDA d_model 1024 cases (B x L)"
    )
    parser.add_argument("--mamba-ssm-src", default=None, help="mamba_ssm's source folder")
    parser.add_argument(
        "--no-record",
        "--no-csv",
        dest="no_record",
        action="store_true",
        help="do not append to the CSV",
    )
    parser.add_argument("--note", default="", help="free text stored with every CSV row")
    args = parser.parse_args()

    device = torch.device(args.device)
    _common.require_kernels(device)
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or (1 if args.smoke else 2 if args.quick else 5)
    base = _common.base_row(device)
    print(
        f"# {base['device']} | {base['cpu']} | torch {base['torch']} | commit {base['commit']}"
        f" | {args.dtype}"
    )
    others = peers(args, device)
    print("# ratio = peer time / mblm time (>1: mblm faster)")
    print("# peak = extra memory of one fwd+bwd step\n")
    run_note = " ".join(x for x in ("quick" if args.quick else "", args.note) if x)

    rows = []
    for case in cases(args, device):
        rows += measure_case(case, others, device, dtype, repeats, args.dtype, base, run_note)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print("\nsummary")
    _common.print_table(
        rows,
        ("shape", "peer", "mode", "impl_ms", "peer_ms", "ratio", "impl_peak_mib",
         "peer_peak_mib", "note"),
    )  # fmt: skip
    if not args.no_record:
        path = _common.append_rows("bench_ssd", rows)
        print(f"\nappended {len(rows)} rows to {path}")


def measure_case(
    case: Case,
    others: dict[str, Scan],
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    dtype_name: str,
    base: dict,
    run_note: str,
) -> list[dict]:
    """Rows of one case: for every peer, fwd and fwd+bwd against mblm."""

    def row(peer: str, mode: str, note: str = "", **fields) -> dict:
        note = " ".join(x for x in (note, run_note) if x)
        return dict(
            base, case="mamba2", shape=case.shape, dtype=dtype_name, mode=mode, peer=peer,
            repeats=repeats, note=note, **fields,
        )  # fmt: skip

    inp, failed = _common.attempt(lambda: make_inputs(case, device, dtype), device)
    if inp is None:
        print(f"{case.shape}: inputs failed: {failed}", flush=True)
        return [row(name, "fwd", note=f"inputs failed: {failed}") for name in others]
    errors, failed = _common.attempt(lambda: peer_errors(inp, others, device), device)
    if errors is None:
        print(f"{case.shape}: mblm failed: {failed}", flush=True)
        return [row(name, "fwd", note=f"mblm failed: {failed}") for name in others]

    rows = []
    mem_m, mem_m_failed = _common.attempt(
        lambda: _common.peak_memory_mib(train(run_mblm, inp), device), device
    )
    for name, run in others.items():
        if isinstance(errors[name], str):
            print(f"{case.shape} {name}: failed: {errors[name]}", flush=True)
            rows.append(row(name, "fwd", note=f"peer failed: {errors[name]}"))
            continue
        print(f"{case.shape} {name}: rel_err {errors[name]:.2e}", flush=True)
        for mode, make in (("fwd", inference), ("fwd+bwd", train)):
            note = f"rel_err={errors[name]:.2e}"
            times, failed = _common.attempt(
                lambda make=make, run=run: _common.time_pair(
                    make(run_mblm, inp), make(run, inp), device, repeats=repeats
                ),
                device,
            )
            if times is None:
                print(f"{case.shape} {name} {mode}: failed: {failed}", flush=True)
                rows.append(row(name, mode, note=f"{note} failed: {failed}"))
                continue
            t_m, t_p = times
            fields: dict = dict(impl_ms=t_m * 1e3, peer_ms=t_p * 1e3, ratio=t_p / t_m)
            if mode == "fwd+bwd":
                mem_p, failed = _common.attempt(
                    lambda run=run: _common.peak_memory_mib(train(run, inp), device), device
                )
                fields.update(impl_peak_mib="" if mem_m is None else mem_m)
                fields.update(peer_peak_mib="" if mem_p is None else mem_p)
                note += f" mblm peak failed: {mem_m_failed}" if mem_m_failed else ""
                note += f" peer peak failed: {failed}" if failed else ""
            rows.append(row(name, mode, note=note, **fields))
            print(
                f"{case.shape:40} {name:24} {mode:7}  mblm {t_m * 1e3:9.2f} ms  "
                f"peer {t_p * 1e3:9.2f} ms  x{t_p / t_m:.2f}",
                flush=True,
            )
    return rows


def peer_errors(inp: Inputs, others: dict[str, Scan], device: torch.device) -> dict:
    """Per peer: max |y_peer - y_mblm| / max |y_mblm| of one forward, or why the peer failed.
    Raises when mblm itself fails. Nothing stays allocated afterwards."""
    with torch.no_grad():
        want = run_mblm(inp).float()
        scale = want.abs().max()
        errors: dict = {}
        for name, run in others.items():
            got, failed = _common.attempt(lambda run=run: run(inp), device)
            if got is None:
                errors[name] = failed
                continue
            errors[name] = ((got.float() - want).abs().max() / scale).item()
            del got
    return errors


if __name__ == "__main__":
    main()
