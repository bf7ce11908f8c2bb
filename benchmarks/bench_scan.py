"""mblm selective scan (torch.ops.mblm.scan_fwd / scan_bwd) vs mambapy's parallel scan.

Usage: python benchmarks/bench_scan.py [--quick | --smoke] [--no-record] [--note TEXT]
                                       [--device cpu|cuda] [--mamba-ssm-src DIR]

The peer is what the original mblm runs for its Mamba1 blocks when mamba_ssm is missing (always
on CPU): mambapy's ``MambaBlock.selective_scan`` with its Blelloch parallel scan ``pscan``. It is
NOT imported: ``_MambapyPScan`` / ``mambapy_selective_scan`` below are a faithful pure-PyTorch
re-implementation of mambapy 1.2's ``mambapy/pscan.py`` (``PScan``: in-place up-sweep /
down-sweep over (B, D, L, N) tensors padded to a power of two, with its hand-written backward) and
of ``mambapy/mamba.py``'s ``selective_scan`` (deltaA = exp(delta A), BX = delta B x,
hs = pscan(deltaA, BX), y = hs C + D x), so that the project's environment needs no mambapy.

Both sides start from what the Mamba block has at that point, in the block's (B, L, ED) layout,
all requiring grad: x (the conv output), delta before its bias, z, and B, C (views into one
x_proj output). mblm: ``selective_scan`` on transposed views with the bias, softplus and the
SiLU(z) gate fused. Peer (as mambapy's ``ssm`` + ``forward``): softplus(delta + bias), the
parallel-scan selective scan, y * silu(z). "fwd" runs under no_grad; "fwd+bwd" also runs
backward of a fixed upstream gradient. Times are medians of alternating runs; ratio = peer time /
mblm time (> 1: mblm is faster). Rows are appended to benchmarks/results/bench_scan.csv unless
--no-record.

On CUDA, mamba_ssm's ``selective_scan_fn`` is a second peer when benchmarks/_mamba_ssm.py finds
it with its compiled extension (``selective_scan_cuda``; mamba_ssm's source alone does not have
it): the same tensors and arguments (its signature is selective_scan's), y only. Without it the
run says so and measures the mambapy peer alone. A peer whose output disagrees with mblm's
(relative error > 1e-3) or that fails is reported and not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import _mamba_ssm  # noqa: E402

_common.prefer_checkout()

from mblm.ops.scan import selective_scan  # noqa: E402

# ---------------------------------------------------------------------------------------------
# the peer: a re-implementation of mambapy's parallel scan (see the module docstring)
# ---------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 2 ** math.ceil(math.log2(n))


def _pad_time(x: torch.Tensor) -> torch.Tensor:
    """(B, L, D, N) -> (B, next_pow2(L), D, N), zero-padded at the end of time."""
    return F.pad(x, (0, 0, 0, 0, 0, _next_pow2(x.size(1)) - x.size(1)))


def _blelloch(a: torch.Tensor, x: torch.Tensor) -> None:
    """In place: x[t] <- a[t] * x[t-1] + x[t] along dim 2 of (B, D, L, N), L a power of two."""
    b, d, length, _ = a.shape
    steps = int(math.log2(length))
    aa, xa = a, x
    for _ in range(steps - 2):  # up-sweep: combine pairs, then recurse on the right elements
        t = xa.size(2)
        aa = aa.view(b, d, t // 2, 2, -1)
        xa = xa.view(b, d, t // 2, 2, -1)
        xa[:, :, :, 1].add_(aa[:, :, :, 1].mul(xa[:, :, :, 0]))
        aa[:, :, :, 1].mul_(aa[:, :, :, 0])
        aa, xa = aa[:, :, :, 1], xa[:, :, :, 1]
    if xa.size(2) == 4:
        xa[:, :, 1].add_(aa[:, :, 1].mul(xa[:, :, 0]))
        aa[:, :, 1].mul_(aa[:, :, 0])
        xa[:, :, 3].add_(aa[:, :, 3].mul(xa[:, :, 2] + aa[:, :, 2].mul(xa[:, :, 1])))
    elif xa.size(2) == 2:
        xa[:, :, 1].add_(aa[:, :, 1].mul(xa[:, :, 0]))
        return
    else:
        return
    # down-sweep: push the prefixes back to the left elements of each level
    stride = 2 ** (steps - 2)
    aa, xa = a[:, :, stride - 1 : length : stride], x[:, :, stride - 1 : length : stride]
    xa[:, :, 2].add_(aa[:, :, 2].mul(xa[:, :, 1]))
    aa[:, :, 2].mul_(aa[:, :, 1])
    for k in range(steps - 3, -1, -1):
        stride = 2**k
        aa, xa = a[:, :, stride - 1 : length : stride], x[:, :, stride - 1 : length : stride]
        t = xa.size(2)
        aa = aa.view(b, d, t // 2, 2, -1)
        xa = xa.view(b, d, t // 2, 2, -1)
        xa[:, :, 1:, 0].add_(aa[:, :, 1:, 0].mul(xa[:, :, :-1, 1]))
        aa[:, :, 1:, 0].mul_(aa[:, :, :-1, 1])


def _blelloch_reverse(a: torch.Tensor, x: torch.Tensor) -> None:
    """In place: x[t] <- a[t] * x[t+1] + x[t] along dim 2 (the same scan from the right)."""
    b, d, length, _ = a.shape
    steps = int(math.log2(length))
    aa, xa = a, x
    for _ in range(steps - 2):
        t = xa.size(2)
        aa = aa.view(b, d, t // 2, 2, -1)
        xa = xa.view(b, d, t // 2, 2, -1)
        xa[:, :, :, 0].add_(aa[:, :, :, 0].mul(xa[:, :, :, 1]))
        aa[:, :, :, 0].mul_(aa[:, :, :, 1])
        aa, xa = aa[:, :, :, 0], xa[:, :, :, 0]
    if xa.size(2) == 4:
        xa[:, :, 2].add_(aa[:, :, 2].mul(xa[:, :, 3]))
        aa[:, :, 2].mul_(aa[:, :, 3])
        xa[:, :, 0].add_(aa[:, :, 0].mul(xa[:, :, 1].add(aa[:, :, 1].mul(xa[:, :, 2]))))
    elif xa.size(2) == 2:
        xa[:, :, 0].add_(aa[:, :, 0].mul(xa[:, :, 1]))
        return
    else:
        return
    stride = 2 ** (steps - 2)
    aa, xa = a[:, :, 0:length:stride], x[:, :, 0:length:stride]
    xa[:, :, 1].add_(aa[:, :, 1].mul(xa[:, :, 2]))
    aa[:, :, 1].mul_(aa[:, :, 2])
    for k in range(steps - 3, -1, -1):
        stride = 2**k
        aa, xa = a[:, :, 0:length:stride], x[:, :, 0:length:stride]
        t = xa.size(2)
        aa = aa.view(b, d, t // 2, 2, -1)
        xa = xa.view(b, d, t // 2, 2, -1)
        xa[:, :, :-1, 1].add_(aa[:, :, :-1, 1].mul(xa[:, :, 1:, 0]))
        aa[:, :, :-1, 1].mul_(aa[:, :, 1:, 0])


class _MambapyPScan(torch.autograd.Function):
    """H[t] = A[t] * H[t-1] + X[t], H[-1] = 0, for A, X of shape (B, L, D, N) (no initial state,
    as mblm's Mamba1 forward calls it)."""

    @staticmethod
    def forward(ctx, a_in, x_in):
        length = x_in.size(1)
        if length == _next_pow2(length):
            a, x = a_in.clone(), x_in.clone()
        else:
            a, x = _pad_time(a_in), _pad_time(x_in)
        a, x = a.transpose(2, 1), x.transpose(2, 1)  # (B, D, L', N)
        _blelloch(a, x)
        ctx.save_for_backward(a_in, x)
        return x.transpose(2, 1)[:, :length]

    @staticmethod
    def backward(ctx, grad_in):
        a_in, x = ctx.saved_tensors
        length = grad_in.size(1)
        if length == _next_pow2(length):
            grad = grad_in.clone()
        else:
            grad, a_in = _pad_time(grad_in), _pad_time(a_in)
        grad = grad.transpose(2, 1)
        a_in = a_in.transpose(2, 1)
        a = F.pad(a_in[:, :, 1:], (0, 0, 0, 1))  # A shifted one step to the left
        _blelloch_reverse(a, grad)
        q = torch.zeros_like(x)
        q[:, :, 1:].add_(x[:, :, :-1] * grad[:, :, 1:])
        return q.transpose(2, 1)[:, :length], grad.transpose(2, 1)[:, :length]


def mambapy_selective_scan(x, delta, A, B, C, D):
    """mambapy's MambaBlock.selective_scan: x, delta (B, L, ED); A (ED, N); B, C (B, L, N)."""
    delta_a = torch.exp(delta.unsqueeze(-1) * A)
    bx = delta.unsqueeze(-1) * B.unsqueeze(2) * x.unsqueeze(-1)
    hs = _MambapyPScan.apply(delta_a, bx)
    y = (hs @ C.unsqueeze(-1)).squeeze(3)
    return y + D * x


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    length: int
    d_model: int
    d_state: int = 16
    expand: int = 2

    @property
    def dim(self) -> int:
        return self.expand * self.d_model

    @property
    def shape(self) -> str:
        return f"B={self.batch} L={self.length} ED={self.dim} N={self.d_state}"


def cases(quick: bool, smoke: bool = False) -> list[Case]:
    if smoke:
        return [Case(1, 64, 16)]
    if quick:
        return [Case(2, 1024, 256), Case(2, 4096, 512)]
    return [Case(2, 1024, 512), Case(2, 4096, 512), Case(1, 8192, 256)]


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    b, length, dim, n = case.batch, case.length, case.dim, case.d_state
    rank = math.ceil(case.d_model / 16)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_()

    x = rand(b, length, dim)
    z = rand(b, length, dim)
    delta = rand(b, length, dim, scale=0.5)
    dbc = rand(b, length, rank + 2 * n)
    A = (-torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1)).to(device)
    D = torch.ones(dim, device=device)
    bias = (torch.rand(dim, generator=gen) * 2 - 4).to(device)
    for t in (A, D, bias):
        t.requires_grad_()
    return x, z, delta, dbc, A, D, bias, rank, n


