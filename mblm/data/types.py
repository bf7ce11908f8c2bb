"""Batch types produced by the datasets and the dataset modes."""

from __future__ import annotations

from enum import Enum
from typing import TypeAlias

import torch


class ModelMode(Enum):
    """Which split a dataset serves."""

    TRAIN = "train"
    VALID = "valid"
    TEST = "test"


# (input ids, loss mask) of one sample or one batch
BatchWithLossMask: TypeAlias = tuple[torch.Tensor, torch.Tensor]
# (masked input ids, boolean mask of the masked positions, labels)
BatchMaskedForMLM: TypeAlias = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
