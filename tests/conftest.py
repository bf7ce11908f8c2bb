import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


def _cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    import mblm.ops

    return bool(mblm.ops.build_info()["cuda"])


CUDA_READY = _cuda_ready()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a GPU and an mblm build with CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not CUDA_READY:
            item.add_marker(skip_cuda)


def devices() -> list[str]:
    """The devices op tests run on: cpu always, cuda when a GPU and the CUDA kernels exist."""
    return ["cpu", "cuda"] if CUDA_READY else ["cpu"]
