"""The mblm compute core: custom operators in ``torch.ops.mblm``.

Importing this package loads the compiled extension ``mblm._C`` (which registers the C++/CUDA
kernels) and then the per-family Python modules, which add fake (meta) implementations and
autograd formulas. ``mblm.ops.reference`` holds the plain-PyTorch meaning of every op.
"""

from __future__ import annotations

import torch  # noqa: F401  (torch must be loaded before the extension)

from mblm.ops._loader import build_info, load_extension, ssd_cpu_isa

load_extension()

from mblm.ops import (  # noqa: E402  (registers fakes and autograd)
    attention,
    conv,
    decode,
    gelu,
    loss,
    norm,
    patch,
    scan,
    ssd,
)

__all__ = [
    "attention",
    "build_info",
    "conv",
    "decode",
    "gelu",
    "loss",
    "norm",
    "patch",
    "scan",
    "ssd",
    "ssd_cpu_isa",
]
