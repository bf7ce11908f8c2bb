"""One Mamba2 layer: mblm's ``Mamba2`` mixer vs mamba_ssm's ``Mamba2(use_mem_eff_path=False)``
with identical weights, fwd and fwd+bwd tokens/s and peak memory at several lengths.

Usage:
    python benchmarks/bench_mamba_layer.py [--device cuda] [--lengths 16384,32768,...]
        [--batch 1] [--no-autocast] [--quick] [--mamba-ssm-src DIR] [--no-csv] [--note TEXT]
    python benchmarks/bench_mamba_layer.py --device cpu --smoke --no-csv   # tests

The layer: d_model 1024, d_state 128, headdim 64, expand 2 (32 heads), ngroups 1, chunk 256;
parameters float32, input (B, L, 1024) float32, run under bf16 autocast on CUDA (--no-autocast:
float32). mamba_ssm comes from benchmarks/_mamba_ssm.py (installed, or its source without the
compiled extension: --mamba-ssm-src, $MBLM_MAMBA_SSM_SRC, build/mamba_ssm_src; needs triton).
mblm's layer is ``mblm.model.mamba2.Mamba2``, whose parameter tree is mamba_ssm's: mamba_ssm's
freshly built layer's state_dict is loaded into it with strict=True, so both compute with the
same weights. On CUDA mamba_ssm runs its Triton SSD scan and gated RMSNorm and nn.Conv1d (or
causal_conv1d when installed); mblm runs torch.ops.mblm.conv1d_fwd/bwd and ssd_fwd/bwd (its CUDA
kernels) and cuBLAS projections.

On CPU mamba_ssm's Triton kernels cannot run: its layer then runs with its scan and norm swapped
for pure-PyTorch code from mamba_ssm (``_mamba_ssm.torch_reference_kernels``), and without triton
mblm's layer runs alone (said in the output).
mambapy's Mamba1 layer (``MambaBlock``, d_state 16: what the original mblm builds without
mamba_ssm) is a further peer when mambapy is importable; it is another layer (throughput only).

Before timing, at every length, the outputs of mblm and mamba_ssm on one input are compared
(max |out_mblm - out_mamba_ssm|, printed and kept in the row's note; with autocast also once in
float32 at the first length, where mamba_ssm's Triton matrix products still round their inputs
to TF32 unless TRITON_F32_DEFAULT=ieee is set: tests/model/test_mamba2_vs_mamba_ssm.py is the
exact comparison). Times are medians of alternating runs; ratio = peer time / mblm
time (> 1: mblm faster); tokens/s = B * L / time; peak = extra memory of one call. A backend that
fails (out of memory, a kernel error) gets a row whose note says why, and the run goes on. Rows
are appended to benchmarks/results/bench_mamba_layer.csv unless --no-csv.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import _mamba_ssm  # noqa: E402

_common.prefer_checkout()

from mblm.model.mamba2 import Mamba2  # noqa: E402

LAYER = dict(d_model=1024, d_state=128, headdim=64, expand=2)
SMOKE_LAYER = dict(d_model=32, d_state=16, headdim=16, expand=2, chunk_size=32)
LENGTHS = (16384, 32768, 65536, 131072, 262144)

Forward = Callable[[torch.Tensor], torch.Tensor]  # (B, L, D) -> (B, L, D)


def build(
    args: argparse.Namespace, device: torch.device
) -> tuple[Forward, dict[str, Forward], list[torch.nn.Module], str]:
    """mblm's forward, the peers' forwards by name, all modules (for zeroing gradients), and
    what happened to mamba_ssm."""
    kwargs = SMOKE_LAYER if args.smoke else LAYER
    torch.manual_seed(0)
    ours = Mamba2(**kwargs).to(device)
    modules: list[torch.nn.Module] = [ours]
    peers: dict[str, Forward] = {}

    ms, why = _mamba_ssm.load_mamba_ssm(args.mamba_ssm_src)
    if ms is not None:
        theirs = ms.Mamba2(**kwargs, use_mem_eff_path=False).to(device)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        modules.append(theirs)
        if device.type == "cuda":
            peers["mamba_ssm Mamba2"] = theirs
        else:
            why += "; on CPU with its torch reference scan and norm"
            peers["mamba_ssm Mamba2 (torch refs)"] = _in_reference_mode(theirs)
    else:
        why = f"not measured: {why}"

    if importlib.util.find_spec("mambapy") is not None:
        from mambapy.mamba import MambaBlock, MambaConfig

        mamba1 = MambaBlock(MambaConfig(d_model=kwargs["d_model"], n_layers=1)).to(device)
        modules.append(mamba1)
        peers["mambapy Mamba1 layer"] = mamba1
    return ours, peers, modules, why


def _in_reference_mode(layer: torch.nn.Module) -> Forward:
    def forward(u: torch.Tensor) -> torch.Tensor:
        with _mamba_ssm.torch_reference_kernels():
            return layer(u)

    return forward


class Runner:
    """The timed calls of one input: forward under no_grad, or forward + backward."""

    def __init__(self, u, grad, modules, device, autocast: bool) -> None:
        self.u, self.grad, self.modules = u, grad, modules
        self.device, self.autocast = device, autocast

    def precision(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def output(self, forward: Forward) -> torch.Tensor:
        with torch.no_grad(), self.precision():
            return forward(self.u)

    def fwd(self, forward: Forward) -> Callable[[], None]:
        def call() -> None:
            self.output(forward)

        return call

    def fwd_bwd(self, forward: Forward) -> Callable[[], None]:
        def call() -> None:
            with self.precision():
                out = forward(self.u)
            out.backward(self.grad.to(out.dtype))
            self.u.grad = None
            for module in self.modules:
                for p in module.parameters():
                    p.grad = None

        return call


def max_abs_diff(runner: Runner, ours: Forward, theirs: Forward) -> tuple[float, float]:
    """(max |out_mblm - out_peer|, max |out_peer|) on the runner's input."""
    want = runner.output(theirs).float()
    got = runner.output(ours).float()
    return (got - want).abs().max().item(), want.abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="16K and 64K tokens, 2 repeats")
    size.add_argument("--smoke", action="store_true", help="a tiny layer, L = 64, 1 repeat")
    parser.add_argument("--lengths", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 1; smoke 2)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--no-autocast", action="store_true", help="float32 on CUDA too (CPU always is)"
    )
    parser.add_argument("--mamba-ssm-src", default=None, help="mamba_ssm's source folder")
    parser.add_argument("--no-csv", action="store_true", help="do not append to benchmarks/results")
    parser.add_argument("--note", default="", help="free text stored with every CSV row")
    args = parser.parse_args()

    device = torch.device(args.device)
    _common.require_kernels(device)
    autocast = device.type == "cuda" and not args.no_autocast
    if args.lengths:
        lengths = [int(n) for n in args.lengths.split(",")]
    else:
        lengths = [64] if args.smoke else [16384, 65536] if args.quick else list(LENGTHS)
    batch = args.batch or (2 if args.smoke else 1)
    repeats = args.repeats or (1 if args.smoke else 2 if args.quick else 5)
    precision = "bf16-autocast" if autocast else "float32"

    base = _common.base_row(device)
    print(f"# {base['device']} | torch {base['torch']} | commit {base['commit']} | {precision}")
    ours, peers, modules, why = build(args, device)
    print(f"# mamba_ssm: {why}")
    if not peers:
        print("# no peer available here: mblm's layer runs alone")
    print("# ratio = peer time / mblm time (>1: mblm faster); peak = extra memory of one call\n")

    rows = []
    for i, length in enumerate(lengths):
        rows += measure_length(
            args, device, ours, peers, modules, batch, length, repeats, autocast, i == 0, base
        )
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print("\nsummary")
    _common.print_table(
        rows,
        ("shape", "peer", "mode", "impl_ms", "peer_ms", "ratio", "mblm_tok_s", "peer_tok_s",
         "impl_peak_mib", "peer_peak_mib", "note"),
    )  # fmt: skip
    if not args.no_csv:
        path = _common.append_rows("bench_mamba_layer", rows)
        print(f"\nappended {len(rows)} rows to {path}")


