"""PG19 (https://github.com/google-deepmind/pg19): books from Project Gutenberg as raw bytes.

The dataset directory has the published layout (only the split folders are read)::

    <data_dir>/
        train/        <book id>.txt, one file per book
        validation/
        test/
        metadata.csv  (optional)

A split is the concatenation of its files in name order. Each worker reads only the bytes of its
own share of the split, not the whole split.
"""

from __future__ import annotations

import random
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import tqdm
from pydantic import BaseModel
from typing_extensions import Unpack

from mblm.data.dataset._files import file_sizes, list_files, read_range, require_dir
from mblm.data.datasets import DistributedDataset, DistributedDatasetConfig
from mblm.data.types import BatchWithLossMask, ModelMode

if TYPE_CHECKING:
    from mblm.train.mblm import TrainEntryConfig

PG19_LAYOUT = (
    "Expected the published PG19 layout: <data_dir>/train, <data_dir>/validation and "
    "<data_dir>/test, each holding one .txt file per book."
)

_SPLIT_DIRS = {ModelMode.TRAIN: "train", ModelMode.VALID: "validation", ModelMode.TEST: "test"}


class PG19ModelGeneration(BaseModel):
    """One record of a generation experiment on PG19."""

    id_model: str
    book_id: str
    book_txt_offset: int
    ctx_len: int
    generated: list[int]
    truth: list[int]
    ce: float
    generation_time: float
    timestamp: str


class _BookSplit:
    """The files of one PG19 split, their sizes and a reader of this worker's byte range."""

    def __init__(self, data_dir: str | Path, mode: ModelMode, dataset: str):
        root = require_dir(Path(data_dir), dataset, PG19_LAYOUT)
        self.dataset = dataset
        self.split_dir = root / _SPLIT_DIRS[mode]
        self.files = list_files(self.split_dir, dataset, PG19_LAYOUT)
        self.sizes = file_sizes(self.files, dataset)
        self.total = sum(self.sizes)
        if self.total == 0:
            raise ValueError(
                f"{dataset}: all {len(self.files)} files in {self.split_dir} are empty"
            )

    def read(self, start: int, end: int, mininterval: float, show: bool) -> torch.Tensor:
        with tqdm.tqdm(
            total=len(self.files),
            desc=f"Loading {self.dataset} {self.split_dir}",
            mininterval=mininterval,
            disable=not show,
        ) as bar:
            return read_range(self.files, self.sizes, start, end, self.dataset, bar)


class _BookAccess:
    """Access to the books of a split and to random windows of this worker's bytes, shared by
    PG19 and PG19Masked (which set ``txt_files``, ``data`` and ``seq_len``)."""

    txt_files: list[Path]
    data: torch.Tensor
    seq_len: int

    def book(self, name: str) -> str:
        """The text of the book file ``name`` (e.g. ``"44381.txt"``)."""
        for path in self.txt_files:
            if path.name == name:
                return path.read_text(encoding="utf8")
        raise ValueError(f"Book {name} does not exist")

    def iter_sequences_rand(self) -> Generator[torch.Tensor, None, None]:
        """Endless random windows of ``seq_len`` bytes of this worker's data (``random``)."""
        last_start = len(self.data) - self.seq_len - 1
        while True:
            start = random.randint(0, last_start)
            yield self.data[start : start + self.seq_len]

    def iter_books(self, shuffle: bool = False) -> Generator[tuple[str, str], None, None]:
        """``(file name, text)`` of every book, in reading order or shuffled (``random``)."""
        order = list(range(len(self.txt_files)))
        if shuffle:
            random.shuffle(order)
        for i in order:
            path = self.txt_files[i]
            yield path.name, path.read_text(encoding="utf8")


class PG19(_BookAccess, DistributedDataset[BatchWithLossMask]):
    """Sequential byte dataset over one PG19 split; a sample is ``(bytes as long, ones as
    float16 loss mask)`` of ``seq_len`` bytes.

    ``self.data`` holds this worker's bytes (the whole split when ``num_workers == 1``);
    ``self.txt_files`` lists the split's files in reading order.
    """

    def __init__(
        self,
        data_dir: str | Path,
        mode: ModelMode,
        load_mininterval: int = 30,
        display_load_progress: bool = True,
        **config: Unpack[DistributedDatasetConfig],
    ):
        split = _BookSplit(data_dir, mode, "PG19")
        self.txt_files: list[Path] = split.files
        super().__init__(data_size=split.total, is_sequential=True, **config)
        self.data = split.read(
            self._worker_range_start,
            self._worker_range_end,
            load_mininterval,
            display_load_progress,
        )

    @staticmethod
    def from_train_entry_config(
        config: TrainEntryConfig,
        mode: ModelMode,
        worker_id: int,
        num_workers: int,
    ) -> DistributedDataset[BatchWithLossMask]:
        return PG19(
            data_dir=config.io.dataset_dir,
            mode=mode,
            seq_len=config.params.input_seq_len,
            worker_id=worker_id,
            num_workers=num_workers,
        )

    @staticmethod
    def supports_test_mode() -> bool:
        return True

    def get_sample(self, from_idx: int) -> BatchWithLossMask:
        start = from_idx - self._worker_range_start
        sample = self.data[start : start + self.seq_len].long()
        return sample, torch.ones_like(sample, dtype=torch.float16)
