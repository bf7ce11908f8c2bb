"""``DistributedDataset``: a map-style dataset whose items are spread over several workers.

Each worker (a training process) sees a contiguous, equally sized part of the underlying data:
``data_size // num_workers`` elements (the remainder is dropped). A *sequential* dataset is one
long stream (bytes of books, say) cut into windows of ``seq_len`` elements; its window start can
be shifted with ``offset_to`` so that every epoch sees different window boundaries. A
non-sequential dataset has one sample per element (a question, an image).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TypeVar

from torch.utils.data import Dataset
from typing_extensions import TypedDict, Unpack

_T = TypeVar("_T")


class DistributedDatasetConfig(TypedDict):
    """How a dataset is split: sample length and this worker's share."""

    seq_len: int
    worker_id: int
    num_workers: int


class DatasetConfigError(ValueError, AssertionError):
    """A dataset cannot be split as asked. Also an AssertionError, as the original asserted."""


class DistributedDataset(ABC, Dataset[_T]):
    """Base class of every dataset the trainer uses.

    Subclasses call ``super().__init__(data_size, is_sequential, **config)`` once they know how
    many elements they hold and implement ``get_sample(from_idx)``, where ``from_idx`` is an
    index into the whole (undistributed) data: for a sequential dataset the start of a window of
    ``self.seq_len`` elements, otherwise the element itself.

    Args:
        data_size: number of elements of the whole data.
        is_sequential: items are windows of ``seq_len`` elements of one stream (True) or
            single elements (False).
        seq_len, worker_id, num_workers: see ``DistributedDatasetConfig``.
    """

    def __init__(
        self,
        data_size: int,
        is_sequential: bool,
        **kwargs: Unpack[DistributedDatasetConfig],
    ):
        seq_len, worker_id, num_workers = (
            kwargs["seq_len"],
            kwargs["worker_id"],
            kwargs["num_workers"],
        )
        if num_workers <= 0:
            raise DatasetConfigError("num_workers must be positive")
        if worker_id >= num_workers:
            raise DatasetConfigError(
                f"worker_id ({worker_id}) must be smaller than num_workers ({num_workers})"
            )
        share = data_size // num_workers
        if is_sequential and share < seq_len:
            raise DatasetConfigError(
                f"Worker's data is too small: {share} elements per worker "
                f"({data_size} in all, {num_workers} workers) < seq_len {seq_len}"
            )
        if not is_sequential and share < 1:
            raise DatasetConfigError(
                f"Worker's data is too small: {data_size} items for {num_workers} workers"
            )
        self._worker_range_start = worker_id * share
        self._worker_range_end = self._worker_range_start + share
        self._worker_numel = share

        self.is_sequential = is_sequential
        self.seq_len = seq_len
        self.sample_offset = 0

    def offset_to(self, offset: int) -> DistributedDataset[_T]:
        """Shifts the window start of a sequential dataset to ``offset % seq_len`` (no-op for a
        non-sequential one). Returns self."""
        if self.is_sequential:
            self.sample_offset = offset % self.seq_len
        return self

    def offset_one(self) -> DistributedDataset[_T]:
        """``offset_to(sample_offset + 1)``."""
        return self.offset_to(self.sample_offset + 1)

    @abstractmethod
    def get_sample(self, from_idx: int) -> _T:
        """The sample starting at ``from_idx`` of the whole data (see the class docstring)."""
        ...

    def __len__(self) -> int:
        """Number of items of this worker: whole windows after the offset, or elements."""
        if not self.is_sequential:
            return self._worker_numel
        return max((self._worker_numel - self.sample_offset) // self.seq_len, 0)

    def __getitem__(self, idx: int) -> _T:
        step = self.seq_len if self.is_sequential else 1
        return self.get_sample(self._worker_range_start + self.sample_offset + idx * step)
