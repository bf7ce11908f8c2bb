"""Shared pieces of the command-line tools: config loading with readable errors, model loading
from a checkpoint (.pth or .safetensors)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml
from pydantic import ValidationError

from mblm.model.config import MBLMModelConfig
from mblm.model.mblm import MBLM


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        fail(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf8"))
    except yaml.YAMLError as err:
        fail(f"{path} is not valid YAML: {err}")
    if not isinstance(data, dict):
        fail(f"{path} does not hold a mapping of config sections")
    return data


def validation_message(path: str | Path, err: ValidationError) -> str:
    lines = [f"invalid config {path}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def model_config_from_params(params: dict[str, Any]) -> MBLMModelConfig:
    fields = set(MBLMModelConfig.model_fields)
    return MBLMModelConfig.model_validate({k: v for k, v in params.items() if k in fields})


def load_model(checkpoint: str | Path, config: str | Path | None = None) -> tuple[MBLM, dict]:
    """An MBLM (eval mode) with the weights of ``checkpoint`` and the run's params.

    The params come from ``config`` (a training or output config), else from the safetensors
    metadata, else from the ``config.yaml`` next to a .pth checkpoint.
    """
    from mblm.utils.io import torch_load
    from mblm.utils.safetensors import load_safetensors

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        fail(f"checkpoint {checkpoint} does not exist")
    metadata: dict[str, str] = {}
    if checkpoint.suffix == ".safetensors":
        state, metadata = load_safetensors(checkpoint)
    else:
        try:
            snapshot = torch_load(checkpoint, map_location="cpu")
        except ValueError as err:
            fail(str(err))
        if not isinstance(snapshot, dict) or "MODEL" not in snapshot:
            fail(f"{checkpoint} is not an mblm checkpoint (no MODEL entry)")
        state = snapshot["MODEL"]
    if config is not None:
        params = read_yaml(config).get("params")
        source = str(config)
    elif "params" in metadata:
        params = json.loads(metadata["params"])
        source = f"{checkpoint} metadata"
    else:
        sibling = checkpoint.with_name("config.yaml")
        if not sibling.is_file():
            fail(f"no model config for {checkpoint}: pass --config <the run's config.yaml>")
        params = read_yaml(sibling).get("params")
        source = str(sibling)
    if not isinstance(params, dict):
        fail(f"{source} has no params section")
    try:
        model_config = model_config_from_params(params)
    except ValidationError as err:
        fail(validation_message(source, err))
    model = MBLM(model_config)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as err:
        fail(f"checkpoint {checkpoint} does not fit the config from {source}:\n{err}")
    return model.eval(), params


class FlushingBinaryStream(io.BufferedIOBase):
    """A binary stream that flushes after every write (bytes appear as they are generated)."""

    def __init__(self, raw) -> None:
        super().__init__()
        self._raw = raw

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = self._raw.write(data)
        self._raw.flush()
        return n

    def flush(self) -> None:
        self._raw.flush()
