"""Times train steps (forward + backward) of one MBLM implementation in a fresh process.

Run by bench_model.py, once with this project's Python and once with the original package's
venv; both import ``mblm``, so the same script measures either. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
import yaml


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="YAML model config")
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--gemm-floor", action="store_true", help="also time the step's GEMMs alone"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import mblm
    from mblm import MBLM, MBLMModelConfig, MBLMReturnType

    torch.manual_seed(0)
    with open(args.config, encoding="utf8") as f:
        cfg = MBLMModelConfig.model_validate(yaml.safe_load(f))
    device = torch.device(args.device)
    model = MBLM(cfg).to(device).train()
    amp_dtype = getattr(torch, args.dtype)
    x = torch.randint(0, cfg.num_tokens - 1, (args.batch, args.seq_len), device=device)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            loss = model(x, return_type=MBLMReturnType.LOSS)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    base_rss = rss_peak_mib()
    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.repeats)]
    from _common import peak_memory_mib  # torch-only helper, importable from either venv

    alloc_peak = peak_memory_mib(step, device)
    result = {
        "impl": getattr(mblm, "__name__", "mblm"),
        "file": mblm.__file__,
        "torch": torch.__version__,
        "median_s": statistics.median(times),
        "min_s": min(times),
        # bytes through torch's allocator during one step (deterministic; the main figure)
        "peak_mem_mib": alloc_peak,
        # growth of the process's peak RSS over the timed steps (CPU; noisy, allocator-dependent)
        "rss_growth_mib": rss_peak_mib() - base_rss,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if args.gemm_floor:
        from _gemm_floor import gemm_floor_seconds

        result["gemm_floor_s"], result["gemm_gflop"] = gemm_floor_seconds(step)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
