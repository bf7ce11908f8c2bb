"""Long context: the largest input length a paper-sized 3-stage MBLM trains on one device.

Issue 8, item 3. A ladder of input lengths, each trained for a few steps (forward with the LOSS
return type, backward, AdamW step) in a FRESH worker process of this script, so that the
fragmentation or the OOM of one length cannot affect the next. The ladder stops at the first
length that fails (OOM, error, crash or timeout) unless ``--keep-going``; every result line is
printed (and appended to the CSV) as soon as its worker ends, so a run cut short still reports.

Presets (the paper's 1M-byte PG19 model, configs/pg19_200bb_360m_3d_stt.yaml, ~360M parameters):

- ``paper-hybrid``: hidden_dims [1024, 1024, 1024], num_layers [9, 8, 8], seq_lens [G, 16, 8]
  with G = input_len / 128 global patches; a Mamba2 global stage (d_state 128, d_conv 4,
  expand 2, headdim 64) and two Transformer stages (16 heads of 64, ff x2; stage 1 rotary
  attention + learned positions, stage 2 RoPE-rotated embeddings).
- ``paper-transformer``: the same with a Transformer global stage (rotary attention, no learned
  position table, so the parameter count does not grow with G).

``train_checkpoint_chunks`` of the two local stages: ``--chunks`` (default 10,20, the paper's at
1M bytes), scaled with the input length (ceil(c * L / 1M)) so that the activations one chunk
recomputes stay the size they have at 1M (roughly 10 GiB for 10,20; larger counts shrink that
fixed cost); ``--fixed-chunks`` keeps them as given.

On a GPU (bf16 autocast, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the workers unless
set; lengths take K = 1024 and M = 2**20 suffixes and must be multiples of 128):

    python benchmarks/bench_long_context.py --preset paper-hybrid --lengths 1M,2M,4M,8M,10M,12M
    python benchmarks/bench_long_context.py --preset paper-transformer --lengths 1M,2M,4M \
        --results-json $OUT/long_context_transformer.json

``--time-budget`` (default 540 s) bounds the whole ladder and ``--worker-timeout`` (default 300 s)
each length, so one call fits a 10-minute command limit. On CPU, ``--device cpu --smoke`` runs
the same ladder with tiny dims (lengths 256, 512, 1K bytes, float32) in seconds.

Reported per length: median step seconds, bytes/s (= batch * length / step time), peak memory
(CUDA: torch.cuda.max_memory_allocated and max_memory_reserved over the worker, weights and
optimizer states included; CPU: peak RSS) and any mblm.ops fallback to a PyTorch reference.
There is no peer measured in the same run: the original mblm 0.4.2 without mamba_ssm tops out
on an H100 80 GB at 1M bytes with Transformer stages and at 128K bytes with a mambapy global
stage; the paper reached 5M bytes on an A100 80 GB (figures from issue 8, not measured here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

_common.prefer_checkout()

SCRIPT = Path(__file__).resolve()
BYTES_PER_GLOBAL_PATCH = 16 * 8  # seq_lens[1] * seq_lens[2]
CHUNKS_REFERENCE_LEN = 2**20  # --chunks are the paper's values at 1M bytes
REFERENCE_NOTE = (
    "reference (issue 8, not measured here): original mblm 0.4.2 without mamba_ssm tops out on "
    "H100 80GB at 1M bytes (Transformer stages) and 128K bytes (mambapy global stage); paper: "
    "5M bytes on A100 80GB"
)
PRESETS = ("paper-hybrid", "paper-transformer")
DEFAULT_LENGTHS = "512K,1M,2M,3M,4M,6M,8M,10M,12M,16M"
SMOKE_LENGTHS = "256,512,1K"
GIB = 2**30


# ---------------------------------------------------------------------------------------------
# lengths and configs
# ---------------------------------------------------------------------------------------------


def parse_length(text: str) -> int:
    """'256', '128K', '10M', '1_048_576' -> bytes (K = 1024, M = 2**20)."""
    s = text.strip().replace("_", "").upper()
    scale = {"K": 2**10, "M": 2**20}.get(s[-1:], 1)
    digits = s[:-1] if scale > 1 else s
    try:
        value = float(digits) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lengths: {text!r} is not a length (e.g. 512, 128K, 10M)"
        ) from None
    if value != int(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"--lengths: {text!r} is not a whole positive byte count")
    if int(value) % BYTES_PER_GLOBAL_PATCH:
        raise argparse.ArgumentTypeError(
            f"--lengths: {text!r} = {int(value)} bytes is not a multiple of "
            f"{BYTES_PER_GLOBAL_PATCH} (the bytes of one global patch)"
        )
    return int(value)


def parse_lengths(text: str) -> list[int]:
    lengths = [parse_length(part) for part in text.split(",") if part.strip()]
    if not lengths:
        raise argparse.ArgumentTypeError("--lengths: give at least one length")
    return lengths


def parse_chunks(text: str) -> list[int]:
    try:
        chunks = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--chunks: {text!r} is not two integers a,b") from None
    if len(chunks) != 2 or min(chunks) < 1:
        raise argparse.ArgumentTypeError(
            f"--chunks: need one positive count per local stage (2), got {text!r}"
        )
    return chunks


def fmt_length(n: int) -> str:
    for suffix, unit in (("M", 2**20), ("K", 2**10)):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def scaled_chunks(chunks: list[int], length: int, fixed: bool) -> list[int]:
    if fixed:
        return list(chunks)
    return [max(1, math.ceil(c * length / CHUNKS_REFERENCE_LEN)) for c in chunks]


def _transformer(rotary: bool, pos_emb: str | None, head_dim: int, heads: int) -> dict:
    return {
        "block_type": "transformer",
        "attn_head_dims": head_dim,
        "attn_num_heads": heads,
        "attn_use_rot_embs": rotary,
        "attn_dropout": 0.0,
        "pos_emb_type": pos_emb,
    }


def model_config(preset: str, length: int, chunks: list[int], smoke: bool) -> dict:
    """The MBLMModelConfig dict of ``preset`` for inputs of ``length`` bytes."""
    if preset not in PRESETS:
        raise ValueError(f"--preset: unknown {preset!r}, expected one of {PRESETS}")
    dim, head_dim, heads = (32, 16, 2) if smoke else (1024, 64, 16)
    if preset == "paper-hybrid":
        global_block = {
            "block_type": "mamba2",
            "d_state": 16 if smoke else 128,
            "d_conv": 4,
            "expand": 2,
            "headdim": head_dim,
            "pos_emb_type": None,
        }
    else:
        global_block = _transformer(True, None, head_dim, heads)
    return {
        "num_tokens": 256,
        "pad_token_id": 0,
        "hidden_dims": [dim] * 3,
        "seq_lens": [length // BYTES_PER_GLOBAL_PATCH, 16, 8],
        "num_layers": [1, 1, 1] if smoke else [9, 8, 8],
        "train_checkpoint_chunks": chunks,
        "block": [
            global_block,
            _transformer(True, "fixed", head_dim, heads),
            _transformer(False, "rope", head_dim, heads),
        ],
    }


# ---------------------------------------------------------------------------------------------
# worker: one length in this process
# ---------------------------------------------------------------------------------------------


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text
    )


def _memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "peak_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
        }
    return {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    import mblm
    import mblm.ops
    from mblm import MBLM, MBLMModelConfig, MBLMReturnType

    device = torch.device(args.device)
    amp = None if args.dtype == "float32" else getattr(torch, args.dtype)
    length, chunks = args.seq_len, args.chunks
    result: dict[str, Any] = {
        "seq_len": length,
        "chunks": chunks,
        "device": _common.device_name(device),
        "device_type": device.type,
        "cuda_kernels": bool(mblm.ops.build_info()["cuda"]),
        "mblm_file": mblm.__file__,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.manual_seed(args.seed)
            cfg = MBLMModelConfig.model_validate(
                model_config(args.preset, length, chunks, args.smoke)
            )
            model = MBLM(cfg).to(device).train()
            result["params"] = sum(p.numel() for p in model.parameters())
            if device.type == "cuda":
                result["weights_gib"] = torch.cuda.memory_allocated(device) / GIB
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            x = torch.randint(0, cfg.num_tokens, (args.batch, length), device=device)

            def step() -> tuple[float, float]:
                _common.synchronize(device)
                start = time.perf_counter()
                if args.simulate_oom_above and length > args.simulate_oom_above:
                    raise torch.OutOfMemoryError("simulated OOM (--simulate-oom-above)")
                autocast = (
                    torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
                )
                with autocast:
                    loss = model(x, return_type=MBLMReturnType.LOSS)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                value = loss.item()  # also waits for the device
                _common.synchronize(device)
                return time.perf_counter() - start, value

            losses = [step()[1] for _ in range(args.warmup)]
            times = []
            for _ in range(args.steps):
                seconds, value = step()
                times.append(seconds)
                losses.append(value)
            median = statistics.median(times)
            result.update(
                status="ok",
                oom=False,
                step_s=median,
                step_times_s=times,
                bytes_per_s=args.batch * length / median,
                losses=losses,
            )
        except Exception as err:  # reported, not raised: the parent reads the JSON line
            oom = _is_oom(err)
            result.update(status="oom" if oom else "error", oom=oom)
            first_line = (str(err).strip().splitlines() or [""])[0]
            result["message"] = f"{type(err).__name__}: {first_line[:300]}"
            if not oom:
                traceback.print_exc()
    try:
        result.update(_memory(device))
    except RuntimeError as err:  # e.g. after a sticky CUDA error
        result["memory_error"] = str(err)[:300]
    fallbacks = sorted({str(w.message) for w in caught if "reference" in str(w.message)})
    result["fallbacks"] = fallbacks
    return result


# ---------------------------------------------------------------------------------------------
# parent: the ladder
# ---------------------------------------------------------------------------------------------


def _worker_command(args: argparse.Namespace, length: int, chunks: list[int]) -> list[str]:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--worker",
        "--preset", args.preset,
        "--seq-len", str(length),
        "--chunks", ",".join(map(str, chunks)),
        "--batch", str(args.batch),
        "--warmup", str(args.warmup),
        "--steps", str(args.steps),
        "--device", args.device,
        "--dtype", args.dtype,
        "--seed", str(args.seed),
    ]  # fmt: skip
    if args.smoke:
        cmd.append("--smoke")
    if args.simulate_oom_above:
        cmd += ["--simulate-oom-above", str(args.simulate_oom_above)]
    return cmd


def _last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def launch_worker(args: argparse.Namespace, length: int, timeout: float) -> dict[str, Any]:
    chunks = scaled_chunks(args.chunks, length, args.fixed_chunks)
    env = dict(os.environ)
    if args.device.startswith("cuda") and args.alloc_conf:
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", args.alloc_conf)
    started = time.monotonic()
    # own session: a timeout kills the worker's whole process group, nothing else
    proc = subprocess.Popen(
        _worker_command(args, length, chunks),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return {
            "seq_len": length,
            "chunks": chunks,
            "status": "timeout",
            "message": f"worker killed after {timeout:.0f} s",
            "wall_s": time.monotonic() - started,
        }
    result = _last_json_line(out)
    if result is None:
        result = {
            "seq_len": length,
            "chunks": chunks,
            "status": "crash",
            "message": f"worker exited {proc.returncode} without a result: {err.strip()[-500:]}",
        }
    elif result.get("status") == "error":
        result["stderr_tail"] = err.strip()[-2000:]
    result["wall_s"] = time.monotonic() - started
    return result


def _shape(args: argparse.Namespace, result: dict) -> str:
    cfg = model_config(args.preset, result["seq_len"], result["chunks"], args.smoke)
    return (
        f"B={args.batch} L={result['seq_len']} seq_lens={cfg['seq_lens']} "
        f"dims={cfg['hidden_dims']} layers={cfg['num_layers']} chunks={result['chunks']}"
    )


def csv_row(args: argparse.Namespace, result: dict) -> dict[str, Any]:
    note = [f"status={result['status']}"]
    if result["status"] == "ok":
        note.append(f"bytes_per_s={result['bytes_per_s']:.4g}")
    if "reserved_gib" in result:
        note.append(f"reserved_gib={result['reserved_gib']:.3f}")
    if "params" in result:
        note.append(f"params={result['params']}")
    if result.get("message"):
        note.append(result["message"])
    if result.get("fallbacks"):
        note.append("fallbacks: " + " | ".join(result["fallbacks"]))
    note.append(REFERENCE_NOTE)
    peak = result.get("peak_gib")
    return {
        **_common.base_row(torch.device(args.device)),
        "device": result.get("device") or _common.device_name(torch.device(args.device)),
        "case": f"train_step_long_context_{args.preset}" + ("_smoke" if args.smoke else ""),
        "shape": _shape(args, result),
        "dtype": args.dtype,
        "mode": "fwd+bwd+adamw",
        "impl_ms": result["step_s"] * 1e3 if result["status"] == "ok" else "",
        "peer": "",
        "peer_ms": "",
        "ratio": "",
        "impl_peak_mib": peak * 1024 if peak is not None else "",
        "peer_peak_mib": "",
        "repeats": args.steps,
        "note": "; ".join(note),
    }


def table_row(result: dict) -> dict[str, Any]:
    ok = result["status"] == "ok"
    return {
        "length": fmt_length(result["seq_len"]),
        "bytes": result["seq_len"],
        "status": result["status"],
        "chunks": ",".join(map(str, result["chunks"])),
        "step_s": f"{result['step_s']:.3f}" if ok else "",
        "bytes_per_s": f"{result['bytes_per_s']:.4g}" if ok else "",
        "peak_gib": f"{result['peak_gib']:.2f}" if "peak_gib" in result else "",
        "reserved_gib": f"{result['reserved_gib']:.2f}" if "reserved_gib" in result else "",
    }


TABLE_COLUMNS = ("length", "bytes", "status", "chunks", "step_s", "bytes_per_s", "peak_gib")


def _progress_line(result: dict) -> str:
    row = table_row(result)
    line = f"[{row['length']}] {row['status']}"
    if row["step_s"]:
        line += f"  step {row['step_s']} s  {row['bytes_per_s']} bytes/s"
    if row["peak_gib"]:
        line += f"  peak {row['peak_gib']} GiB"
    if row["reserved_gib"]:
        line += f" (reserved {row['reserved_gib']} GiB)"
    if result.get("message"):
        line += f"  {result['message']}"
    if result.get("device_type") == "cuda" and not result.get("cuda_kernels"):
        line += "  (this mblm build has no CUDA kernels: the ops run PyTorch references)"
    return line


def _record(args: argparse.Namespace, results: list[dict], result: dict) -> None:
    """Keeps, prints and writes (CSV, JSON) one worker's result as soon as it is there."""
    results.append(result)
    print(_progress_line(result), flush=True)
    if result.get("fallbacks"):
        print("  fallbacks: " + " | ".join(result["fallbacks"]), flush=True)
    if result.get("stderr_tail"):
        print("  worker stderr:\n" + result["stderr_tail"], flush=True)
    if not args.no_csv:
        _common.append_rows("bench_long_context", [csv_row(args, result)])
    if args.results_json:
        Path(args.results_json).write_text(json.dumps(results, indent=1))


