"""Files of a training run: YAML configs, CSV logs, JSON lines and model checkpoints.

Every file that a later step depends on (checkpoints, configs) is written atomically: into a
temporary file in the same directory, flushed and fsync'ed, then renamed over the target, and
the directory entry fsync'ed. A process killed at any moment leaves either the old or the new
file, never a torn one. Checkpoints are loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Generic, NamedTuple, TypeAlias, TypeVar

import torch
import yaml
from filelock import FileLock
from pydantic import BaseModel
from torch.nn import Module as TorchModule
from torch.serialization import MAP_LOCATION

_T = TypeVar("_T")
_TBaseModel = TypeVar("_TBaseModel", bound=BaseModel)
_TNamedTuple = TypeVar("_TNamedTuple", bound=NamedTuple)
_TModule = TypeVar("_TModule", bound=TorchModule)

StateDict: TypeAlias = dict[str, Any]

logging.getLogger("filelock").setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Opens a temporary file next to ``path`` for writing; when the block ends without an
    exception the file is flushed, fsync'ed and renamed to ``path`` (replacing it atomically).
    On an exception the temporary file is removed and ``path`` is untouched."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def atomic_torch_save(obj: object, path: str | Path) -> Path:
    """``torch.save(obj, path)``, atomically (see ``atomic_write``)."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def torch_load(path: str | Path, map_location: MAP_LOCATION = None, mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` and an error naming the file when it is missing
    or not a torch checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err


# ---------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------


