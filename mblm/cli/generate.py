"""``mblm-generate --checkpoint <file> --prompt <text>``: generate bytes with a trained MBLM and
stream them to stdout as they come.

The checkpoint is a ``<name>_top<k>.pth`` of a run directory (its ``config.yaml`` gives the model
config) or an exported ``.safetensors`` file (the config is in its metadata); ``--config``
overrides either.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path

from mblm.cli._common import FlushingBinaryStream, fail, load_model


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mblm-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help=".pth checkpoint or .safetensors file")
    p.add_argument("--config", default=None, help="config YAML with the model params")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="prompt text (UTF-8)")
    prompt.add_argument("--prompt-file", default=None, help="file whose bytes are the prompt")
    p.add_argument(
        "--bytes", type=int, default=256, help="bytes to generate (capped by the context)"
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--filter-thres",
        type=float,
        default=0.9,
        help="sample among the top (1 - filter_thres) of the vocabulary; 1.0 = greedy",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-echo", action="store_true", help="do not print the prompt first")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--decode",
        action="store_true",
        help="write UTF-8 text (invalid bytes as U+FFFD) instead of raw bytes",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, _ = load_model(args.checkpoint, args.config)
    model = model.to(args.device)
    prompt = Path(args.prompt_file).read_bytes() if args.prompt_file else args.prompt.encode("utf8")
    context = math.prod(model.seq_lens)
    if len(prompt) >= context:
        fail(f"the prompt has {len(prompt)} bytes; the model's context is {context}")
    num_bytes = min(args.bytes, context - len(prompt))
    if num_bytes <= 0:
        fail("--bytes must be positive")

    from mblm.utils.stream import ByteStreamer

    out = FlushingBinaryStream(sys.stdout.buffer)
    sys.stdout.flush()
    if not args.no_echo:
        out.write(prompt)
    prime = torch.tensor(list(prompt), dtype=torch.long, device=args.device) if prompt else None
    target = io.TextIOWrapper(out, encoding="utf8", write_through=True) if args.decode else out
    with ByteStreamer(target, decode_utf8=args.decode) as streamer:
        model.generate(
            prime,
            stream=streamer,
            num_tokens_to_generate=num_bytes,
            temperature=args.temperature,
            filter_thres=args.filter_thres,
        )
    out.write(b"\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
