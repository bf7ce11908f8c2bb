"""A bounded priority queue that keeps the n best (smallest, or largest) items seen."""

from __future__ import annotations

import copy
import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, SupportsFloat, TypeVar

_T = TypeVar("_T")


@dataclass(order=True)
class _Entry(Generic[_T]):
    """A heap entry ordered by its (signed) value only."""

    val: float
    item: _T = field(compare=False)


class TopN(Generic[_T]):
    """Keeps the ``n`` smallest items (or the ``n`` largest with ``top_largest=True``).

    Items are ``(value, item)`` tuples. A heap of ``sign * value`` keeps the worst kept item at its
    root, so a new item replaces the root only when it is better. ``n == 0`` makes every ``add`` a
    no-op. Iterating yields the kept items best first (ties in the heap's list order).

    Args:
        n: how many items to keep.
        deep_copy: store a deep copy of each added item.
        top_largest: keep the largest values instead of the smallest.
    """

    def __init__(self, n: int, *, deep_copy: bool = False, top_largest: bool = False):
        self._max_heap_items = n
        self._heap: list[_Entry[_T]] = []
        self._top_largest = top_largest
        self._heap_factor = 1.0 if top_largest else -1.0
        self._deep_copy = deep_copy

    def add(self, item: tuple[SupportsFloat, _T]) -> None:
        """Offers ``(value, item)``; it is kept if there is room or it beats the worst kept one."""
        if self._max_heap_items == 0:
            return
        val, data = item
        if self._deep_copy:
            data = copy.deepcopy(data)
        entry = _Entry(self._heap_factor * float(val), data)
        if len(self._heap) < self._max_heap_items:
            heapq.heappush(self._heap, entry)
        elif entry > self._heap[0]:
            heapq.heapreplace(self._heap, entry)

    def get_top(self, best: int | None = None) -> list[tuple[float, _T]]:
        """The ``best`` best items (all kept items when ``best`` is None or 0), best first."""
        if not best:
            best = self._max_heap_items
        ranked = sorted(
            ((self._heap_factor * e.val, e.item) for e in self._heap),
            key=lambda pair: pair[0],
            reverse=self._top_largest,
        )
        return ranked[:best]

    def __iter__(self) -> Iterator[tuple[float, _T]]:
        return iter(self.get_top())

    def __len__(self) -> int:
        return len(self._heap)
