"""Train step (forward + backward) of an MBLM: mblm-cpp vs the original mblm.

``--model transformer``: 3-stage Transformer (issue 3); ``--model hybrid``: paper-style hybrid
with a Mamba1 global stage (the layout the original builds on CPU, via mambapy) and a local
Transformer stage (issue 4).

The original (PyPI mblm 0.4.2, pure PyTorch) runs in its own venv (made by
benchmarks/setup_original.sh, or given with --orig-python); both sides run
benchmarks/_model_worker.py in fresh processes, alternately, with the same config, seed, input
length and thread count. Peak memory is the growth of the process's peak RSS over the timed
steps (activations, gradients and temporaries; the model's weights are excluded).

    python benchmarks/bench_model.py [--model transformer|hybrid] [--rounds 3] [--device cpu]
    python benchmarks/bench_model.py --model paper-transformer --device cuda --dtype bfloat16 \
        --rounds 1 --repeats 2      # issue 8: paper-sized, 1M bytes (paper-hybrid: 128K bytes)
"""

from __future__ import annotations

import argparse
import json
import math
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


def _paper_stage(block: dict) -> dict:
    return (
        {**block, "attn_head_dims": 64, "attn_num_heads": 16}
        if "attn_head_dims" in block
        else block
    )


# Issue 8 (GPU, bf16): the paper-sized 3-stage models, dims 1024, layers [9, 8, 8], patch sizes
# 16 and 8, checkpoint chunks [10, 20]. The original was measured at 1M bytes (Transformer) and
# 128K bytes (mambapy hybrid: the largest it fits on an H100 80 GB); the global length sets L.
PAPER_TRANSFORMER = {
    **TRANSFORMER,
    "hidden_dims": [1024, 1024, 1024],
    "seq_lens": [8192, 16, 8],
    "num_layers": [9, 8, 8],
    "train_checkpoint_chunks": [10, 20],
    "block": [_paper_stage(TRANSFORMER["block"][0])] * 3,
}
PAPER_HYBRID = {
    **PAPER_TRANSFORMER,
    "seq_lens": [1024, 16, 8],
    "block": [HYBRID["block"][0], *PAPER_TRANSFORMER["block"][1:]],
}

MODELS = {
    "transformer": TRANSFORMER,
    "hybrid": HYBRID,
    "paper-transformer": PAPER_TRANSFORMER,
    "paper-hybrid": PAPER_HYBRID,
}
CASES = {
    "transformer": "train_step_3stage_transformer",
    "hybrid": "train_step_hybrid_mamba1",
    "paper-transformer": "train_step_paper_transformer",
    "paper-hybrid": "train_step_paper_hybrid_mamba1",
}


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
        *(["--gemm-floor"] if args.gemm_floor else []),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT / "benchmarks")
    if out.returncode != 0:
        raise RuntimeError(f"worker failed ({python}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="transformer")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="input bytes (default: the model's full length)"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=3, help="alternating process pairs")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--orig-python", default=None, help="python of a venv with mblm==0.4.2")
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument(
        "--gemm-floor",
        action="store_true",
        help="also time each side's GEMMs alone: the floor no implementation of the step beats",
    )
    args = parser.parse_args()

    if args.seq_len is None:
        args.seq_len = math.prod(MODELS[args.model]["seq_lens"])
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
    if args.gemm_floor:
        floor = statistics.median(r["gemm_floor_s"] for r in ours)
        orig_floor = statistics.median(r["gemm_floor_s"] for r in orig)
        print(
            f"GEMMs alone: ours {floor * 1e3:.1f} ms ({ours[0]['gemm_gflop']:.1f} GFLOP, "
            f"{floor / ours_s:.0%} of our step), original {orig_floor * 1e3:.1f} ms "
            f"({orig[0]['gemm_gflop']:.1f} GFLOP); the most any implementation doing our GEMMs "
            f"at this speed could reach: {orig_s / floor:.2f}x"
        )
        row["note"] += (
            f"; gemm floor {floor * 1e3:.1f} ms ({ours[0]['gemm_gflop']:.1f} GFLOP), original "
            f"{orig_floor * 1e3:.1f} ms; ceiling {orig_s / floor:.2f}x"
        )
    if not args.no_csv:
        print(f"appended to {append_rows('bench_model', [row])}")


if __name__ == "__main__":
    main()
