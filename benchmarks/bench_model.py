"""Train step (forward + backward) of an MBLM: mblm-cpp vs the original mblm.

``--model transformer``: 3-stage Transformer (issue 3); ``--model hybrid``: paper-style hybrid
with a Mamba1 global stage (the layout the original builds on CPU, via mambapy) and a local
Transformer stage (issue 4).

The original (PyPI mblm 0.4.2, pure PyTorch) runs in its own venv (made by
benchmarks/setup_original.sh, or given with --orig-python); both sides run
benchmarks/_model_worker.py in fresh processes, alternately, with the same config, seed, input
length and thread count. Peak memory is the growth of the process's peak RSS over the timed
steps (activations, gradients and temporaries; the model's weights are excluded).

    python benchmarks/bench_model.py [--seq-len 8192] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_rows, base_row, original_python, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# Issue 3: seq_lens [64, 16, 8], dims [256, 256, 128], 2 layers each (L = 8192).
TRANSFORMER = {
    "num_tokens": 257,
    "pad_token_id": 256,
    "hidden_dims": [256, 256, 128],
    "seq_lens": [64, 16, 8],
    "num_layers": [2, 2, 2],
    "train_checkpoint_chunks": None,
    "block": [
        {
            "block_type": "transformer",
            "attn_head_dims": 32,
            "attn_num_heads": 8,
            "attn_use_rot_embs": True,
            "pos_emb_type": "fixed",
        },
        {
            "block_type": "transformer",
            "attn_head_dims": 32,
            "attn_num_heads": 8,
            "attn_use_rot_embs": True,
            "pos_emb_type": "fixed",
        },
        {
            "block_type": "transformer",
            "attn_head_dims": 32,
            "attn_num_heads": 4,
            "attn_use_rot_embs": True,
            "pos_emb_type": "fixed",
        },
    ],
}

# Issue 4: Mamba global stage (512 patches) + Transformer local stage (16 bytes), L = 8192.
HYBRID = {
    "num_tokens": 257,
    "pad_token_id": 256,
    "hidden_dims": [512, 256],
    "seq_lens": [512, 16],
    "num_layers": [2, 2],
    "train_checkpoint_chunks": None,
    "block": [
        {
            "block_type": "mamba1",
            "d_state": 16,
            "d_conv": 4,
            "expand": 2,
            "headdim": 64,
            "pos_emb_type": None,
        },
        {
            "block_type": "transformer",
            "attn_head_dims": 32,
            "attn_num_heads": 8,
            "attn_use_rot_embs": True,
            "pos_emb_type": "fixed",
        },
    ],
}

MODELS = {"transformer": TRANSFORMER, "hybrid": HYBRID}
CASES = {"transformer": "train_step_3stage_transformer", "hybrid": "train_step_hybrid_mamba1"}


def run_worker(python: str, env: dict[str, str], config: Path, args: argparse.Namespace) -> dict:
    cmd = [
        python,
        str(ROOT / "benchmarks" / "_model_worker.py"),
        "--config",
        str(config),
        "--seq-len",
        str(args.seq_len),
        "--batch",
        str(args.batch),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT / "benchmarks")
    if out.returncode != 0:
        raise RuntimeError(f"worker failed ({python}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="transformer")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=3, help="alternating process pairs")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--orig-python", default=None, help="python of a venv with mblm==0.4.2")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args()

    orig_python = original_python(args.orig_python)
    ours_env = dict(os.environ, PYTHONPATH=str(ROOT))
    orig_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    orig_env["PYTEST_CURRENT_TEST"] = "bench"  # silences the original's Mamba fallback warning

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "model.yaml"
        config.write_text(yaml.safe_dump(MODELS[args.model]))
        ours, orig = [], []
        for _ in range(args.rounds):
            ours.append(run_worker(sys.executable, ours_env, config, args))
            orig.append(run_worker(orig_python, orig_env, config, args))

    assert "orig" not in ours[0]["file"] and ours[0]["file"] != orig[0]["file"], (
        "same package twice"
    )
    ours_s = statistics.median(r["median_s"] for r in ours)
    orig_s = statistics.median(r["median_s"] for r in orig)
    ours_mem = statistics.median(r["peak_mem_mib"] for r in ours)
    orig_mem = statistics.median(r["peak_mem_mib"] for r in orig)
    cfg = MODELS[args.model]
    shape = f"B={args.batch} L={args.seq_len} seq_lens={cfg['seq_lens']} dims={cfg['hidden_dims']}"
    row = {
        **base_row(torch.device(args.device)),
        "threads": args.threads,
        "case": CASES[args.model],
        "shape": shape,
        "dtype": args.dtype,
        "mode": "fwd+bwd",
        "impl_ms": ours_s * 1e3,
        "peer": "mblm==0.4.2",
        "peer_ms": orig_s * 1e3,
        "ratio": orig_s / ours_s,
        "impl_peak_mib": ours_mem,
        "peer_peak_mib": orig_mem,
        "repeats": args.repeats * args.rounds,
        "note": f"params {ours[0]['params']}; memory ratio {ours_mem / orig_mem:.3f}",
    }
    print_table(
        [row], ["case", "shape", "impl_ms", "peer_ms", "ratio", "impl_peak_mib", "peer_peak_mib"]
    )
    print(f"speed-up {row['ratio']:.2f}x, peak memory {ours_mem / orig_mem:.2f}x of the original")
    if not args.no_csv:
        print(f"appended to {append_rows('bench_model', [row])}")


if __name__ == "__main__":
    main()
