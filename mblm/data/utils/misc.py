"""Loss-mask construction and value remapping."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def target_loss_mask(tensor_weight_pairs: Iterable[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """A float loss mask: for every ``(tensor, weight)`` pair, ``weight`` repeated once per
    element of the tensor, all concatenated."""
    parts = [torch.full_like(t, weight, dtype=torch.float) for t, weight in tensor_weight_pairs]
    return torch.cat(parts)


def shift_remap_tensor(
    tensor: torch.Tensor, range_start: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maps the distinct values of ``tensor`` (in sorted order) to ``range_start``,
    ``range_start + 1``, ...

    Returns ``(remapped, unique_values, inverse_indices)``: ``remapped`` has the shape and dtype
    of ``tensor`` and ``unique_values[inverse_indices]`` restores the original.
    """
    unique_values, inverse_indices = torch.unique(tensor, sorted=True, return_inverse=True)
    new_values = torch.arange(range_start, range_start + unique_values.numel(), dtype=tensor.dtype)
    return new_values[inverse_indices].reshape(tensor.shape), unique_values, inverse_indices
