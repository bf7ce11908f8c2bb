"""The command-line tools: mblm-train (single process and --nproc 2), mblm-generate, mblm-plot,
mblm-export."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mblm.cli import export as export_cli
from mblm.cli import generate as generate_cli
from mblm.cli import plot as plot_cli
from mblm.cli import train as train_cli

ROOT = Path(__file__).resolve().parents[2]


def write_sources(root: Path) -> Path:
    for i in range(40):
        (root / f"m{i:02d}.py").parent.mkdir(parents=True, exist_ok=True)
        body = "".join(f"    x{j} = {i} * {j}\n" for j in range(12))
        (root / f"m{i:02d}.py").write_text(f"def f{i}(a, b):\n{body}    return a + b\n")
    return root


def write_config(tmp_path: Path, **train) -> Path:
    config = {
        "io": {
            "name_model": "cli",
            "output_dir": str(tmp_path / "out"),
            "dataset_dir": str(write_sources(tmp_path / "src")),
            "dataset_id": "python_sources",
            "dataset_args": {"valid_percent": 15, "test_percent": 15},
            "num_models_to_save": 1,
            "validate_amount": 3,
            "log_train_loss_amount": 10,
        },
        "params": {
            "num_tokens": 257,
            "pad_token_id": 256,
            "input_seq_len": 64,
            "seq_lens": [8, 8],
            "hidden_dims": [32, 32],
            "num_layers": [1, 1],
            "train_checkpoint_chunks": None,
            "block": [
                {
                    "block_type": "mamba2",
                    "d_state": 8,
                    "d_conv": 4,
                    "expand": 2,
                    "headdim": 16,
                    "pos_emb_type": None,
                },
                {
                    "block_type": "transformer",
                    "attn_head_dims": 16,
                    "attn_num_heads": 2,
                    "attn_use_rot_embs": True,
                    "pos_emb_type": "fixed",
                },
            ],
        },
        "train": {
            "target_elements": 64 * 8 * 10,
            "target_elements_strategy": "sequence",
            "batch_size": 8,
            "learning_rate": 0.01,
            "gradient_accumulate_every": 1,
            "max_eval_steps": 2,
            **train,
        },
        "cli": {"seed": 1, "sample_prompt": "def ", "sample_bytes": 20},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    config = write_config(tmp)
    before = torch.get_num_threads()
    assert train_cli.main(["--config", str(config), "--job-id", "one", "--no-progress"]) == 0
    torch.set_num_threads(before)
    return tmp / "out" / "cli_one"


def test_train_writes_run_and_sample(trained, capsysbinary):
    assert (trained / "cli_top1.pth").is_file()
    assert (trained / "cli_top1.safetensors").is_file()


def test_train_reports_bpb_and_samples(tmp_path, capsys):
    config = write_config(tmp_path, target_elements=64 * 8 * 3)
    assert train_cli.main(["--config", str(config), "--job-id", "r", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "bits per byte" in out and "bytes/s" in out and "sample (20 bytes" in out


def test_train_bad_config_names_field(tmp_path, capsys):
    config = write_config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["train"]["batch_size"] = "big"
    del raw["io"]["dataset_id"]
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "train.batch_size" in err and "io.dataset_id" in err
    with pytest.raises(SystemExit):
        train_cli.main(["--config", str(tmp_path / "missing.yaml")])
    assert "does not exist" in capsys.readouterr().err


def test_train_missing_dataset_dir(tmp_path, capsys):
    config = write_config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["io"]["dataset_dir"] = str(tmp_path / "nowhere")
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--config", str(config), "--no-progress"])
    assert exit_info.value.code == 1
    assert "nowhere does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_generate_streams_bytes(trained, suffix, capsysbinary):
    checkpoint = trained / f"cli_top1{suffix}"
    code = generate_cli.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--prompt",
            "def f",
            "--bytes",
            "12",
            "--seed",
            "0",
            "--filter-thres",
            "1.0",
        ]
    )
    assert code == 0
    out = capsysbinary.readouterr().out
    assert out.startswith(b"def f") and len(out) == len(b"def f") + 12 + 1


def test_generate_errors(trained, tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate_cli.main(["--checkpoint", str(tmp_path / "x.pth")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_cli.main(["--checkpoint", str(trained / "cli_top1.pth"), "--prompt", "x" * 64])
    assert "context is 64" in capsys.readouterr().err


def test_export(trained, tmp_path):
    out = tmp_path / "m.safetensors"
    assert export_cli.main([str(trained / "cli_top1.pth"), "-o", str(out)]) == 0
    from mblm.utils.safetensors import load_safetensors

    tensors, meta = load_safetensors(out)
    assert "params" in meta and tensors


def test_plot(trained, tmp_path):
    out = tmp_path / "curves.png"
    assert plot_cli.main([str(trained), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(trained, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exit_info:
        plot_cli.main([str(trained)])
    assert exit_info.value.code == 1
    assert "needs matplotlib: pip install matplotlib" in capsys.readouterr().err


@pytest.mark.e2e
def test_train_nproc_2_wraps_torchrun(tmp_path):
    config = write_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("JOB_ID", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mblm.cli.train",
            "--config",
            str(config),
            "--nproc",
            "2",
            "--job-id",
            "ddp",
            "--no-progress",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "out" / "cli_ddp"
    out = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert out["summary"]["num_workers"] == 2 and out["summary"]["error"] is None
    assert "bits per byte" in result.stdout


def test_generate_decoded_text(trained, capsysbinary):
    code = generate_cli.main(
        [
            "--checkpoint",
            str(trained / "cli_top1.pth"),
            "--prompt",
            "def",
            "--bytes",
            "8",
            "--seed",
            "0",
            "--decode",
            "--no-echo",
        ]
    )
    assert code == 0
    out = capsysbinary.readouterr().out
    out.decode("utf8")  # valid UTF-8 whatever the model emits