def _refine(args: argparse.Namespace, results: list[dict], start: float) -> None:
    """After an OOM above a length that trained, tries up to ``--refine`` lengths halfway
    between the largest that trained and the smallest that ran out of memory (multiples of
    128 bytes), within the time budget."""
    for _ in range(args.refine):
        trained = [r["seq_len"] for r in results if r["status"] == "ok"]
        too_big = [r["seq_len"] for r in results if r["status"] == "oom"]
        if not trained or not too_big:
            return
        low, high = max(trained), min(too_big)
        mid = (low + high) // 2 // BYTES_PER_GLOBAL_PATCH * BYTES_PER_GLOBAL_PATCH
        remaining = args.time_budget - (time.monotonic() - start)
        if mid <= low or remaining < args.min_worker_s:
            return
        print(f"refining between {fmt_length(low)} and {fmt_length(high)}: {fmt_length(mid)}")
        _record(args, results, launch_worker(args, mid, min(args.worker_timeout, remaining)))
        if results[-1]["status"] not in ("ok", "oom"):
            return


def run_ladder(args: argparse.Namespace) -> list[dict]:
    lengths = args.lengths or parse_lengths(SMOKE_LENGTHS if args.smoke else DEFAULT_LENGTHS)
    example = model_config(args.preset, lengths[0], args.chunks, args.smoke)
    print(
        f"preset {args.preset}{' (smoke)' if args.smoke else ''}: dims {example['hidden_dims']}, "
        f"layers {example['num_layers']}, seq_lens [L/128, 16, 8], batch {args.batch}, "
        f"{args.dtype}, device {args.device}; chunks {args.chunks} "
        f"{'fixed' if args.fixed_chunks else 'at 1M bytes, scaled with L'}",
        flush=True,
    )
    print(REFERENCE_NOTE, flush=True)
    results: list[dict] = []
    start = time.monotonic()
    for i, length in enumerate(lengths):
        remaining = args.time_budget - (time.monotonic() - start)
        if remaining < args.min_worker_s:
            untried = ", ".join(fmt_length(n) for n in lengths[i:])
            print(f"time budget spent ({args.time_budget:.0f} s): not tried {untried}", flush=True)
            break
        result = launch_worker(args, length, min(args.worker_timeout, remaining))
        _record(args, results, result)
        if result["status"] != "ok" and not args.keep_going:
            rest = ", ".join(fmt_length(n) for n in lengths[i + 1 :])
            if rest:
                print(
                    f"stopping after {result['status']} at {fmt_length(length)}: not tried {rest}"
                )
            _refine(args, results, start)
            break

    print()
    _common.print_table([table_row(r) for r in results], TABLE_COLUMNS)
    trained = [r["seq_len"] for r in results if r["status"] == "ok"]
    if trained:
        best = max(trained)
        print(f"largest length that trained: {fmt_length(best)} ({best} bytes)")
    else:
        print("largest length that trained: none")
    if not args.no_csv and results:
        print(f"appended to {_common.RESULTS_DIR / 'bench_long_context.csv'}")
    sys.stdout.flush()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="paper-hybrid")
    parser.add_argument(
        "--lengths",
        type=parse_lengths,
        default=None,
        help=f"comma-separated input lengths in bytes, K/M suffixes (default {DEFAULT_LENGTHS}; "
        f"with --smoke {SMOKE_LENGTHS})",
    )
    parser.add_argument(
        "--chunks",
        type=parse_chunks,
        default=[10, 20],
        help="train_checkpoint_chunks of the two local stages at 1M bytes (default 10,20)",
    )
    parser.add_argument(
        "--fixed-chunks", action="store_true", help="use --chunks at every length (no scaling)"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed train steps per length")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default=None,
        help="autocast dtype (float32: no autocast); default bfloat16 on cuda, float32 on cpu",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny dims (CPU check of the ladder)")
    parser.add_argument(
        "--keep-going", action="store_true", help="try every length after a failure"
    )
    parser.add_argument(
        "--refine",
        type=int,
        default=0,
        help="after the first OOM, try up to N lengths halfway to the largest that trained",
    )
    parser.add_argument("--time-budget", type=float, default=540.0, help="seconds for the ladder")
    parser.add_argument("--worker-timeout", type=float, default=300.0, help="seconds per length")
    parser.add_argument(
        "--min-worker-s", type=float, default=30.0, help="start no worker with less time left"
    )
    parser.add_argument(
        "--alloc-conf",
        default="expandable_segments:True",
        help="PYTORCH_CUDA_ALLOC_CONF of the CUDA workers when not set ('' for none)",
    )
    parser.add_argument("--results-json", default=None, help="also write the results here")
    parser.add_argument("--no-csv", action="store_true")
    # internal: one length in this process (run by the ladder)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=parse_length, help=argparse.SUPPRESS)
    # tests only: the worker raises torch.OutOfMemoryError for lengths above N
    parser.add_argument("--simulate-oom-above", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    for name in ("batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")

    if args.worker:
        if args.seq_len is None:
            parser.error("--worker needs --seq-len")
        print(json.dumps(run_worker(args)), flush=True)
        return
    run_ladder(args)


if __name__ == "__main__":
    main()
