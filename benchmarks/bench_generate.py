"""Generation speed: cached ``MBLM.generate`` vs the full-recompute loop and the original mblm.

Measures, for one model (``--model``):

- bytes/s of cached greedy generation of 1K, 4K and 16K bytes (batch 1, empty prompt), timed in
  full (median of ``--repeats``), and the per-byte time of 512 decoding steps just before 16K
  bytes relative to just before 1K bytes (the cache makes the work per byte nearly independent of
  the position);
- the same for ``use_cache=False`` (this package's full-recompute loop) and for the original
  mblm 0.4.2 (its own venv, ``benchmarks/setup_original.sh``). Both recompute the whole sequence
  for every byte, so generating 16K bytes takes hours: they are timed on a short run instead,
  ``--sample-steps`` bytes after prompts at the midpoints of the 4 quarters of the length, and
  the total is estimated as N times the mean per-byte time (the midpoint rule for a step cost
  that grows with the length). The table says "estimated" for these;
- throughput (bytes/s over all rows) of a batch of 16 prompts vs batch 1, for prompts of equal
  lengths and of 16 different lengths.

    python benchmarks/bench_generate.py [--model transformer|hybrid] [--quick] [--no-record]
        [--note "machine loaded"]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))  # this checkout's mblm, not an installed one
import bench_model  # noqa: E402
from _common import append_rows, base_row, original_python, print_table  # noqa: E402

# bench_model's 3-stage Transformer (issue 3) and hybrid (issue 4: Mamba1 global stage,
# Transformer local stage) with longer global stages: 32K bytes of context each.
TRANSFORMER = {**bench_model.TRANSFORMER, "seq_lens": [256, 16, 8]}
HYBRID = {**bench_model.HYBRID, "seq_lens": [2048, 16]}

MODELS = {"transformer": TRANSFORMER, "hybrid": HYBRID}


def build(cfg_dict: dict, device: torch.device):
    import mblm
    from mblm import MBLM, MBLMModelConfig

    assert Path(mblm.__file__).resolve().is_relative_to(ROOT / "mblm"), mblm.__file__

    torch.manual_seed(0)
    return MBLM(MBLMModelConfig.model_validate(cfg_dict)).to(device).eval()


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def marginal_per_byte(model, position: int, steps: int, device: torch.device, repeats=3) -> float:
    """Seconds per byte of ``steps`` greedy decoding steps right after ``position`` bytes (the
    prompt is prefilled untimed): the cost of a byte at that position."""
    from mblm.model.decoding import HierarchicalDecoder

    prompt = torch.randint(0, 256, (position,), generator=torch.Generator().manual_seed(3))
    times = []
    for _ in range(repeats):
        decoder = HierarchicalDecoder(model, 1, position + steps + 1, device)
        logits = decoder.prefill([prompt.to(device)])

        def run(decoder=decoder, logits=logits):
            for _ in range(steps):
                logits = decoder.step(logits.argmax(-1))

        times.append(timed(run, device) / steps)
    return statistics.median(times)


def sample_lengths(n: int) -> list[int]:
    """Midpoints of the four quarters of [0, n)."""
    return [(2 * i + 1) * n // 8 for i in range(4)]


def run_worker(python: str, env: dict, config: Path, lengths: list[int], args, no_cache=False):
    cmd = [
        python,
        str(ROOT / "benchmarks" / "_generate_worker.py"),
        "--config",
        str(config),
        "--lengths",
        ",".join(str(x) for x in lengths),
        "--steps",
        str(args.sample_steps),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
    ]
    if no_cache:
        cmd.append("--no-cache")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT / "benchmarks")
    if out.returncode != 0:
        raise RuntimeError(f"worker failed ({python}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["file"], {int(k): v for k, v in result["per_byte_s"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="transformer")
    parser.add_argument("--lengths", default="1024,4096,16384", help="bytes generated (batch 1)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batch-bytes", type=int, default=1024, help="bytes per row (batch)")
    parser.add_argument("--sample-steps", type=int, default=4, help="bytes per sampled length")
    parser.add_argument("--repeats", type=int, default=3, help="timed cached runs (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--orig-python", default=None, help="python of a venv with mblm==0.4.2")
    parser.add_argument("--no-original", action="store_true", help="skip the original package")
    parser.add_argument("--no-uncached", action="store_true", help="skip use_cache=False")
    parser.add_argument("--quick", action="store_true", help="short lengths (256, 1024)")
    parser.add_argument("--no-record", action="store_true", help="do not append CSV rows")
    parser.add_argument("--note", default="", help="appended to every row's note")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.batch_bytes, args.repeats = "256,1024", 256, 1
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    device = torch.device(args.device)
    cfg = MODELS[args.model]
    model = build(cfg, device)
    shape = f"seq_lens={cfg['seq_lens']} dims={cfg['hidden_dims']} layers={cfg['num_layers']}"

    # ---- cached, batch 1, timed in full
    model.generate(num_tokens_to_generate=64, enable_progress=False)  # warm-up
    cached = {}
    for n in lengths:
        cached[n] = statistics.median(
            timed(
                lambda n=n: model.generate(num_tokens_to_generate=n, enable_progress=False), device
            )  # fmt: skip
            for _ in range(args.repeats)
        )
        print(f"cached {n} bytes: {cached[n]:.2f} s ({n / cached[n]:.0f} bytes/s)", flush=True)

    # ---- full recomputation (ours and the original), estimated from short runs
    all_samples = sorted({x for n in lengths for x in sample_lengths(n)})
    peers: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "model.yaml"
        config.write_text(yaml.safe_dump(cfg))
        if not args.no_uncached:
            ours_env = dict(os.environ, PYTHONPATH=str(ROOT))
            _, peers["use_cache=False"] = run_worker(
                sys.executable, ours_env, config, all_samples, args, no_cache=True
            )
            print("uncached sampled", flush=True)
        if not args.no_original:
            orig_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            orig_env["PYTEST_CURRENT_TEST"] = "bench"  # silences the Mamba fallback warning
            file, peers["mblm==0.4.2"] = run_worker(original_python(args.orig_python), orig_env, config,
                                                    all_samples, args)  # fmt: skip
            assert "site-packages" in file, f"the original run imported a checkout: {file}"
            print("original sampled", flush=True)

    note = "; ".join(x for x in (args.note,) if x)
    rows = []
    for n in lengths:
        for peer, per_byte in peers.items():
            est = n * statistics.mean(per_byte[x] for x in sample_lengths(n))
            rows.append(
                {
                    **base_row(device),
                    "threads": args.threads,
                    "case": f"generate_{args.model}",
                    "shape": f"B=1 N={n} {shape}",
                    "dtype": "float32",
                    "mode": "greedy",
                    "impl_ms": cached[n] * 1e3,
                    "peer": peer,
                    "peer_ms": est * 1e3,
                    "ratio": est / cached[n],
                    "repeats": args.repeats,
                    "note": "; ".join(
                        x
                        for x in (
                            f"impl {n / cached[n]:.0f} bytes/s",
                            f"peer estimated from {args.sample_steps} bytes at lengths "
                            f"{sample_lengths(n)}",
                            note,
                        )
                        if x
                    ),
                }
            )
    lo, hi = min(lengths), max(lengths)
    per_byte_ratio = (cached[hi] / hi) / (cached[lo] / lo)
    steps = min(512, lo)
    at_lo = marginal_per_byte(model, lo - steps, steps, device)
    at_hi = marginal_per_byte(model, hi - steps, steps, device)
    rows.append(
        {
            **base_row(device),
            "threads": args.threads,
            "case": f"generate_{args.model}_per_byte",
            "shape": f"B=1 {steps} bytes before position {hi} {shape}",
            "dtype": "float32",
            "mode": "greedy",
            "impl_ms": at_hi * 1e3,
            "peer": f"{steps} bytes before position {lo}",
            "peer_ms": at_lo * 1e3,
            "ratio": at_lo / at_hi,
            "repeats": 3,
            "note": "; ".join(
                x for x in (f"per-byte time at {hi} / at {lo}: {at_hi / at_lo:.2f}", note) if x
            ),
        }
    )

    # ---- batch 16 vs batch 1 (cached)
    gen = torch.Generator().manual_seed(2)
    nb = args.batch_bytes
    equal = [torch.randint(0, 256, (16,), generator=gen) for _ in range(args.batch)]
    mixed = [torch.randint(0, 256, (1 + 37 * i,), generator=gen) for i in range(args.batch)]
    single = timed(
        lambda: model.generate(
            equal[0].to(device), num_tokens_to_generate=nb, enable_progress=False
        ),  # fmt: skip
        device,
    )
    for kind, prompts in (("equal", equal), ("mixed", mixed)):
        prompts = [p.to(device) for p in prompts]
        t = timed(
            lambda prompts=prompts: model.generate(
                prompts, num_tokens_to_generate=nb, enable_progress=False
            ),
            device,
        )
        rows.append(
            {
                **base_row(device),
                "threads": args.threads,
                "case": f"generate_{args.model}_batch",
                "shape": f"B={args.batch} ({kind} prompt lengths) N={nb} {shape}",
                "dtype": "float32",
                "mode": "greedy",
                "impl_ms": t * 1e3,
                "peer": "batch 1",
                "peer_ms": single * 1e3 * args.batch,
                "ratio": single * args.batch / t,
                "repeats": 1,
                "note": "; ".join(
                    x
                    for x in (
                        f"throughput {args.batch * nb / t:.0f} vs {nb / single:.0f} bytes/s",
                        note,
                    )
                    if x
                ),
            }
        )

    print_table(rows, ["case", "shape", "impl_ms", "peer", "peer_ms", "ratio"])
    print(
        f"cached, mean per-byte time of a whole run: {cached[hi] / hi * 1e3:.3f} ms for {hi} "
        f"bytes vs {cached[lo] / lo * 1e3:.3f} ms for {lo} bytes ({per_byte_ratio:.2f}x)"
    )
    print(
        f"cached, per-byte time of the {steps} bytes before position {hi}: {at_hi * 1e3:.3f} ms "
        f"vs before {lo}: {at_lo * 1e3:.3f} ms ({at_hi / at_lo:.2f}x; median of 3)"
    )
    for row in rows:
        print(f"{row['shape']} vs {row['peer']}: {row['ratio']:.1f}x  ({row['note']})")
    if not args.no_record:
        print(f"appended to {append_rows('bench_generate', rows)}")


if __name__ == "__main__":
    main()