def load_yml(
    path: str | Path, parse_to: type[_TBaseModel], try_yaml_suffixes: bool = False
) -> _TBaseModel:
    """Parses a YAML file into the pydantic model ``parse_to``. With ``try_yaml_suffixes``, a
    missing ``x.yaml`` is retried as ``x.yml`` (and vice versa)."""
    path = Path(path)
    suffixes = {".yaml", ".yml"}
    if path.suffix not in suffixes:
        raise AssertionError(f"{path} is not a yaml file")
    try:
        with path.open("r", encoding="utf8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        if try_yaml_suffixes:
            (other,) = suffixes - {path.suffix}
            return load_yml(path.with_suffix(other), parse_to, try_yaml_suffixes=False)
        raise
    return parse_to.model_validate(data)


def dump_yml(path: str | Path, data: BaseModel) -> Path:
    """Writes ``data`` as YAML to ``path`` with the suffix ``.yaml`` (atomically)."""
    path = Path(path).with_suffix(".yaml")
    text = yaml.safe_dump(data.model_dump(mode="json"), sort_keys=True)
    with atomic_write(path, "w", encoding="utf8") as f:
        f.write(text)
    return path


# ---------------------------------------------------------------------------------------------
# CSV and JSON lines
# ---------------------------------------------------------------------------------------------


class CSVWriter(Generic[_TNamedTuple]):
    """Appends named tuples as CSV rows to ``<output_dir>/<file_name>`` (suffix ``.csv``), the
    header (the tuple's field names) once when the file is empty. Writers of several processes
    may share a file: every row is written under a file lock.

    The file is emptied on creation, or cut back to ``resume_size`` bytes when resuming a run
    (the rows written after the state being resumed are dropped and written again). ``noop``
    makes every call do nothing.
    """

    def __init__(
        self,
        output_dir: str | Path,
        file_name: str,
        noop: bool = False,
        resume_size: int | None = None,
    ) -> None:
        self.noop = noop
        if noop:
            return
        directory = Path(output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self._file = (directory / file_name).with_suffix(".csv")
        self._lock = FileLock(str(self._file) + ".lock")
        with self._lock:
            if resume_size is None or not self._file.exists():
                self._file.write_bytes(b"")
            else:
                with self._file.open("r+b") as f:
                    f.truncate(min(resume_size, self._file.stat().st_size))

    def truncate(self, size: int) -> None:
        """Cuts the file back to ``size`` bytes (no-op if it is not larger)."""
        if self.noop:
            return
        with self._lock:
            if self._file.exists() and self._file.stat().st_size > size:
                with self._file.open("r+b") as f:
                    f.truncate(size)

    @property
    def file(self) -> Path:
        return self._file

    def size(self) -> int:
        """Current size of the file in bytes (0 for a noop writer)."""
        return 0 if self.noop else self._file.stat().st_size

    def write_row(self, row: _TNamedTuple) -> None:
        if self.noop:
            return
        with self._lock:
            empty = self._file.stat().st_size == 0
            with self._file.open("a", encoding="utf-8", newline="") as f:
                writer = csv.writer(f)
                if empty:
                    writer.writerow(row._fields)
                writer.writerow(row)


class NDJSONWriter(Generic[_TBaseModel]):
    """Appends pydantic models as JSON lines; ``remove_last_line`` undoes the latest append."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.stream_positions: list[int] = []

    def write_line(self, obj: _TBaseModel) -> None:
        with self.path.open("a", encoding="utf8") as f:
            self.stream_positions.append(f.tell())
            f.write(obj.model_dump_json() + "\n")

    def remove_last_line(self) -> None:
        if not self.stream_positions:
            return
        position = self.stream_positions.pop()
        with self.path.open("a", encoding="utf8") as f:
            f.truncate(position)


def read_jsonl(path: Path | str, parse_lines_to: Callable[..., _T]) -> list[_T]:
    """Every line of a JSON-lines file, parsed as ``parse_lines_to(**line)``."""
    with Path(path).open("r", encoding="utf8") as f:
        return [parse_lines_to(**json.loads(line)) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# Model checkpoints: {"MODEL": state_dict, "LOSS": float}
# ---------------------------------------------------------------------------------------------


def save_model_state(
    dir: str | Path,  # noqa: A002 - the original's parameter name
    checkpoint_name: str,
    model: TorchModule | StateDict,
    loss: float,
    extra: dict[str, Any] | None = None,
) -> tuple[bool, Path]:
    """Saves ``{"MODEL": state_dict, "LOSS": loss}`` (plus ``extra`` keys) to
    ``<dir>/<checkpoint_name>`` with the suffix ``.pth``, atomically. Returns whether a file
    was replaced, and the path."""
    file = Path(dir).joinpath(checkpoint_name).with_suffix(".pth")
    state = model.state_dict() if isinstance(model, TorchModule) else model
    existed = file.exists()
    atomic_torch_save({"MODEL": state, "LOSS": loss, **(extra or {})}, file)
    return existed, file


def _embedding_map_extend(
    src_state: dict[str, torch.Tensor],
    tgt_state: dict[str, torch.Tensor],
    map_extend_embeddings: set[str],
    notify: Callable[[str], Any],
) -> dict[str, torch.Tensor]:
    """The source state with the embeddings named in ``map_extend_embeddings`` grown to the
    target's number of rows: their first rows come from the source, the new rows keep the
    target's values. Every other entry is the source's. Both state dicts must have the same keys
    in the same order; an embedding can only grow in rows, not change its width."""
    merged: dict[str, torch.Tensor] = {}
    for (src_key, src), (tgt_key, tgt) in zip(src_state.items(), tgt_state.items(), strict=False):
        if src_key != tgt_key:
            raise ValueError(
                f"Expected source and target state dict to match ({src_key} != {tgt_key})"
            )
        if src_key not in map_extend_embeddings:
            merged[src_key] = src
            continue
        if src_key.endswith("weight") and src.size(1) != tgt.size(1):
            raise ValueError("Mapping to a smaller embedding dimension is not supported")
        if src.size(0) > tgt.size(0):
            raise ValueError("Mapping to a smaller number of embeddings is not supported")
        grown = tgt.detach().clone()
        grown[: src.size(0)] = src.detach().to(grown.device, grown.dtype)
        merged[src_key] = grown
        notify(f"Successfully moved embeddings from {src_key}")
    return merged


def _modules_map_rename(
    src_state: dict[str, torch.Tensor],
    map_rename_modules: Iterable[tuple[str, str]],
    notify: Callable[[str], Any],
) -> dict[str, torch.Tensor]:
    """A copy of the state dict where, for each ``(from_prefix, to_prefix)`` pair, keys starting
    with ``from_prefix`` start with ``to_prefix`` instead."""
    renamed = dict(src_state)
    for old_prefix, new_prefix in map_rename_modules:
        for key in list(src_state):
            if key.startswith(old_prefix) and key in renamed:
                new_key = new_prefix + key[len(old_prefix) :]
                renamed[new_key] = renamed.pop(key)
                notify(f"Successfully renamed {key} to {new_key}")
    return renamed


def describe_state_dict_mismatch(model: TorchModule, state: StateDict) -> str | None:
    """A readable account of why ``state`` does not load into ``model`` strictly (missing and
    unexpected keys, shape differences), or None if it fits."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state
        and isinstance(state[k], torch.Tensor)
        and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return None

    def listing(title: str, items: list[str]) -> str:
        shown = ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
        return f"{title}: {shown}" if items else ""

    parts = [
        listing("missing keys", missing),
        listing("unexpected keys", unexpected),
        listing("shape mismatches", shapes),
    ]
    return "; ".join(p for p in parts if p)


@torch.no_grad()
def load_model_state(
    checkpoint_file: str | Path,
    model: _TModule,
    map_location: MAP_LOCATION | None = None,
    map_extend_embeddings: set[str] | None = None,
    map_rename_modules: Iterable[tuple[str, str]] | None = None,
    on_success: Callable[[str], Any] | None = None,
) -> tuple[_TModule, float]:
    """Loads a ``{"MODEL", "LOSS"}`` checkpoint into ``model`` (strictly) and returns
    ``(model, loss)``.

    ``map_rename_modules`` re-prefixes keys first (see ``_modules_map_rename``), then
    ``map_extend_embeddings`` grows the named embeddings to the model's sizes. A checkpoint that
    does not fit the model raises a ValueError naming the file and the mismatching keys; the
    model is then left unchanged.
    """
    snapshot = torch_load(checkpoint_file, map_location)
    if not isinstance(snapshot, dict) or "MODEL" not in snapshot or "LOSS" not in snapshot:
        raise ValueError(f"{checkpoint_file} is not an mblm checkpoint (no MODEL/LOSS entries)")
    state, loss = snapshot["MODEL"], snapshot["LOSS"]

    def notify(message: str) -> None:
        if on_success:
            on_success(message)

    if map_rename_modules:
        state = _modules_map_rename(state, map_rename_modules, notify)
    if map_extend_embeddings:
        state = _embedding_map_extend(state, model.state_dict(), map_extend_embeddings, notify)
    mismatch = describe_state_dict_mismatch(model, state)
    if mismatch:
        # load into a throw-away copy: the model stays untouched, and its own load hooks (e.g.
        # the Mamba layout check naming the block_type to set) may explain the mismatch better
        detail = ""
        try:
            copy.deepcopy(model).load_state_dict(state, strict=True)
        except (RuntimeError, ValueError) as err:
            detail = f"\n{err}"
        raise ValueError(
            f"checkpoint {checkpoint_file} does not fit the model of this config: {mismatch}"
            f"{detail}"
        )
    model.load_state_dict(state, strict=True)
    return model, float(loss)
