"""Atomic writes, checkpoint loading, CSV logs, epoch cycler, RNG capture."""

import random

import numpy as np
import pytest
import torch

from mblm.train.core.config import CSVLossEntry
from mblm.train.core.iter import epoch_cycler
from mblm.train.core.state import EpochSampler, capture_rng_state, restore_rng_state
from mblm.utils.io import (
    CSVWriter,
    _embedding_map_extend,
    atomic_torch_save,
    load_model_state,
    save_model_state,
)


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    atomic_torch_save({"a": torch.ones(3)}, path)

    def exploding_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temp file left


def test_save_and_load_model_state(tmp_path):
    model = torch.nn.Linear(3, 2)
    existed, path = save_model_state(tmp_path / "sub", "m", model, 1.5)
    assert not existed and path.name == "m.pth"
    other = torch.nn.Linear(3, 2)
    loaded, loss = load_model_state(path, other)
    assert loss == 1.5 and torch.equal(loaded.weight, model.weight)
    assert save_model_state(tmp_path / "sub", "m.pth", model, 2.0)[0]


def test_load_refuses_mismatch_and_leaves_model(tmp_path):
    _, path = save_model_state(tmp_path, "m", torch.nn.Linear(3, 2), 0.0)
    target = torch.nn.Linear(4, 2)
    before = target.weight.clone()
    with pytest.raises(
        ValueError, match=r"does not fit.*weight: checkpoint \(2, 3\) vs model \(2, 4\)"
    ):
        load_model_state(path, target)
    assert torch.equal(target.weight, before)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_state(tmp_path / "none.pth", target)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_model_state(tmp_path / "bad.pth", target)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"MODEL": {}, "LOSS": 0.0, "x": object()}, path)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_model_state(path, torch.nn.Linear(1, 1))


def test_embedding_migration_keeps_other_weights():
    src = {"emb.weight": torch.ones(3, 2), "other": torch.full((2,), 7.0)}
    tgt = {"emb.weight": torch.zeros(5, 2), "other": torch.zeros(2)}
    merged = _embedding_map_extend(src, tgt, {"emb.weight"}, notify=lambda m: None)
    assert merged["emb.weight"][:3].eq(1).all() and merged["emb.weight"][3:].eq(0).all()
    assert merged["other"].eq(7).all()  # the original returned the target's values here
    with pytest.raises(ValueError, match="smaller number of embeddings"):
        _embedding_map_extend(tgt, src, {"emb.weight"}, notify=print)


def test_csv_writer_header_truncate_resume(tmp_path):
    row = CSVLossEntry(0, "t", 1, "train", 0, 0, 0, 1.0, 0.1, -1, -1)
    writer = CSVWriter(tmp_path, "loss.csv")
    writer.write_row(row)
    size = writer.size()
    writer.write_row(row)
    lines = (tmp_path / "loss.csv").read_text().splitlines()
    assert lines[0].split(",") == list(CSVLossEntry._fields) and len(lines) == 3
    CSVWriter(tmp_path, "loss.csv", resume_size=size)
    assert len((tmp_path / "loss.csv").read_text().splitlines()) == 2
    CSVWriter(tmp_path, "loss", noop=True).write_row(row)
    CSVWriter(tmp_path, "loss.csv")
    assert (tmp_path / "loss.csv").read_text() == ""


def test_epoch_cycler():
    seen = []
    items = list(
        epoch_cycler(
            [10, 11, 12], before_new_epoch=seen.append, start_epoch=2, start_batch=1, max_iters=4
        )
    )
    assert [(i.epoch, i.batch, i.item, i.next_epoch, i.next_batch) for i in items] == [
        (2, 1, 11, 2, 2),
        (2, 2, 12, 3, 0),
        (3, 0, 10, 3, 1),
        (3, 1, 11, 3, 2),
    ]
    assert seen == [2, 3]
    with pytest.raises(IndexError, match=r"start_batch \(3\) is larger"):
        next(epoch_cycler([1, 2, 3], start_batch=3))
    assert list(epoch_cycler([1], max_iters=0)) == []


def test_epoch_sampler_resumes_mid_epoch():
    sampler = EpochSampler(range(10), shuffle=True, seed=5)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start=4)
    assert list(sampler) == full[4:] and len(sampler) == 6
    sampler.set_epoch(4)
    assert list(sampler) != full and sorted(sampler) == list(range(10))
    plain = EpochSampler(range(5), shuffle=False, seed=0)
    plain.set_epoch(0, start=2)
    assert list(plain) == [2, 3, 4]


def test_rng_capture_restore():
    state = capture_rng_state()
    first = (torch.rand(2), np.random.rand(), random.random())
    restore_rng_state(state)
    second = (torch.rand(2), np.random.rand(), random.random())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]
    # serialisable with weights_only loading
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restore_rng_state(torch.load(buffer, weights_only=True))
    assert torch.equal(torch.rand(2), first[0])
