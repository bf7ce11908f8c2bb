"""Times ``MBLM.generate`` of one MBLM implementation in a fresh process.

Run by bench_generate.py with this project's Python and with the original package's venv; both
import ``mblm``, so the same script measures either. For every requested prompt length it
generates ``--steps`` bytes after a prompt of that length and reports the seconds per generated
byte (the full-recompute loop's cost of a step grows with the length it recomputes, so a few
lengths sample the cost of a long generation). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import yaml


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="YAML model config")
    parser.add_argument("--lengths", required=True, help="comma-separated prompt lengths")
    parser.add_argument("--steps", type=int, default=4, help="bytes generated per length")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-cache", action="store_true", help="mblm-cpp: use_cache=False")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import mblm
    from mblm import MBLM, MBLMModelConfig

    torch.manual_seed(0)
    with open(args.config, encoding="utf8") as f:
        cfg = MBLMModelConfig.model_validate(yaml.safe_load(f))
    device = torch.device(args.device)
    model = MBLM(cfg).to(device).eval()
    extra = {"use_cache": False} if args.no_cache else {}
    gen = torch.Generator().manual_seed(1)
    per_byte = {}
    for length in (int(x) for x in args.lengths.split(",")):
        prime = torch.randint(0, 256, (length,), generator=gen).to(device)
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(prime, num_tokens_to_generate=args.steps, enable_progress=False, **extra)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / args.steps)
        per_byte[length] = statistics.median(times)
    print(json.dumps({"file": mblm.__file__, "torch": torch.__version__, "per_byte_s": per_byte}))


if __name__ == "__main__":
    main()
