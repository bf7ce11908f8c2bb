"""Model weights as safetensors files (https://github.com/huggingface/safetensors): a flat map of
named tensors plus string metadata, loadable without pickle by any language."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from mblm.utils.io import _fsync_dir, torch_load


def _require_safetensors():
    try:
        import safetensors.torch as st
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError(
            "exporting to safetensors needs the 'safetensors' package: pip install safetensors"
        ) from err
    return st


def save_safetensors(
    state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Writes ``state`` (CPU copies of its tensors) to ``path`` atomically."""
    st = _require_safetensors()
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages and t.numel() > 0:  # safetensors refuses shared storage
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        st.save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def load_safetensors(
    path: str | Path, device: str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` of a safetensors file."""
    st = _require_safetensors()
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file {path} does not exist")
    with safe_open(str(path), framework="pt", device=device) as f:
        metadata = f.metadata() or {}
    return st.load_file(str(path), device=device), metadata


def export_checkpoint(
    checkpoint_file: str | Path, out_file: str | Path, params_json: str | None = None
) -> Path:
    """Converts a ``{"MODEL", "LOSS"}`` .pth checkpoint into a safetensors file (metadata: the
    loss and, if given, the model params as JSON)."""
    snapshot = torch_load(checkpoint_file, map_location="cpu")
    if not isinstance(snapshot, dict) or "MODEL" not in snapshot:
        raise ValueError(f"{checkpoint_file} is not an mblm checkpoint (no MODEL entry)")
    metadata = {"format": "mblm", "loss": repr(float(snapshot.get("LOSS", float("nan"))))}
    if params_json is not None:
        json.loads(params_json)  # must be valid JSON
        metadata["params"] = params_json
    return save_safetensors(snapshot["MODEL"], out_file, metadata)
