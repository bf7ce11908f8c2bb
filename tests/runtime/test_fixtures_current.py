"""The committed C++ runtime fixtures (tests/golden/runtime/<name>.*) are what the current Python
package computes: the C++ test (tests/cpp/runtime/test_model.cpp) compares the runtime with them,
so Python and C++ stay pinned together. After a deliberate numerics change, regenerate them with
``python tests/runtime/make_runtime_fixtures.py`` (and the C++ test shows whether the runtime
follows)."""

from __future__ import annotations

import pytest
import torch
import yaml
from make_runtime_fixtures import (
    CASES,
    GOLDEN,
    build_model,
    expected_outputs,
    load_model,
)

from mblm import MBLMModelConfig
from mblm.utils.safetensors import load_safetensors


@pytest.mark.parametrize("name", list(CASES))
def test_config_and_weights_are_the_scripts(name: str) -> None:
    committed = yaml.safe_load((GOLDEN / f"{name}.yaml").read_text())
    assert committed == MBLMModelConfig.model_validate(CASES[name][0]).model_dump(mode="json")
    weights, _ = load_safetensors(GOLDEN / f"{name}.safetensors")
    fresh = build_model(name).state_dict()
    assert set(weights) == set(fresh)
    for key, value in fresh.items():
        assert torch.equal(weights[key], value), key


@pytest.mark.parametrize("name", list(CASES))
def test_expected_outputs_are_current(name: str) -> None:
    committed, committed_meta = load_safetensors(GOLDEN / f"{name}.expected.safetensors")
    current, meta = expected_outputs(load_model(name), name)
    assert committed_meta == meta
    assert set(committed) == set(current)
    for key, value in current.items():
        want = committed[key]
        assert value.dtype == want.dtype and value.shape == want.shape, key
        if value.is_floating_point():
            # float results may differ in the last bits between machines (vector widths, BLAS)
            torch.testing.assert_close(value, want, rtol=0, atol=1e-5, msg=key)
        else:
            assert torch.equal(value, want), f"{key}: {value.tolist()} != {want.tolist()}"
