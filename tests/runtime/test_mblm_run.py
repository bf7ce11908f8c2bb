"""The ``mblm-run`` command (the C++ runtime, csrc/runtime/cli): its output against the Python
model on the same weights, and exit status 2 with a clear message for every kind of bad input.

Uses ``build/dev/mblm-run`` (``MBLM_BUILD_DIR``), else an installed ``mblm-run``; skipped when
neither exists (the runtime needs yaml-cpp at build time).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mblm import MBLM, MBLMModelConfig
from mblm.utils.safetensors import save_safetensors

ROOT = Path(__file__).resolve().parents[2]

PARAMS = {
    "num_tokens": 257,
    "pad_token_id": 256,
    "hidden_dims": [32, 16],
    "num_layers": [1, 1],
    "seq_lens": [8, 4],
    "train_checkpoint_chunks": None,
    "block": [
        {"block_type": "mamba2", "d_state": 8, "d_conv": 4, "expand": 2, "headdim": 16},
        {
            "block_type": "transformer",
            "attn_head_dims": 8,
            "attn_num_heads": 2,
            "attn_use_rot_embs": True,
            "pos_emb_type": "fixed",
        },
    ],
}


def binary() -> str:
    built = ROOT / os.environ.get("MBLM_BUILD_DIR", "build/dev") / "mblm-run"
    if built.is_file():
        return str(built)
    installed = shutil.which("mblm-run")
    if installed is None:
        pytest.skip("mblm-run is not built (bash tools/dev_build.sh, with yaml-cpp installed)")
    return installed


def run(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [binary(), *map(str, args)], capture_output=True, timeout=300, check=False
    )


def fails_with(result: subprocess.CompletedProcess[bytes], message: str) -> None:
    stderr = result.stderr.decode()
    assert result.returncode == 2, (result.returncode, stderr)
    assert stderr.startswith("mblm-run: error: "), stderr
    assert message in stderr, stderr


@pytest.fixture(scope="module")
def model() -> MBLM:
    torch.manual_seed(0)
    return MBLM(MBLMModelConfig.model_validate(PARAMS)).eval()


@pytest.fixture(scope="module")
def weights(model: MBLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    return save_safetensors(
        model.state_dict(), path, {"format": "mblm", "params": json.dumps(PARAMS)}
    )


def test_help_and_usage_errors() -> None:
    result = run("--help")
    assert result.returncode == 0
    assert b"--prompt-file FILE" in result.stdout
    fails_with(run("--weights", "w.safetensors"), "give a prompt")
    fails_with(run("--weights", "w", "--prompt", "x", "--nope"), "unknown option --nope")
    fails_with(run("--weights", "w", "--prompt", "x", "--num-tokens", "-3"), "--num-tokens")


def test_cuda_is_opt_in_until_validated(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MBLM_CUDA_UNPROVEN", raising=False)
    args = ("--weights", weights, "--prompt", "x", "--device", "cuda")
    fails_with(run(*args), "has not been validated on a GPU yet; set MBLM_CUDA_UNPROVEN=1")
    if not torch.cuda.is_available():
        monkeypatch.setenv("MBLM_CUDA_UNPROVEN", "1")
        fails_with(run(*args), "CUDA is not available")


def test_greedy_generation_matches_python(model: MBLM, weights: Path) -> None:
    prompt = b"def f(x):\n"
    expected = model.generate(
        torch.tensor(list(prompt)), num_tokens_to_generate=20, filter_thres=1.0
    )
    result = run(
        "--weights", weights, "--prompt", prompt.decode(), "--num-tokens", 20, "--filter-thres", 1.0
    )
    assert result.returncode == 0, result.stderr.decode()
    # ids above 255 (the pad id) have no byte: left out, as mblm-generate's ByteStreamer does
    assert result.stdout == bytes(b for b in expected[len(prompt) :].tolist() if b < 256)


def test_output_file_stats_and_config_file(weights: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"io": {"name_model": "x"}, "params": PARAMS}))
    prompt = tmp_path / "prompt.bin"
    prompt.write_bytes(bytes(range(250, 256)))
    out = tmp_path / "out.bin"
    args = ("--weights", weights, "--config", config, "--prompt-file", prompt)
    args += ("--num-tokens", 100, "--seed", 3)
    result = run(*args, "--output", out, "--stats")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b""
    # capped by the context: 8 * 4 - 6 bytes
    assert len(out.read_bytes()) == 8 * 4 - 6
    assert b"bytes/s" in result.stderr
    again = run(*args)
    assert again.stdout == out.read_bytes()  # same seed, same bytes


def test_score_matches_python(model: MBLM, weights: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_bytes(b"hello world, hello bytes! " * 1)
    ids = torch.tensor(list(data.read_bytes()))[None]
    with torch.no_grad():
        expected = float(model.score(ids).loss)
    result = run("--weights", weights, "--score", data)
    assert result.returncode == 0, result.stderr.decode()
    words = result.stdout.decode().split()
    loss, bits = float(words[1]), float(words[3])
    assert loss == pytest.approx(expected, rel=1e-4)
    assert bits == pytest.approx(expected / math.log(2), rel=1e-4)


def test_missing_and_malformed_files(weights: Path, tmp_path: Path) -> None:
    fails_with(run("--weights", tmp_path / "none.safetensors", "--prompt", "x"), "cannot open")
    fails_with(run("--weights", weights, "--prompt-file", tmp_path / "none.txt"), "--prompt-file")
    fails_with(run("--weights", weights, "--score", tmp_path / "none.txt"), "--score file")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(weights.read_bytes()[:-100])
    fails_with(run("--weights", truncated, "--prompt", "x"), "truncated")
    fails_with(
        run("--weights", weights, "--config", tmp_path / "none.yaml", "--prompt", "x"),
        "does not exist",
    )
    fails_with(run("--weights", weights, "--prompt", "x" * 32), "the model's context is 32")


def test_config_problems(model: MBLM, weights: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare.safetensors"
    save_safetensors(model.state_dict(), bare)
    fails_with(run("--weights", bare, "--prompt", "x"), "no model config")

    custom = tmp_path / "custom.yaml"
    custom.write_text(json.dumps({"params": {**PARAMS, "block": {"block_type": "lstm"}}}))
    fails_with(
        run("--weights", weights, "--config", custom, "--prompt", "x"),
        "params.block.block_type: unsupported stage block 'lstm'",
    )

    wider = tmp_path / "wider.yaml"
    wider.write_text(json.dumps({"params": {**PARAMS, "hidden_dims": [64, 16]}}))
    fails_with(run("--weights", weights, "--config", wider, "--prompt", "x"), "shape")


def test_missing_and_unexpected_tensors(model: MBLM, tmp_path: Path) -> None:
    state = dict(model.state_dict())
    name = next(n for n in state if n.startswith("stage_models.0"))
    del state[name]
    fewer = save_safetensors(state, tmp_path / "fewer.safetensors", {"params": json.dumps(PARAMS)})
    fails_with(run("--weights", fewer, "--prompt", "x"), f"missing tensor '{name}'")
    more = dict(model.state_dict(), extra_tensor=torch.zeros(2))
    extra = save_safetensors(more, tmp_path / "extra.safetensors", {"params": json.dumps(PARAMS)})
    fails_with(run("--weights", extra, "--prompt", "x"), "extra_tensor")
