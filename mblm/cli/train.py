"""``mblm-train --config <yaml> [--nproc N]``: train MBLM from a YAML config.

Single process by default; ``--nproc N`` (N > 1) runs ``torchrun --standalone
--nproc_per_node=N`` on this same command (DDP over Gloo on CPU, NCCL on GPUs). For several
nodes, launch ``torchrun ... -m mblm.cli.train --config <yaml>`` on each node yourself.

A top-level ``cli:`` section of the YAML (ignored by the config schema) may set defaults for the
options below: ``seed``, ``sample_prompt``, ``sample_bytes``, ``threads``.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

from pydantic import ValidationError

from mblm.cli._common import fail, read_yaml, validation_message


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mblm-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", "-c", required=True, help="training config (YAML)")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (torchrun)")
    p.add_argument(
        "--seed", type=int, default=None, help="seed of every RNG (default: cli.seed or 0)"
    )
    p.add_argument(
        "--job-id",
        default=None,
        help="run id (default: $JOB_ID or the start time); "
        "a run directory with an unfinished training state is resumed",
    )
    p.add_argument("--output-dir", default=None, help="override io.output_dir")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument(
        "--sample-bytes",
        type=int,
        default=None,
        help="bytes to generate with the best model after training (0: none)",
    )
    p.add_argument("--sample-prompt", default=None, help="prompt of that sample")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _launch_torchrun(args: argparse.Namespace) -> int:
    forwarded = [a for a in sys.argv[1:]]
    # drop --nproc N / --nproc=N
    cleaned: list[str] = []
    skip = False
    for a in forwarded:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        cleaned.append(a)
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc))
    # one run id for all processes and all restarts of this launch
    env.setdefault("JOB_ID", args.job_id or f"{time.time():.0f}")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "-m",
        "mblm.cli.train",
        *cleaned,
    ]
    return subprocess.call(cmd, env=env)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.nproc < 1:
        fail("--nproc must be at least 1")
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_torchrun(args)

    raw = read_yaml(args.config)
    cli = raw.get("cli") or {}
    if args.output_dir:
        raw.setdefault("io", {})["output_dir"] = args.output_dir

    import torch

    from mblm.train.core.trainer import CoreTrainerOptions
    from mblm.train.mblm import TrainEntryConfig, train_mblm
    from mblm.utils.seed import seed_everything

    try:
        config = TrainEntryConfig.model_validate(raw)
    except ValidationError as err:
        fail(validation_message(args.config, err))

    threads = args.threads or cli.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    if args.job_id:
        os.environ["JOB_ID"] = args.job_id
    seed_everything(args.seed if args.seed is not None else int(cli.get("seed", 0)))
    rank = int(os.environ.get("RANK", "0"))
    progress = not args.no_progress and rank == 0
    options = CoreTrainerOptions(
        display_progress=progress,
        train_prog_min_interval_seconds=1 if sys.stderr.isatty() else 15,
    )

    start = time.perf_counter()
    try:
        trainer = train_mblm(config, options=options)
    except (ValueError, KeyError, OSError) as err:
        fail(str(err).strip("'\""), code=1)
    elapsed = time.perf_counter() - start
    if rank != 0:
        return 0

    _report(trainer, config, elapsed)
    sample_bytes = (
        args.sample_bytes if args.sample_bytes is not None else cli.get("sample_bytes", 0)
    )
    if sample_bytes:
        prompt = (
            args.sample_prompt if args.sample_prompt is not None else cli.get("sample_prompt", "")
        )
        _sample(trainer, prompt, int(sample_bytes))
    return 0


def _report(trainer, config, elapsed: float) -> None:
    import csv

    rows = list(csv.DictReader((trainer.output_dir / "loss.csv").open(newline="")))
    valid = [float(r["loss"]) for r in rows if r["kind"] == "valid"]
    test = [float(r["loss"]) for r in rows if r["kind"] == "test"]
    train_rows = [r for r in rows if r["kind"] == "train"]
    elements = int(train_rows[-1]["elements_seen"]) * trainer._world_size if train_rows else 0
    unit = "bytes" if config.train.target_elements_strategy == "sequence" else "samples"
    ln2 = math.log(2)
    print(f"\nrun directory: {trainer.output_dir}")
    print(
        f"trained on {elements:,} {unit} in {elapsed:.1f} s ({elements / max(elapsed, 1e-9):,.0f} {unit}/s, "
        "including validation)"
    )
    if valid:
        print(
            f"validation: first {valid[0] / ln2:.3f} bits per byte, best {min(valid) / ln2:.3f}, "
            f"last {valid[-1] / ln2:.3f} (loss {min(valid):.4f} nats)"
        )
    if test:
        print(f"test: {test[-1] / ln2:.3f} bits per byte")
    print(f"chain a next run: mblm-train --config {trainer.output_dir / 'config.yaml'}")


def _sample(trainer, prompt: str, num_bytes: int) -> None:
    import torch

    from mblm.utils.stream import ByteStreamer

    model = trainer._unpack_distributed_model(trainer._model_dist).eval()
    context = math.prod(model.seq_lens)
    prime = torch.tensor(
        list(prompt.encode("utf8")), dtype=torch.long, device=next(model.parameters()).device
    )
    num_bytes = min(num_bytes, context - prime.numel())
    if num_bytes <= 0:
        return
    print(f"\nsample ({num_bytes} bytes after the prompt, temperature 0.8):")
    print(prompt, end="", flush=True)
    # decoded as UTF-8 on the fly (invalid bytes show as U+FFFD), flushed byte by byte
    stream = _FlushingText(sys.stdout)
    with ByteStreamer(stream, decode_utf8=True) as streamer:
        model.generate(
            prime if prime.numel() else None,
            stream=streamer,
            num_tokens_to_generate=num_bytes,
            temperature=0.8,
            filter_thres=0.9,
        )
    print(flush=True)


class _FlushingText:
    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()


if __name__ == "__main__":
    raise SystemExit(main())
