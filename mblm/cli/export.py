"""``mblm-export <checkpoint.pth> [-o out.safetensors]``: convert a checkpoint to safetensors,
with the model params (from ``--config`` or the run's ``config.yaml``) in its metadata."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mblm.cli._common import fail, read_yaml


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mblm-export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", default=None)
    p.add_argument("--config", default=None)
    args = p.parse_args(argv)

    from mblm.utils.safetensors import export_checkpoint

    checkpoint = Path(args.checkpoint)
    config = Path(args.config) if args.config else checkpoint.with_name("config.yaml")
    params = read_yaml(config).get("params") if config.is_file() else None
    output = Path(args.output) if args.output else checkpoint.with_suffix(".safetensors")
    try:
        path = export_checkpoint(checkpoint, output, json.dumps(params) if params else None)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
