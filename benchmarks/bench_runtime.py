"""Generation speed of the C++ runtime (``mblm-run``, no Python) vs the Python package's cached
``MBLM.generate`` on the same model and weights.

For each model (bench_generate's 3-stage Transformer and Mamba1+Transformer hybrid, seeded
weights exported to safetensors), greedy generation of ``--bytes`` bytes after a fixed prompt,
batch 1:

- runtime: ``mblm-run --stats`` (its own timing of the generate call, after the model is loaded;
  each run is a fresh process, so its first-call costs are included);
- peer: ``model.generate(prompt, num_tokens_to_generate=N)`` in this process on the Python
  decoder (``MBLM_DECODER=python``), after a warm-up; the row's note also gives the default
  ``model.generate`` (which decodes on the same C++ runtime through ``mblm._C``).

Runs alternate (runtime, Python, runtime, ...) and the medians of ``--repeats`` are compared; the
table shows the speedup of the runtime. Both must produce the same bytes (greedy decoding); the
row notes whether they did. Appends rows to benchmarks/results/bench_runtime.csv.

    python benchmarks/bench_runtime.py [--model transformer|hybrid|all] [--bytes 1024]
        [--threads N] [--quick] [--no-record] [--note "machine loaded"]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
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
from _common import append_rows, base_row, print_table  # noqa: E402
from bench_generate import MODELS, build  # noqa: E402

STATS = re.compile(r"generated (\d+) bytes in ([0-9.]+) s")


def runtime_binary() -> str:
    built = ROOT / os.environ.get("MBLM_BUILD_DIR", "build/dev") / "mblm-run"
    if built.is_file():
        return str(built)
    installed = shutil.which("mblm-run")
    if installed is None:
        sys.exit("mblm-run not found: build it (bash tools/dev_build.sh, needs yaml-cpp)")
    return installed


def run_runtime(cmd: list[str], out: Path) -> tuple[float, bytes]:
    """Seconds mblm-run reports for its generate call, and the bytes it wrote."""
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"mblm-run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    match = STATS.search(done.stderr)
    if match is None:
        raise RuntimeError(f"no timing in mblm-run's --stats output:\n{done.stderr[-2000:]}")
    return float(match[2]), out.read_bytes()


def run_python(
    model, prompt: torch.Tensor, n: int, device: torch.device, decoder: str = "python"
) -> tuple[float, bytes]:
    """``model.generate`` on the Python decoder (``decoder="python"``) or on the default one
    (``"auto"``: the C++ runtime's, through mblm._C, where it applies)."""
    previous = os.environ.get("MBLM_DECODER")
    os.environ["MBLM_DECODER"] = decoder
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(prompt.to(device), num_tokens_to_generate=n, enable_progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        if previous is None:
            os.environ.pop("MBLM_DECODER")
        else:
            os.environ["MBLM_DECODER"] = previous
    # mblm-run writes bytes; ids above 255 (the pad id) have no byte and are left out
    return seconds, bytes(b for b in out[prompt.numel() :].tolist() if b < 256)


def bench_model(name: str, args, binary: str, tmp: Path) -> dict:
    device = torch.device(args.device)
    cfg = MODELS[name]
    model = build(cfg, device)
    config, weights = tmp / f"{name}.yaml", tmp / f"{name}.safetensors"
    config.write_text(yaml.safe_dump(cfg))
    from mblm.utils.safetensors import save_safetensors

    save_safetensors(model.state_dict(), weights)
    prompt = torch.randint(0, 256, (args.prompt,), generator=torch.Generator().manual_seed(5))
    prompt_file = tmp / "prompt.bin"
    prompt_file.write_bytes(bytes(prompt.tolist()))
    out = tmp / f"{name}.out"
    cmd = [
        binary,
        "--config", str(config),
        "--weights", str(weights),
        "--prompt-file", str(prompt_file),
        "--num-tokens", str(args.bytes),
        "--filter-thres", "1.0",
        "--seed", "0",
        "--threads", str(args.threads),
        "--device", args.device,
        "--output", str(out),
        "--stats",
    ]  # fmt: skip

    run_python(model, prompt, min(64, args.bytes), device)  # warm-ups
    run_python(model, prompt, min(64, args.bytes), device, "auto")
    runtime_s, python_s, default_s = [], [], []
    runtime_bytes = python_bytes = default_bytes = b""
    for _ in range(args.repeats):
        seconds, runtime_bytes = run_runtime(cmd, out)
        runtime_s.append(seconds)
        seconds, python_bytes = run_python(model, prompt, args.bytes, device)
        python_s.append(seconds)
        seconds, default_bytes = run_python(model, prompt, args.bytes, device, "auto")
        default_s.append(seconds)
    impl, peer = statistics.median(runtime_s), statistics.median(python_s)
    default = statistics.median(default_s)
    same = runtime_bytes == python_bytes == default_bytes
    if not same:
        print(f"WARNING {name}: mblm-run and MBLM.generate produced different bytes", flush=True)
    shape = f"seq_lens={cfg['seq_lens']} dims={cfg['hidden_dims']} layers={cfg['num_layers']}"
    notes = [
        f"runtime {args.bytes / impl:.0f} bytes/s",
        f"python decoder {args.bytes / peer:.0f} bytes/s",
        f"MBLM.generate default (runtime decoder via mblm._C) {args.bytes / default:.0f} bytes/s",
        "same bytes" if same else "DIFFERENT BYTES",
        args.note,
    ]
    return {
        **base_row(device),
        "device": args.device if device.type == "cuda" else f"cpu x{args.threads} threads",
        "threads": args.threads,
        "case": f"runtime_generate_{name}",
        "shape": f"B=1 prompt={args.prompt} N={args.bytes} {shape}",
        "dtype": "float32",
        "mode": "greedy",
        "impl_ms": impl * 1e3,
        "peer": "MBLM.generate (cached, Python decoder)",
        "peer_ms": peer * 1e3,
        "ratio": peer / impl,
        "repeats": args.repeats,
        "note": "; ".join(x for x in notes if x),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*sorted(MODELS), "all"], default="all")
    parser.add_argument("--bytes", type=int, default=1024, help="bytes generated per run")
    parser.add_argument("--prompt", type=int, default=100, help="prompt length in bytes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="256 bytes, one repeat")
    parser.add_argument("--no-record", action="store_true", help="do not append CSV rows")
    parser.add_argument("--note", default="", help="appended to every row's note")
    args = parser.parse_args()
    if args.quick:
        args.bytes, args.repeats = 256, 1
    torch.set_num_threads(args.threads)
    binary = runtime_binary()
    names = sorted(MODELS) if args.model == "all" else [args.model]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_model(name, args, binary, Path(tmp)) for name in names]
    print_table(rows, ["case", "shape", "impl_ms", "peer_ms", "ratio", "note"])
    if not args.no_record:
        print(f"appended to {append_rows('bench_runtime', rows)}")


if __name__ == "__main__":
    main()