def measure_length(
    args, device, ours, peers, modules, batch, length, repeats, autocast, first, base
) -> list[dict]:
    d_model = (SMOKE_LAYER if args.smoke else LAYER)["d_model"]
    shape = f"B={batch} L={length} D={d_model}"
    precision = "bf16-autocast" if autocast else "float32"
    gen = torch.Generator(device=device).manual_seed(length)
    u = torch.randn(batch, length, d_model, device=device, generator=gen).requires_grad_()
    grad = torch.randn(batch, length, d_model, device=device, generator=gen)
    runner = Runner(u, grad, modules, device, autocast)
    tokens = batch * length

    def row(peer: str, mode: str, note: str, **fields) -> dict:
        note = " ".join(x for x in (note, args.note) if x)
        return dict(
            base, case="mamba2_layer", shape=shape, dtype=precision, mode=mode, peer=peer,
            repeats=repeats, note=note, **fields,
        )  # fmt: skip

    notes = {name: "" for name in peers}
    for name, forward in peers.items():
        if not name.startswith("mamba_ssm"):
            continue
        diff, failed = _common.attempt(lambda f=forward: max_abs_diff(runner, ours, f), device)
        if diff is None:
            notes[name] = f"parity failed: {failed}"
            print(f"{shape} {name}: parity check failed: {failed}", flush=True)
            continue
        notes[name] = f"max_abs_diff={diff[0]:.3g} (max|out|={diff[1]:.3g}, {precision})"
        print(f"{shape} {name}: max |out_mblm - out_peer| = {diff[0]:.3g} "
              f"(max |out| {diff[1]:.3g}, {precision})", flush=True)  # fmt: skip
        if first and autocast:
            exact = Runner(u, grad, modules, device, autocast=False)
            diff, failed = _common.attempt(
                lambda f=forward, r=exact: max_abs_diff(r, ours, f), device
            )
            text = failed or f"{diff[0]:.3g} (max |out| {diff[1]:.3g})"
            tf32 = os.environ.get("TRITON_F32_DEFAULT", "tf32")
            print(
                f"{shape} {name}: float32 max |out_mblm - out_peer| = {text} "
                f"(mamba_ssm's Triton dots: {tf32})",
                flush=True,
            )
            notes[name] += f" float32_max_abs_diff={diff[0]:.3g}" if diff else ""

    rows = []
    if not peers:
        for mode, make in (("fwd", runner.fwd), ("fwd+bwd", runner.fwd_bwd)):
            times, failed = _common.attempt(
                lambda make=make: _common.time_fn(make(ours), device, repeats=repeats), device
            )
            if times is None:
                rows.append(row("", mode, f"mblm failed: {failed}"))
                continue
            t = statistics.median(times)
            mem, _ = _common.attempt(
                lambda make=make: _common.peak_memory_mib(make(ours), device), device
            )
            rows.append(row("", mode, "no peer", impl_ms=t * 1e3, mblm_tok_s=tokens / t,
                            impl_peak_mib="" if mem is None else mem))  # fmt: skip
            print(
                f"{shape} mblm alone {mode}: {t * 1e3:.2f} ms, {tokens / t:.4g} tok/s", flush=True
            )
        return rows

    for name, forward in peers.items():
        for mode, make in (("fwd", runner.fwd), ("fwd+bwd", runner.fwd_bwd)):
            times, failed = _common.attempt(
                lambda make=make, f=forward: _common.time_pair(
                    make(ours), make(f), device, repeats=repeats
                ),
                device,
            )
            if times is None:
                print(f"{shape} {name} {mode}: failed: {failed}", flush=True)
                rows.append(row(name, mode, f"{notes[name]} failed: {failed}".strip()))
                continue
            t_m, t_p = times
            mem_m, failed_m = _common.attempt(
                lambda make=make: _common.peak_memory_mib(make(ours), device), device
            )
            mem_p, failed_p = _common.attempt(
                lambda make=make, f=forward: _common.peak_memory_mib(make(f), device), device
            )
            note = notes[name]
            note += f" mblm peak failed: {failed_m}" if failed_m else ""
            note += f" peer peak failed: {failed_p}" if failed_p else ""
            rows.append(
                row(
                    name, mode, note.strip(), impl_ms=t_m * 1e3, peer_ms=t_p * 1e3,
                    ratio=t_p / t_m, mblm_tok_s=tokens / t_m, peer_tok_s=tokens / t_p,
                    impl_peak_mib="" if mem_m is None else mem_m,
                    peer_peak_mib="" if mem_p is None else mem_p,
                )
            )  # fmt: skip
            print(
                f"{shape} {name} {mode}: mblm {t_m * 1e3:.2f} ms ({tokens / t_m:.4g} tok/s), "
                f"peer {t_p * 1e3:.2f} ms ({tokens / t_p:.4g} tok/s), x{t_p / t_m:.2f}",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
