"""Only CUDA kernels proven on a GPU are the default CUDA path; the others need an opt-in.

Checked on any machine by pretending that CUDA kernels were built (the decision is pure Python).
"""

from __future__ import annotations

import pytest
import torch

from mblm.ops import _common

UNPROVEN = sorted(set(_common.CUDA_FAMILIES) - _common.CUDA_PROVEN_FAMILIES)


@pytest.fixture
def cuda_built(monkeypatch):
    monkeypatch.setattr(_common, "cuda_kernels_available", lambda: True)
    monkeypatch.delenv("MBLM_CUDA_UNPROVEN", raising=False)
    return monkeypatch


def test_families_are_known():
    assert _common.CUDA_PROVEN_FAMILIES <= set(_common.CUDA_FAMILIES)
    assert "conv" in UNPROVEN and "ssd" in UNPROVEN and "attention_kv" in UNPROVEN


@pytest.mark.parametrize("family", sorted(_common.CUDA_PROVEN_FAMILIES))
def test_proven_families_use_cuda(cuda_built, family):
    assert _common.kernel_device_types(family) == {"cpu", "cuda", "meta"}


@pytest.mark.parametrize("family", UNPROVEN)
def test_unproven_families_fall_back_on_cuda_and_say_why(cuda_built, family):
    assert _common.kernel_device_types(family) == {"cpu", "meta"}
    reason = _common.no_kernel_reason(family, torch.device("cuda"), torch.float32)
    assert "not passed their tests on a GPU" in reason
    assert f"MBLM_CUDA_UNPROVEN={family}" in reason


@pytest.mark.parametrize("opt_in", ["1", "ssd", "conv, ssd"])
def test_opt_in(cuda_built, opt_in):
    cuda_built.setenv("MBLM_CUDA_UNPROVEN", opt_in)
    assert "cuda" in _common.kernel_device_types("ssd")
    assert ("cuda" in _common.kernel_device_types("scan")) == (opt_in == "1")


def test_without_cuda_kernels_the_reason_is_the_device(monkeypatch):
    monkeypatch.setattr(_common, "cuda_kernels_available", lambda: False)
    assert _common.kernel_device_types("attention") == {"cpu", "meta"}
    reason = _common.no_kernel_reason("conv", torch.device("cuda"), torch.float32)
    assert reason == "no kernel for torch.float32 on cuda"