def _channels_first_scan(scan_fn):
    """Calls ``scan_fn`` (mblm's selective_scan or mamba_ssm's selective_scan_fn: the same
    argument order, (B, D, L) layout) on the benchmark's (B, L, D) tensors; returns y (B, L, D)."""

    def run(x, z, delta, dbc, A, D, bias, rank, n):
        B, C = dbc[..., rank : rank + n], dbc[..., rank + n :]
        out = scan_fn(
            x.transpose(1, 2),
            delta.transpose(1, 2),
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            D,
            z.transpose(1, 2),
            bias,
            True,
        )
        y = out[0] if isinstance(out, tuple) else out
        return y.transpose(1, 2)

    return run


run_mblm = _channels_first_scan(selective_scan)


def mamba_ssm_peer(selective_scan_fn):
    """mamba_ssm's selective_scan_fn on the arguments mblm's selective_scan gets (y only)."""
    return _channels_first_scan(selective_scan_fn)


def peers(device: torch.device, mamba_ssm_src: str | None) -> dict:
    """The peers measured on ``device``, by the name stored in the rows' peer column."""
    out = {"mambapy pscan (re-implementation)": run_peer}
    if device.type != "cuda":
        return out
    ms, why = _mamba_ssm.load_mamba_ssm(mamba_ssm_src)
    if ms is None or ms.selective_scan_fn is None:
        print(f"# mamba_ssm selective_scan_fn: not available ({why}); mambapy peer only")
    else:
        print(f"# mamba_ssm: {why}")
        out["mamba_ssm selective_scan_fn"] = mamba_ssm_peer(ms.selective_scan_fn)
    return out


