"""Seeding of every random number generator the project uses."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seeds torch (all devices), numpy's global generator and Python's ``random``.

    As in the original, no determinism flags (cuDNN, deterministic algorithms) are changed.
    """
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
