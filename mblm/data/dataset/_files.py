"""Reading a directory of files as one byte stream, or only a byte range of it, with errors that
name the dataset, the path and what the published layout looks like."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
import tqdm


class DatasetFileError(OSError):
    """A dataset file or directory is missing, empty or unreadable."""


def require_dir(path: Path, dataset: str, layout_hint: str) -> Path:
    """``path`` if it is a directory, else a DatasetFileError naming the expected layout."""
    if not path.exists():
        raise DatasetFileError(f"{dataset}: directory {path} does not exist. {layout_hint}")
    if not path.is_dir():
        raise DatasetFileError(f"{dataset}: {path} is not a directory. {layout_hint}")
    return path


def list_files(directory: Path, dataset: str, layout_hint: str) -> list[Path]:
    """The regular, non-hidden files of ``directory`` sorted by name (a deterministic order on
    every filesystem); DatasetFileError if there are none or the directory cannot be listed."""
    require_dir(directory, dataset, layout_hint)
    try:
        names = sorted(os.listdir(directory))
    except OSError as err:
        raise DatasetFileError(f"{dataset}: cannot list {directory}: {err}") from err
    files = [directory / n for n in names if not n.startswith(".") and (directory / n).is_file()]
    if not files:
        raise DatasetFileError(f"{dataset}: no files in {directory}. {layout_hint}")
    return files


def file_sizes(files: Iterable[Path], dataset: str) -> list[int]:
    sizes = []
    for f in files:
        try:
            sizes.append(f.stat().st_size)
        except OSError as err:
            raise DatasetFileError(f"{dataset}: cannot read {f}: {err}") from err
    return sizes


def read_range(
    files: list[Path],
    sizes: list[int],
    start: int,
    end: int,
    dataset: str,
    progress: tqdm.tqdm | None = None,
) -> torch.Tensor:
    """Bytes ``[start, end)`` of the concatenation of ``files`` (whose sizes are ``sizes``) as a
    uint8 tensor, reading only the files that overlap the range."""
    out = bytearray(end - start)
    view = memoryview(out)
    file_start = 0
    for f, size in zip(files, sizes, strict=True):
        file_end = file_start + size
        lo, hi = max(start, file_start), min(end, file_end)
        if lo < hi:
            try:
                with open(f, "rb") as fh:
                    fh.seek(lo - file_start)
                    got = fh.readinto(view[lo - start : hi - start])
            except OSError as err:
                raise DatasetFileError(f"{dataset}: cannot read {f}: {err}") from err
            if got != hi - lo:
                raise DatasetFileError(
                    f"{dataset}: {f} is shorter than when it was listed (changed while reading?)"
                )
        if progress is not None:
            progress.update(1)
        file_start = file_end
        if file_start >= end:
            break
    if not out:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(out, dtype=torch.uint8)