def run_peer(x, z, delta, dbc, A, D, bias, rank, n):
    B, C = dbc[..., rank : rank + n], dbc[..., rank + n :]
    dt = F.softplus(delta + bias)
    y = mambapy_selective_scan(x, dt, A, B, C, D)
    return y * F.silu(z)


def timed_call(run, mode, inputs, leaves, grad):
    """What one timing runs: the scan under no_grad ("fwd"), or forward + backward."""

    def f():
        if mode == "fwd":
            with torch.no_grad():
                run(*inputs)
        else:
            torch.autograd.grad(run(*inputs), leaves, grad)

    return f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small cases, few repeats")
    size.add_argument("--smoke", action="store_true", help="one tiny case, 1 repeat (tests)")
    parser.add_argument(
        "--no-record",
        "--no-csv",
        dest="no_record",
        action="store_true",
        help="do not append to the CSV",
    )
    parser.add_argument("--note", default="", help="note stored with every row")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--mamba-ssm-src", default=None, help="mamba_ssm's source folder")
    args = parser.parse_args()
    device = torch.device(args.device)
    _common.require_kernels(device)
    dtype = torch.float32
    repeats = args.repeats or (1 if args.smoke else 2 if args.quick else 5)
    others = peers(device, args.mamba_ssm_src)
    rows = []
    for case in cases(args.quick, args.smoke):
        inputs = make_inputs(case, device, dtype)
        grad = torch.randn(case.batch, case.length, case.dim, device=device, dtype=dtype)
        leaves = [t for t in inputs[:7] if t.requires_grad]
        want, failed = _common.attempt(lambda inputs=inputs: _no_grad(run_mblm, inputs), device)
        if want is None:
            print(f"{case.shape}: mblm failed: {failed}", flush=True)
        for name, peer in others.items() if want is not None else ():
            row = _common.base_row(device)
            row.update(
                case="selective_scan",
                shape=case.shape,
                dtype=str(dtype).removeprefix("torch."),
                peer=name,
                repeats=repeats,
                note=args.note,
            )
            got, failed = _common.attempt(
                lambda peer=peer, inputs=inputs: _no_grad(peer, inputs), device
            )
            if got is not None:
                err = (got - want).abs().max().item() / want.abs().max().item()
                if err > 1e-3:
                    failed = f"disagrees with mblm: relative error {err:.2e}"
            if failed:
                print(f"{case.shape} {name}: {failed}", flush=True)
                rows.append(dict(row, mode="fwd", note=f"{failed} {args.note}".strip()))
                continue
            for mode in ("fwd", "fwd+bwd"):

                def make(run, mode=mode, inputs=inputs, leaves=leaves, grad=grad):
                    return timed_call(run, mode, inputs, leaves, grad)

                times, failed = _common.attempt(
                    lambda make=make, peer=peer: _common.time_pair(
                        make(run_mblm), make(peer), device, repeats=repeats
                    ),
                    device,
                )
                if times is None:
                    print(f"{case.shape} {name} {mode}: failed: {failed}", flush=True)
                    rows.append(dict(row, mode=mode, note=f"failed: {failed} {args.note}".strip()))
                    continue
                t_impl, t_peer = times
                mem_impl = _common.peak_memory_mib(make(run_mblm), device)
                mem_peer = _common.peak_memory_mib(make(peer), device)
                rows.append(
                    dict(
                        row,
                        mode=mode,
                        impl_ms=t_impl * 1e3,
                        peer_ms=t_peer * 1e3,
                        ratio=t_peer / t_impl,
                        impl_peak_mib=mem_impl,
                        peer_peak_mib=mem_peer,
                    )
                )
                print(
                    f"{case.shape} {name} {mode}: mblm {t_impl * 1e3:.1f} ms, "
                    f"peer {t_peer * 1e3:.1f} ms, ratio {t_peer / t_impl:.1f}x",
                    flush=True,
                )
    _common.print_table(
        rows,
        ("shape", "peer", "mode", "impl_ms", "peer_ms", "ratio", "impl_peak_mib",
         "peer_peak_mib", "note"),
    )  # fmt: skip
    if not args.no_record:
        path = _common.append_rows("bench_scan", rows)
        print(f"appended {len(rows)} rows to {path}")


def _no_grad(run, inputs):
    with torch.no_grad():
        return run(*inputs)


if __name__ == "__main__":
    main()
