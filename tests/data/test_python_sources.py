import pytest

from mblm.data.dataset._files import DatasetFileError
from mblm.data.dataset.python_sources import (
    PythonSourceArgs,
    PythonSourceCorpus,
    split_of,
)
from mblm.data.types import ModelMode


def make_tree(root, n=60):
    for i in range(n):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{i:02d}.py").write_text(f"def f{i}():\n    return {i}\n")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "skipped.py").write_text("SKIPPED = 1\n")
    (root / "notes.txt").write_text("not python")
    return root


def test_splits_are_disjoint_and_deterministic(tmp_path):
    root = make_tree(tmp_path / "src")
    args = PythonSourceArgs(valid_percent=20, test_percent=20)
    sets = {}
    for mode in ModelMode:
        ds = PythonSourceCorpus(root, mode, args, seq_len=8, worker_id=0, num_workers=1)
        rel = [p.relative_to(root).as_posix() for p in ds.files]
        assert rel == sorted(rel)
        assert all(split_of(r, 20, 20) == mode for r in rel)
        sets[mode] = set(rel)
        again = PythonSourceCorpus(root, mode, args, seq_len=8, worker_id=0, num_workers=1)
        assert again.data.tolist() == ds.data.tolist()
    assert sum(len(s) for s in sets.values()) == 60
    assert not any("site-packages" in r for s in sets.values() for r in s)


def test_byte_caps_and_samples(tmp_path):
    root = make_tree(tmp_path / "src")
    ds = PythonSourceCorpus(
        root,
        ModelMode.TRAIN,
        PythonSourceArgs(max_bytes=64),
        seq_len=16,
        worker_id=0,
        num_workers=1,
    )
    assert ds.data.numel() == 64 and len(ds) == 4
    x, mask = ds[0]
    assert bytes(x.tolist()).startswith(b"def f") and mask.eq(1).all()


def test_stdlib_default():
    ds = PythonSourceCorpus(
        "@stdlib",
        ModelMode.VALID,
        PythonSourceArgs(max_valid_bytes=4096),
        seq_len=64,
        worker_id=0,
        num_workers=1,
    )
    assert ds.data.numel() == 4096


def test_errors(tmp_path):
    with pytest.raises(DatasetFileError, match="does not exist"):
        PythonSourceCorpus(tmp_path / "x", ModelMode.TRAIN, seq_len=8, worker_id=0, num_workers=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFileError, match="no .py files"):
        PythonSourceCorpus(
            tmp_path / "empty", ModelMode.TRAIN, seq_len=8, worker_id=0, num_workers=1
        )
