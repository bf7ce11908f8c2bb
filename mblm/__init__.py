"""mblm-cpp: the Multiscale Byte Language Model with a C++/CUDA compute core.

A drop-in replacement for the ``mblm`` package: same import paths, configs and checkpoints.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import torch  # noqa: F401  (torch first: the extension links against it)


def _source_tree_version() -> str:
    """The version in the pyproject.toml next to the package (running from a source checkout)."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf8")
    except OSError:
        return "0.0.0"
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, flags=re.MULTILINE)
    return match.group(1) if match else "0.0.0"


def _version() -> str:
    try:
        return importlib.metadata.version("mblm-cpp")
    except importlib.metadata.PackageNotFoundError:
        return _source_tree_version()


__version__ = _version()

from mblm.model.config import MBLMEncoderModelConfig, MBLMModelConfig, MBLMReturnType  # noqa: E402
from mblm.model.mamba import MambaBlock  # noqa: E402
from mblm.model.mblm import MBLM, MBLMEncoder  # noqa: E402
from mblm.model.transformer import TransformerBlock, TransformerEncoderBlock  # noqa: E402

__all__ = [
    "MBLM",
    "MBLMEncoder",
    "MBLMModelConfig",
    "MBLMEncoderModelConfig",
    "MBLMReturnType",
    "TransformerBlock",
    "TransformerEncoderBlock",
    "MambaBlock",
]
