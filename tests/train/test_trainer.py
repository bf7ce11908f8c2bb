"""Single-process CPU training: logs, checkpoints, exact resume, chaining, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from mblm.train.core.config import CSVLossEntry
from mblm.train.core.trainer import CoreTrainerOptions
from mblm.train.mblm import MegabyteTrainer, TrainEntryConfig, TrainOutputConfig, train_mblm
from mblm.utils.io import load_yml, torch_load
from mblm.utils.safetensors import load_safetensors
from mblm.utils.seed import seed_everything

from .helpers import read_loss_rows, tiny_config, without_timestamps

OPTIONS = dict(display_progress=False)


def run(config, job_id, monkeypatch, **options):
    monkeypatch.setenv("JOB_ID", job_id)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    seed_everything(0)
    return train_mblm(config, options=CoreTrainerOptions(**OPTIONS, **options))


@pytest.fixture(scope="module")
def torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, torch_threads):
    """One uninterrupted run shared by the tests below."""
    mp = pytest.MonkeyPatch()
    out = tmp_path_factory.mktemp("ref")
    trainer = run(tiny_config(out), "ref", mp)
    mp.undo()
    return trainer.output_dir


def test_run_directory_and_logs(reference_run):
    run_dir = reference_run
    assert run_dir.name == "tiny_ref"
    names = {p.name for p in run_dir.iterdir()}
    assert {
        "config.yaml",
        "loss.csv",
        "timemem.csv",
        "train.log",
        "training_state.pt",
        "tiny_top1.pth",
        "tiny_top2.pth",
        "tiny_top1.safetensors",
    } <= names
    assert not [n for n in names if n.endswith(".tmp")]

    rows = read_loss_rows(run_dir)
    assert list(rows[0]) == list(CSVLossEntry._fields)
    kinds = [r["kind"] for r in rows]
    # 24 iterations: 24 train rows, 6 validations, 1 test
    assert kinds.count("train") == 24 and kinds.count("valid") == 6 and kinds[-1] == "test"
    train = [r for r in rows if r["kind"] == "train"]
    assert [int(r["cum_batch"]) for r in train] == list(range(24))
    assert [int(r["elements_seen"]) for r in train] == [128 * (i + 1) for i in range(24)]
    # the grad columns are -1 until the first optimizer step (accumulating 2 batches)
    assert float(train[0]["avg_grad"]) == -1 and float(train[2]["avg_grad"]) != -1
    valid = [float(r["loss"]) for r in rows if r["kind"] == "valid"]
    assert valid[-1] < valid[0] - 1.0, valid
    assert valid[-1] / math.log(2) < 6.5  # bits per byte below 8


def test_output_config_and_checkpoints(reference_run):
    out = load_yml(reference_run / "config.yaml", TrainOutputConfig)
    assert out.summary.error is None and out.summary.num_workers == 1
    assert out.resume.checkpoint_file.endswith("tiny_top1.pth")
    assert (out.resume.next_epoch_index, out.resume.next_batch_index) == (1, 4)
    entry = load_yml(reference_run / "config.yaml", TrainEntryConfig)  # chaining input
    assert entry.resume is not None

    top1 = torch_load(reference_run / "tiny_top1.pth")
    top2 = torch_load(reference_run / "tiny_top2.pth")
    assert set(top1) == {"MODEL", "LOSS", "ID"} and top1["LOSS"] <= top2["LOSS"]
    valid = sorted(float(r["loss"]) for r in read_loss_rows(reference_run) if r["kind"] == "valid")
    assert top1["LOSS"] == pytest.approx(valid[0]) and top2["LOSS"] == pytest.approx(valid[1])
    tensors, meta = load_safetensors(reference_run / "tiny_top1.safetensors")
    assert float(meta["loss"]) == pytest.approx(top1["LOSS"])
    assert all(torch.equal(tensors[k], v) for k, v in top1["MODEL"].items())
    state = torch_load(reference_run / "training_state.pt")
    assert state["finished"] and state["loop"]["iters_done"] == 24


def test_killed_run_resumes_exactly(reference_run, tmp_path, monkeypatch, torch_threads):
    """A run that dies mid-way and is launched again (same JOB_ID) continues from its training
    state and logs exactly the losses of the uninterrupted run."""
    calls = {"n": 0}
    forward = MegabyteTrainer.model_forward

    def dying_forward(self, model, batch, device):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 15:
                raise KeyboardInterrupt("killed")  # not caught by the trainer's retry
        return forward(self, model, batch, device)

    monkeypatch.setattr(MegabyteTrainer, "model_forward", dying_forward)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tmp_path), "ref", monkeypatch)
    run_dir = tmp_path / "tiny_ref"
    state = torch_load(run_dir / "training_state.pt")
    assert not state["finished"] and 0 < state["loop"]["iters_done"] <= 14

    seed_everything(123)  # the resumed run restores the saved RNG states itself
    trainer = run(tiny_config(tmp_path), "ref", monkeypatch)
    assert trainer.output_dir == run_dir
    assert without_timestamps(read_loss_rows(run_dir)) == without_timestamps(
        read_loss_rows(reference_run)
    )
    assert "Resuming the run" in (run_dir / "train.log").read_text()


def test_retry_resumes_from_training_state(reference_run, tmp_path, monkeypatch, torch_threads):
    calls = {"n": 0}
    forward = MegabyteTrainer.model_forward

    def flaky_forward(self, model, batch, device):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 20:
                raise RuntimeError("transient failure")
        return forward(self, model, batch, device)

    monkeypatch.setattr(MegabyteTrainer, "model_forward", flaky_forward)
    trainer = run(tiny_config(tmp_path), "ref", monkeypatch, max_train_restarts=1)
    assert without_timestamps(read_loss_rows(trainer.output_dir)) == without_timestamps(
        read_loss_rows(reference_run)
    )
    assert "transient failure" in (trainer.output_dir / "train.log").read_text()


def test_failure_raises_after_retries(tmp_path, monkeypatch, torch_threads):
    def broken(self, model, batch, device):
        raise RuntimeError("broken forward")

    monkeypatch.setattr(MegabyteTrainer, "model_forward", broken)
    with pytest.raises(RuntimeError, match="broken forward"):
        run(tiny_config(tmp_path), "bad", monkeypatch)
    out = load_yml(tmp_path / "tiny_bad" / "config.yaml", TrainOutputConfig)
    assert out.summary.error == "broken forward"
    assert "broken forward" in (tmp_path / "mblm.train.mblm.log").read_text()


def test_chaining_through_output_config(reference_run, tmp_path, monkeypatch, torch_threads):
    chained = load_yml(reference_run / "config.yaml", TrainEntryConfig)
    chained.io.output_dir = str(tmp_path)
    trainer = run(chained, "next", monkeypatch)
    first, second = read_loss_rows(reference_run), read_loss_rows(trainer.output_dir)
    last_cum = max(int(r["cum_batch"]) for r in first if r["kind"] == "train")
    assert min(int(r["cum_batch"]) for r in second if r["kind"] == "train") == last_cum + 1
    out = load_yml(trainer.output_dir / "config.yaml", TrainOutputConfig)
    assert out.resume.resumed_from == chained.resume.checkpoint_file


def test_finished_run_directory_is_not_overwritten(reference_run, monkeypatch):
    config = tiny_config(reference_run.parent)
    before = (reference_run / "loss.csv").read_bytes()
    with pytest.raises(ValueError, match="holds a finished run"):
        run(config, "ref", monkeypatch)
    assert (reference_run / "loss.csv").read_bytes() == before


def test_state_of_other_config_is_refused(tmp_path, monkeypatch, torch_threads):
    calls = {"n": 0}
    forward = MegabyteTrainer.model_forward

    def dying_forward(self, model, batch, device):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return forward(self, model, batch, device)

    monkeypatch.setattr(MegabyteTrainer, "model_forward", dying_forward)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tmp_path), "x", monkeypatch)
    monkeypatch.setattr(MegabyteTrainer, "model_forward", forward)
    run_dir = tmp_path / "tiny_x"
    snapshot = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"different config \(train.learning_rate: saved 0.01"):
        run(tiny_config(tmp_path, learning_rate=1e-3), "x", monkeypatch)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == snapshot


def test_checkpoint_of_other_model_is_refused(reference_run, tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    config.params.hidden_dims = [48, 16]
    config.resume = load_yml(reference_run / "config.yaml", TrainOutputConfig).resume
    with pytest.raises(ValueError, match="does not fit the model of this config.*shape"):
        run(config, "other", monkeypatch)
    assert not (tmp_path / "tiny_other").exists()


def test_config_errors_name_the_field(tmp_path):
    from pydantic import ValidationError

    raw = tiny_config(tmp_path).model_dump()
    del raw["train"]["learning_rate"]
    with pytest.raises(ValidationError, match="train.learning_rate"):
        TrainEntryConfig.model_validate(raw)
    raw = tiny_config(tmp_path).model_dump()
    raw["io"]["validate_amount"] = "often"
    with pytest.raises(ValidationError, match="io.validate_amount"):
        TrainEntryConfig.model_validate(raw)


def test_unknown_dataset_id(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    config.io.dataset_id = "nope"
    with pytest.raises(KeyError, match="no dataset registered as 'nope'.*tiny_text"):
        run(config, "nope", monkeypatch)


def test_gradient_accumulation_and_schedule(tmp_path, monkeypatch, torch_threads):
    steps = {"n": 0}
    real_step = torch.optim.Adam.step

    def counting_step(self, *args, **kwargs):
        steps["n"] += 1
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    config = tiny_config(
        tmp_path, target_elements=4 * 32 * 12, gradient_accumulate_every=3, warmup_steps_perc=0.5
    )
    config.io.log_train_loss_amount = 12
    trainer = run(config, "acc", monkeypatch, save_training_state=False, export_safetensors=False)
    assert steps["n"] == 4
    rows = [r for r in read_loss_rows(trainer.output_dir) if r["kind"] == "train"]
    lrs = [float(r["lr"]) for r in rows]
    # warm-up over 2 of 4 steps from 10% of the peak, then cosine down
    assert lrs[0] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-2)
    assert lrs[-1] < 1e-2
    assert not (trainer.output_dir / "training_state.pt").exists()
