"""Full-MBLM parity with the original for models with Mamba stages.

The goldens (tests/parity/goldens_mamba/mblm_*.pt, made by make_mamba_goldens.py with the original
mblm, which fell back to mambapy's Mamba1 and so recorded ``block_type: mamba1``) hold the config,
the seeded initial state_dict, a perturbed state_dict, input ids, logits, loss and gradients.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch
from tolerances import GRAD_TOL, VALUE_TOL

from mblm.model.config import MBLMModelConfig, MBLMReturnType
from mblm.model.mamba import MambaBlock, check_mamba_variant, detect_mamba_variant
from mblm.model.mamba1 import Mamba
from mblm.model.mblm import MBLM

GOLDENS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "goldens_mamba", "mblm_*.pt")))
NAMES = [os.path.basename(p)[len("mblm_") : -len(".pt")] for p in GOLDENS]
FP32 = VALUE_TOL[torch.float32]


def _load(name: str) -> dict:
    path = os.path.join(os.path.dirname(__file__), "goldens_mamba", f"mblm_{name}.pt")
    return torch.load(path, weights_only=True)


def test_goldens_present_and_small():
    assert len(NAMES) >= 3
    total = sum(
        os.path.getsize(p) for p in glob.glob(os.path.join(os.path.dirname(GOLDENS[0]), "*"))
    )
    assert total < 1024 * 1024


@pytest.mark.parametrize("name", NAMES)
def test_config_parses_to_mamba1_stages(name):
    g = _load(name)
    cfg = MBLMModelConfig.model_validate(g["config"])
    blocks = cfg.stage_blocks()
    mamba = [k for k, b in enumerate(blocks) if isinstance(b, MambaBlock)]
    assert mamba, "every golden has at least one Mamba stage"
    assert all(blocks[k].block_type == "mamba1" for k in mamba)
    assert cfg.model_dump(mode="json") == g["config"]
    model = MBLM(cfg)
    for k in mamba:
        assert isinstance(model.stage_models[k], Mamba)
        assert detect_mamba_variant(g["state_dict"], f"stage_models.{k}.") == "mamba1"


@pytest.mark.parametrize("name", NAMES)
def test_seeded_init_equals_original(name):
    g = _load(name)
    torch.manual_seed(g["seed"])
    sd = MBLM(MBLMModelConfig.model_validate(g["config"])).state_dict()
    assert list(sd) == list(g["init_state_dict"])
    for key, ref in g["init_state_dict"].items():
        assert torch.equal(sd[key], ref), f"{key} differs from the original's seeded init"


@pytest.mark.parametrize("name", NAMES)
def test_logits_loss_grads_match_original(name):
    g = _load(name)
    model = MBLM(MBLMModelConfig.model_validate(g["config"]))
    model.load_state_dict(g["state_dict"], strict=True)
    loss, logits = model(g["input_ids"], return_type=MBLMReturnType.LOSS_LOGITS)
    torch.testing.assert_close(logits, g["logits"], **FP32)
    torch.testing.assert_close(loss, g["loss"], **FP32)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(g["grads"])
    for n, ref in g["grads"].items():
        torch.testing.assert_close(grads[n], ref, **GRAD_TOL[torch.float32], msg=n)


@pytest.mark.parametrize("name", NAMES)
def test_mamba1_checkpoint_into_mamba2_config_is_refused_clearly(name):
    g = _load(name)
    cfg = dict(g["config"])
    blocks = cfg["block"] if isinstance(cfg["block"], list) else [cfg["block"]]
    as_mamba2 = [
        {**b, "block_type": "mamba2"} if b["block_type"] == "mamba1" else b for b in blocks
    ]
    cfg["block"] = as_mamba2 if isinstance(cfg["block"], list) else as_mamba2[0]
    parsed = MBLMModelConfig.model_validate(cfg)
    model = MBLM(parsed)
    k = next(i for i, b in enumerate(parsed.stage_blocks()) if isinstance(b, MambaBlock))
    with pytest.raises(ValueError, match="block_type: mamba1"):
        check_mamba_variant(g["state_dict"], f"stage_models.{k}.", "mamba2", stage=k)
    # load_state_dict itself names the layout and the fix, strict or not.
    for strict in (True, False):
        with pytest.raises(ValueError, match=rf"stage {k} .*mambapy Mamba1.*block_type: mamba1"):
            model.load_state_dict(g["state_dict"], strict=strict)
