"""The original README's custom-dataset example works unchanged: imported as a module (its
dataset registers itself and its config builds), and run as a script."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mblm import TransformerBlock
from mblm.train.core.trainer import CoreTrainerOptions
from mblm.train.mblm import dataset_registry, train_mblm

EXAMPLE = Path(__file__).with_name("readme_custom_dataset.py")
ROOT = Path(__file__).resolve().parents[2]


def test_example_registers_and_trains_a_small_variant(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JOB_ID", "readme")
    namespace = runpy.run_path(str(EXAMPLE), run_name="readme_example")  # no __main__: no training
    assert dataset_registry.retrieve("mydataset") is namespace["MyDataset"]
    config = namespace["config"]
    assert config.params.hidden_dims == [512, 512]
    # the same config with a model small enough for a unit test
    config.params.hidden_dims = [32, 32]
    config.params.num_layers = [1, 1]
    config.params.block = [
        TransformerBlock(
            attn_head_dims=8, attn_num_heads=2, attn_use_rot_embs=True, pos_emb_type=None
        ),
        TransformerBlock(
            attn_head_dims=8, attn_num_heads=2, attn_use_rot_embs=True, pos_emb_type="fixed"
        ),
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = train_mblm(config, options=CoreTrainerOptions(display_progress=False))
    finally:
        torch.set_num_threads(before)
    assert trainer.output_dir.resolve() == tmp_path / "data" / "outputs" / "my-model_readme"
    assert (trainer.output_dir / "my-model_top1.pth").is_file()
    assert "test" in (trainer.output_dir / "loss.csv").read_text()


@pytest.mark.slow
def test_example_runs_verbatim(tmp_path, request):
    """The unchanged script, as a plain process (the README launches it with torchrun); a
    ~29M-parameter model: minutes on 2 cores."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("trains the README's full-size model; select with -m slow")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JOB_ID": "verbatim"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "outputs" / "my-model_verbatim" / "my-model_top1.pth").is_file()
