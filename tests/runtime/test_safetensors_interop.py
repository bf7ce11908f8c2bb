"""safetensors files cross the language boundary: the C++ runtime (csrc/runtime/weights.cpp) reads
what Python's ``safetensors`` and ``mblm-export`` write, and Python reads what the runtime writes.

The C++ side runs through the GoogleTest binary ``mblm_runtime_tests`` (tests/cpp/runtime), which
reads the file named in ``MBLM_RUNTIME_READ`` / writes the one named in ``MBLM_RUNTIME_WRITE``.

``python tests/runtime/test_safetensors_interop.py`` rewrites the committed fixture
tests/golden/runtime/python_written.safetensors (the C++ test reads it when run on its own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "runtime" / "python_written.safetensors"
BINARY = ROOT / os.environ.get("MBLM_BUILD_DIR", "build/dev") / "mblm_runtime_tests"


def fixture_tensors() -> dict[str, torch.Tensor]:
    """The tensors of the fixture; tests/cpp/runtime/test_weights.cpp builds the same."""
    base = torch.arange(-3, 3).reshape(2, 3)
    return {
        "f64": base.double() * 0.5,
        "f32": base.float() * 0.25,
        "f16": base.half() * 0.5,
        "bf16": base.bfloat16() * 2,
        "i64": base * 1_000_000_000_000,
        "i32": base.int() * 100_000,
        "i16": base.short() * 1000,
        "i8": base.to(torch.int8) * 40,
        "u8": (base + 3).to(torch.uint8) * 50,
        "bool": base.remainder(2).eq(0),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
        "stage_models.0.layers.1.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    }


def write_golden(path: Path = GOLDEN) -> Path:
    from mblm.utils.safetensors import save_safetensors

    return save_safetensors(fixture_tensors(), path, {"format": "mblm"})


def run_cpp(test: str, **env: str) -> None:
    if not BINARY.is_file():
        pytest.skip(f"{BINARY} is not built (bash tools/dev_build.sh)")
    result = subprocess.run(
        [str(BINARY), f"--gtest_filter={test}"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[  PASSED  ] 1 test" in result.stdout, result.stdout


def assert_fixture(tensors: dict[str, torch.Tensor]) -> None:
    expected = fixture_tensors()
    assert sorted(tensors) == sorted(expected)
    for name, tensor in expected.items():
        assert tensors[name].dtype == tensor.dtype, name
        assert torch.equal(tensors[name], tensor), name


def test_committed_fixture_is_current() -> None:
    from mblm.utils.safetensors import load_safetensors

    tensors, metadata = load_safetensors(GOLDEN)
    assert_fixture(tensors)
    assert metadata == {"format": "mblm"}


def test_cpp_reads_python_safetensors(tmp_path: Path) -> None:
    path = write_golden(tmp_path / "py.safetensors")
    run_cpp("RuntimeWeightsInterop.ReadsPythonWrittenFile", MBLM_RUNTIME_READ=str(path))


def test_cpp_reads_mblm_export(tmp_path: Path) -> None:
    from mblm.cli.export import main as export_main

    checkpoint = tmp_path / "run_top1.pth"
    torch.save({"MODEL": fixture_tensors(), "LOSS": 1.25}, checkpoint)
    params = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["params"]
    (tmp_path / "config.yaml").write_text(json.dumps({"params": params}))
    out = tmp_path / "exported.safetensors"
    assert export_main([str(checkpoint), "-o", str(out)]) == 0
    run_cpp("RuntimeWeightsInterop.ReadsPythonWrittenFile", MBLM_RUNTIME_READ=str(out))


def test_python_reads_cpp_safetensors(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = tmp_path / "cpp.safetensors"
    run_cpp("RuntimeWeightsInterop.WritesFileForPython", MBLM_RUNTIME_WRITE=str(path))
    assert_fixture(load_file(str(path)))
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "mblm", "writer": "mblm_runtime"}


def test_cpp_rejects_truncated_python_file(tmp_path: Path) -> None:
    full = write_golden(tmp_path / "full.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full[: len(full) - 3])
    if not BINARY.is_file():
        pytest.skip(f"{BINARY} is not built (bash tools/dev_build.sh)")
    result = subprocess.run(
        [str(BINARY), "--gtest_filter=RuntimeWeightsInterop.ReadsPythonWrittenFile"],
        env={**os.environ, "MBLM_RUNTIME_READ": str(cut)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert f"safetensors file {cut}" in result.stdout
    assert "truncated" in result.stdout


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(write_golden())
