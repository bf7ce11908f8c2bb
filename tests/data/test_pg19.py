import os
import sys

import pytest
import torch

from mblm.data.dataset._files import DatasetFileError
from mblm.data.dataset.pg19 import PG19
from mblm.data.dataset.pg19_masked import PG19Masked
from mblm.data.types import ModelMode

from .conftest import make_pg19


def test_reads_split_in_name_order(pg19_dir):
    ds = PG19(pg19_dir, ModelMode.TRAIN, seq_len=100, worker_id=0, num_workers=1)
    assert [f.name for f in ds.txt_files] == ["100.txt", "200.txt", "300.txt"]
    assert ds.data.numel() == 1024 and len(ds) == 10
    x, mask = ds[0]
    assert x.dtype == torch.long and mask.dtype == torch.float16
    assert x.tolist() == [ord("A")] * 100 and mask.eq(1).all()
    assert bytes(ds[3][0].tolist()) == b"B" * 100  # bytes 300..399
    assert PG19.supports_test_mode()


def test_workers_read_only_their_share(pg19_dir):
    parts = [
        PG19(pg19_dir, ModelMode.TRAIN, seq_len=64, worker_id=w, num_workers=2) for w in (0, 1)
    ]
    assert [p.data.numel() for p in parts] == [512, 512]
    whole = PG19(pg19_dir, ModelMode.TRAIN, seq_len=64, worker_id=0, num_workers=1).data
    assert torch.equal(torch.cat([p.data for p in parts]), whole)
    # worker 1's first window starts at byte 512 of the split
    assert torch.equal(parts[1][0][0], whole[512:576].long())
    parts[1].offset_to(5)
    assert torch.equal(parts[1][0][0], whole[517:581].long())


def test_validation_and_test_splits(pg19_dir):
    valid = PG19(pg19_dir, ModelMode.VALID, seq_len=16, worker_id=0, num_workers=1)
    assert valid[1][0].tolist() == list(range(16, 32))
    test = PG19(pg19_dir, ModelMode.TEST, seq_len=8, worker_id=0, num_workers=1)
    assert bytes(test[0][0].tolist()) == b"the end."
    assert test.book("500.txt").startswith("the end.")
    with pytest.raises(ValueError, match="Book nope.txt does not exist"):
        test.book("nope.txt")
    assert [name for name, _ in test.iter_books()] == ["500.txt"]
    assert next(test.iter_sequences_rand()).numel() == 8


def test_missing_dir_and_split(tmp_path):
    with pytest.raises(DatasetFileError, match="does not exist.*published PG19 layout"):
        PG19(tmp_path / "nope", ModelMode.TRAIN, seq_len=8, worker_id=0, num_workers=1)
    make_pg19(tmp_path / "p", {"train": {"1.txt": b"x" * 100}})
    with pytest.raises(DatasetFileError, match="validation does not exist"):
        PG19(tmp_path / "p", ModelMode.VALID, seq_len=8, worker_id=0, num_workers=1)


def test_empty_split_and_empty_files(tmp_path):
    root = make_pg19(tmp_path / "p", {"train": {}})
    with pytest.raises(DatasetFileError, match="no files in"):
        PG19(root, ModelMode.TRAIN, seq_len=8, worker_id=0, num_workers=1)
    make_pg19(root, {"train": {"1.txt": b"", "2.txt": b""}})
    with pytest.raises(ValueError, match="are empty"):
        PG19(root, ModelMode.TRAIN, seq_len=8, worker_id=0, num_workers=1)
    make_pg19(root, {"train": {"3.txt": b"abc"}})
    with pytest.raises(AssertionError, match="too small"):
        PG19(root, ModelMode.TRAIN, seq_len=8, worker_id=0, num_workers=1)


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path):
    root = make_pg19(tmp_path / "p", {"train": {"1.txt": b"x" * 100}})
    (root / "train" / "1.txt").chmod(0)
    with pytest.raises(DatasetFileError, match="cannot read"):
        PG19(root, ModelMode.TRAIN, seq_len=8, worker_id=0, num_workers=1)


def test_unreadable_file_any_user(tmp_path, monkeypatch):
    root = make_pg19(tmp_path / "p", {"train": {"1.txt": b"x" * 100}})
    real_open = open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith("1.txt"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(DatasetFileError, match=r"cannot read .*1\.txt.*Permission denied"):
        PG19(root, ModelMode.TRAIN, seq_len=8, worker_id=0, num_workers=1)


def test_pg19_masked(pg19_dir):
    torch.manual_seed(0)
    ds = PG19Masked(
        pg19_dir,
        ModelMode.TRAIN,
        masked_token_id=300,
        masking_proba=0.5,
        padding_token_id=301,
        seq_len=100,
        worker_id=0,
        num_workers=1,
    )
    masked, mask, labels = ds[0]
    assert masked.dtype == labels.dtype == torch.long and mask.dtype == torch.bool
    assert 20 < int(mask.sum()) < 80
    assert torch.equal(masked[mask], torch.full((int(mask.sum()),), 300))
    assert torch.equal(masked[~mask], labels[~mask]) and labels.eq(ord("A")).all()
    names = [name for name, _ in ds.iter_books()]
    assert names and ds.book(names[0]) == dict(ds.iter_books())[names[0]]
    assert next(ds.iter_sequences_rand()).numel() == 100
    with pytest.raises(ValueError, match="same value"):
        PG19Masked(
            pg19_dir,
            ModelMode.TRAIN,
            masked_token_id=5,
            padding_token_id=5,
            seq_len=8,
            worker_id=0,
            num_workers=1,
        )
