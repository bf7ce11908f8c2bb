"""Parity of the Transformer MBLM / MBLMEncoder with the original mblm (goldens in goldens/).

The goldens are made by ``make_goldens.py`` with the original package (see tests/parity/README.md).
Each one is rebuilt here from its config, loaded with ``load_state_dict(strict=True)`` and must
give the original's logits (max |diff| <= 1e-5, fp32 CPU), hidden state, loss and every
parameter gradient (within 1e-4 of the tensor's scale) and the same generated tokens; a seeded
construction must give the original's initial weights bit for bit.
"""

from __future__ import annotations

import os
import re
import warnings
from functools import cache
from typing import Any

import pytest
import torch

from mblm import MBLM, MBLMEncoder, MBLMEncoderModelConfig, MBLMModelConfig, MBLMReturnType

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "goldens")
NAMES = sorted(f[: -len(".pt")] for f in os.listdir(GOLDEN_DIR) if f.endswith(".pt"))
LOGITS_ATOL = 1e-5
REL_TOL = 1e-4
# Gradients that are exactly zero in the original (e.g. queries that see a single key) come out
# at round-off level (~1e-10) here.
ABS_FLOOR = 1e-7


@cache
def _load(name: str) -> dict[str, Any]:
    return torch.load(os.path.join(GOLDEN_DIR, f"{name}.pt"), weights_only=True)


def _build(golden: dict[str, Any]) -> MBLM | MBLMEncoder:
    if golden["kind"] == "encoder":
        return MBLMEncoder(MBLMEncoderModelConfig.model_validate(golden["config"]))
    return MBLM(MBLMModelConfig.model_validate(golden["config"]))


def _loaded(golden: dict[str, Any]) -> MBLM | MBLMEncoder:
    model = _build(golden)
    model.load_state_dict(golden["state_dict"], strict=True)
    return model.train(golden["train"])


def _close_rel(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """max |actual - expected| <= REL_TOL * max |expected| + ABS_FLOOR."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert diff <= REL_TOL * scale + ABS_FLOOR, f"{what}: max |diff| {diff:.3g} (scale {scale:.3g})"


def _forward(model: torch.nn.Module, golden: dict[str, Any], return_type: MBLMReturnType, **kw):
    if golden["kind"] == "encoder":
        return model(
            input_ids=golden["input_ids"],
            attention_mask=golden["attention_mask"],
            labels=golden["labels"].clone(),
            return_type=return_type,
            **kw,
        )
    return model(golden["input_ids"], return_type=return_type, **kw)


def test_goldens_present_small_and_versioned():
    assert len(NAMES) >= 15
    total = sum(os.path.getsize(os.path.join(GOLDEN_DIR, f)) for f in os.listdir(GOLDEN_DIR))
    assert total < 4 * 1024 * 1024
    with open(os.path.join(GOLDEN_DIR, "versions.txt"), encoding="utf8") as f:
        versions = dict(line.strip().split("==") for line in f if line.strip())
    assert re.fullmatch(r"0\.4\.\d+", versions["mblm"])
    kinds = {_load(n)["kind"] for n in NAMES}
    assert kinds == {"mblm", "encoder"}


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips(name):
    golden = _load(name)
    cls = MBLMEncoderModelConfig if golden["kind"] == "encoder" else MBLMModelConfig
    cfg = cls.model_validate(golden["config"])
    assert cfg.model_dump(mode="json") == golden["config"]
    assert cls.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize("name", NAMES)
def test_seeded_construction_equals_original_init(name):
    golden = _load(name)
    torch.manual_seed(golden["seed"])
    state = _build(golden).state_dict()
    assert list(state) == list(golden["init_state_dict"])
    for key, expected in golden["init_state_dict"].items():
        assert state[key].shape == expected.shape, key
        assert torch.equal(state[key], expected), f"{key} differs from the original's seeded init"


@pytest.mark.parametrize("name", NAMES)
def test_logits_hidden_loss_grads_match_original(name):
    golden = _load(name)
    model = _loaded(golden)
    with torch.no_grad():
        logits = _forward(model, golden, MBLMReturnType.LOGITS)
        hidden = _forward(model, golden, MBLMReturnType.HIDDEN_STATE)
    assert logits.shape == golden["logits"].shape
    diff = (logits - golden["logits"]).abs().max().item()
    assert diff <= LOGITS_ATOL, f"logits max |diff| {diff:.3g}"
    assert hidden.shape == golden["hidden"].shape
    _close_rel(hidden, golden["hidden"], "hidden state")

    loss = _forward(model, golden, MBLMReturnType.LOSS, loss_mask=golden.get("loss_mask"))
    _close_rel(loss.detach(), golden["loss"], "loss")
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(golden["grads"])
    for key, expected in golden["grads"].items():
        _close_rel(grads[key], expected, f"grad of {key}")


@pytest.mark.parametrize("name", NAMES)
def test_loss_logits_equals_separate_calls(name):
    golden = _load(name)
    model = _loaded(golden)
    with torch.no_grad():
        loss, logits = _forward(
            model, golden, MBLMReturnType.LOSS_LOGITS, loss_mask=golden.get("loss_mask")
        )
    assert (logits - golden["logits"]).abs().max().item() <= LOGITS_ATOL
    _close_rel(loss, golden["loss"], "loss of LOSS_LOGITS")


@pytest.mark.parametrize("name", [n for n in NAMES if "embeds" in _load(n)])
def test_single_tensor_inputs_embeds_match_original(name):
    golden = _load(name)
    model = _loaded(golden)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "bypasses per-stage embedding tables"
        hidden = model(inputs_embeds=golden["embeds"], return_type=MBLMReturnType.HIDDEN_STATE)
    _close_rel(hidden, golden["embeds_hidden"], "hidden state from inputs_embeds")


@pytest.mark.parametrize("name", [n for n in NAMES if _load(n)["generate"]])
def test_generate_tokens_match_original(name):
    golden = _load(name)
    model = _loaded(golden).eval()
    for kwargs, seed, expected in golden["generate"]:
        torch.manual_seed(seed)
        out = model.generate(**kwargs, enable_progress=False)
        assert torch.equal(out, expected), (
            f"generate({kwargs}) = {out.tolist()} != {expected.tolist()}"
        )
