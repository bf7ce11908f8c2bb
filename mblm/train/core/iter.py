"""``epoch_cycler``: endless iteration over a sized iterable (a DataLoader), epoch by epoch."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

_T = TypeVar("_T", covariant=True)


class _SizedIterable(Protocol[_T]):
    """Sized and iterable, like a DataLoader (which is not a Sequence)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[_T]: ...


@dataclass
class EpochCyclerYield(Generic[_T]):
    """One item with its epoch and batch index, and the indices of the item after it (where to
    resume)."""

    epoch: int
    batch: int
    item: _T
    next_epoch: int
    next_batch: int


def epoch_cycler(
    seq: _SizedIterable[_T],
    *,
    before_new_epoch: Callable[[int], Any] | None = None,
    start_epoch: int = 0,
    start_batch: int = 0,
    max_iters: int | None = None,
) -> Generator[EpochCyclerYield[_T], None, None]:
    """Iterates ``seq`` again and again, yielding ``EpochCyclerYield``s.

    Args:
        seq: sized iterable; its length is read again at every epoch (it may change).
        before_new_epoch: called with the epoch number before each epoch starts (including the
            first), e.g. to re-shuffle or shift a dataset.
        start_epoch: number of the first epoch.
        start_batch: skip this many items of the first epoch (they are still fetched).
        max_iters: stop after this many items in all (None: never stop).

    Raises IndexError when ``start_batch`` is not smaller than ``len(seq)``.
    """
    if start_batch >= len(seq):
        raise IndexError(
            f"start_batch ({start_batch}) is larger than the length of the sequence ({len(seq)})"
        )
    yielded = 0
    epoch, first = start_epoch, start_batch
    while True:
        if before_new_epoch:
            before_new_epoch(epoch)
        items = iter(seq)
        for _ in range(first):
            next(items)
        length = len(seq)
        for i in range(first, length):
            if yielded == max_iters:
                return
            item = next(items)
            last = i == length - 1
            yield EpochCyclerYield(
                epoch, i, item, epoch + 1 if last else epoch, 0 if last else i + 1
            )
            yielded += 1
        epoch, first = epoch + 1, 0
