"""A byte corpus built at run time from Python source files, by default the running
interpreter's standard library: every Python installation has it, so a demo can train without
downloading anything.

Files are the ``*.py`` files under a root directory (``"@stdlib"`` = the standard library),
skipping ``site-packages``, ``dist-packages``, test suites and caches, in sorted order of their
relative paths. Each file goes to exactly one split, decided by a hash of its relative path
(stable across machines and Python patch releases); a split is the concatenation of its files.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import Unpack

from mblm.data.dataset._files import DatasetFileError, file_sizes, read_range, require_dir
from mblm.data.datasets import DistributedDataset, DistributedDatasetConfig
from mblm.data.types import BatchWithLossMask, ModelMode

if TYPE_CHECKING:
    from mblm.train.mblm import TrainEntryConfig

STDLIB = "@stdlib"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_LAYOUT = f'Set io.dataset_dir to a directory containing .py files, or to "{STDLIB}".'


class PythonSourceArgs(BaseModel):
    """``io.dataset_args`` of the ``python_sources`` dataset."""

    model_config = ConfigDict(extra="forbid")

    valid_percent: float = Field(default=5.0, ge=0, le=50, description="% of files for validation")
    test_percent: float = Field(default=5.0, ge=0, le=50, description="% of files for testing")
    max_bytes: int | None = Field(
        default=None, gt=0, description="Use at most this many bytes of the split (the first ones)"
    )
    max_valid_bytes: int | None = Field(
        default=None, gt=0, description="Byte cap for the validation and test splits"
    )


def resolve_root(dataset_dir: str | Path) -> Path:
    """``dataset_dir``, with ``"@stdlib"`` meaning this interpreter's standard library."""
    if str(dataset_dir) == STDLIB:
        return Path(sysconfig.get_paths()["stdlib"])
    return Path(dataset_dir)


def split_of(relative_path: str, valid_percent: float, test_percent: float) -> ModelMode:
    """The split a file belongs to, from a hash of its relative (POSIX) path."""
    bucket = zlib.crc32(relative_path.encode("utf8")) % 10_000 / 100.0
    if bucket < valid_percent:
        return ModelMode.VALID
    if bucket < valid_percent + test_percent:
        return ModelMode.TEST
    return ModelMode.TRAIN


def source_files(root: Path, mode: ModelMode, args: PythonSourceArgs) -> list[Path]:
    """The files of split ``mode`` under ``root``, in reading order."""
    require_dir(root, "PythonSourceCorpus", _LAYOUT)
    chosen = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if _SKIP_DIRS.intersection(relative.parts[:-1]) or not path.is_file():
            continue
        if split_of(relative.as_posix(), args.valid_percent, args.test_percent) == mode:
            chosen.append((relative.as_posix(), path))
    chosen.sort()
    if not chosen:
        raise DatasetFileError(
            f"PythonSourceCorpus: no .py files for the {mode.value} split in {root}"
        )
    return [path for _, path in chosen]


class PythonSourceCorpus(DistributedDataset[BatchWithLossMask]):
    """Sequential byte dataset over Python sources; samples are ``(bytes, ones)`` like PG19."""

    def __init__(
        self,
        data_dir: str | Path,
        mode: ModelMode,
        args: PythonSourceArgs | None = None,
        **config: Unpack[DistributedDatasetConfig],
    ):
        args = args or PythonSourceArgs()
        self.root = resolve_root(data_dir)
        self.files = source_files(self.root, mode, args)
        sizes = file_sizes(self.files, "PythonSourceCorpus")
        cap = args.max_bytes if mode == ModelMode.TRAIN else args.max_valid_bytes or args.max_bytes
        total = min(sum(sizes), cap) if cap else sum(sizes)
        if total == 0:
            raise DatasetFileError(f"PythonSourceCorpus: the {mode.value} files are all empty")
        super().__init__(data_size=total, is_sequential=True, **config)
        self.data = read_range(
            self.files,
            sizes,
            self._worker_range_start,
            self._worker_range_end,
            "PythonSourceCorpus",
        )

    @staticmethod
    def from_train_entry_config(
        config: TrainEntryConfig,
        mode: ModelMode,
        worker_id: int,
        num_workers: int,
    ) -> DistributedDataset[BatchWithLossMask]:
        return PythonSourceCorpus(
            data_dir=config.io.dataset_dir,
            mode=mode,
            args=PythonSourceArgs.model_validate(config.io.dataset_args or {}),
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
