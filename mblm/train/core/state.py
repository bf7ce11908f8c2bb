"""What an exact resume needs beyond the model: random number generator states, the sampler
that fixes the training order, and the training-state file of a run.

The training state (``<run dir>/training_state.pt``) is written atomically after optimizer steps
at the validation cadence. It holds the latest model weights, the optimizer, LR scheduler and
gradient scaler states, every rank's RNG states, the loop position (epoch, batch, counters) and
the sizes the CSV logs had at that moment, plus the config that produced it. Loading it into a
fresh process continues the run exactly where it stood, so the losses that follow are those the
uninterrupted run would have logged.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

STATE_FILE_NAME = "training_state.pt"
STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# RNG states, in a form torch.load(weights_only=True) accepts (tensors, ints, lists, dicts)
# ---------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """The states of torch (CPU and every CUDA device), numpy's and Python's global generators."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {
            "version": py_version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``. CUDA states are restored when this process has as many
    devices as the one that captured them."""
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    py_state = state["python"]
    random.setstate(
        (py_state["version"], tuple(int(v) for v in py_state["state"].tolist()), py_state["gauss"])
    )


# ---------------------------------------------------------------------------------------------
# Training order
# ---------------------------------------------------------------------------------------------


class EpochSampler(Sampler[int]):
    """Indices of one epoch, in order or in a permutation fixed by ``(seed, epoch)``, starting at
    a given position. The order of an epoch does not depend on any global generator, so a
    resumed run sees exactly the samples the uninterrupted one would have, without reading the
    skipped ones.
    """

    def __init__(self, data: Sized, shuffle: bool, seed: int) -> None:
        self.data = data
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch's order and skips its first ``start`` indices."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        n = len(self.data)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=generator)[self.start :].tolist()
        else:
            order = range(self.start, n)
        return iter(order)

    def __len__(self) -> int:
        return max(len(self.data) - self.start, 0)
