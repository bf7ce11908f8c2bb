"""Configs: validation messages, YAML/JSON round trips, the block registry, the repo configs and
the original README's custom-block (LSTM) examples."""

from __future__ import annotations

import glob
import os
import re

import pydantic
import pytest
import torch
import yaml

import mblm
from mblm import (
    MBLM,
    MambaBlock,
    MBLMEncoderModelConfig,
    MBLMModelConfig,
    MBLMReturnType,
    TransformerBlock,
    TransformerEncoderBlock,
)
from mblm.model.block import StageBlock, StageBlockRegistry
from mblm.model.config import MaskReduceStrat, block_registry

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))

T_BLOCK = dict(attn_head_dims=8, attn_num_heads=2, attn_use_rot_embs=True, pos_emb_type="fixed")
M_BLOCK = dict(d_state=8, d_conv=4, expand=2, headdim=8, pos_emb_type=None)


def _cfg(**overrides) -> dict:
    base = dict(
        num_tokens=257,
        pad_token_id=256,
        hidden_dims=[32, 16],
        seq_lens=[8, 4],
        num_layers=[1, 1],
        train_checkpoint_chunks=None,
        block=T_BLOCK,
    )
    return {**base, **overrides}


def test_version_and_public_api():
    assert re.fullmatch(r"\d\.\d\.\d", mblm.__version__)
    assert mblm.__all__ == [
        "MBLM",
        "MBLMEncoder",
        "MBLMModelConfig",
        "MBLMEncoderModelConfig",
        "MBLMReturnType",
        "TransformerBlock",
        "TransformerEncoderBlock",
        "MambaBlock",
    ]
    for name in mblm.__all__:
        assert getattr(mblm, name) is not None


def test_return_type_values_are_the_originals():
    assert [m.value for m in MBLMReturnType] == ["1", "2", "3", "4"]
    assert MBLMReturnType.LOSS == "2"
    assert MBLMReturnType("4") is MBLMReturnType.HIDDEN_STATE
    assert str(MaskReduceStrat.ANY) == "any"


def test_stage_length_mismatch_message():
    with pytest.raises(pydantic.ValidationError, match="are not of the same length"):
        MBLMModelConfig.model_validate(_cfg(num_layers=[1, 1, 1]))


def test_block_list_length_message():
    with pytest.raises(pydantic.ValidationError, match="appropriate number of stages"):
        MBLMModelConfig.model_validate(_cfg(block=[T_BLOCK]))


def test_required_fields_and_unparsable_block():
    cfg = _cfg()
    del cfg["train_checkpoint_chunks"]
    with pytest.raises(pydantic.ValidationError, match="train_checkpoint_chunks"):
        MBLMModelConfig.model_validate(cfg)
    with pytest.raises(pydantic.ValidationError, match="Could not parse data to any of"):
        MBLMModelConfig.model_validate(_cfg(block={"attn_head_dims": 8}))


def test_block_type_validators():
    with pytest.raises(pydantic.ValidationError, match="This model is a transformer"):
        TransformerBlock(**T_BLOCK, block_type="mamba2")
    with pytest.raises(pydantic.ValidationError, match="This model is a transformerEncoder"):
        TransformerEncoderBlock(**T_BLOCK, block_type="transformer")
    with pytest.raises(pydantic.ValidationError, match="This model is a mamba block"):
        MambaBlock(**M_BLOCK, block_type="transformer")
    with pytest.raises(pydantic.ValidationError, match="pos_emb_type"):
        TransformerBlock(**{**T_BLOCK, "pos_emb_type": "learned"})
    with pytest.raises(TypeError):
        StageBlock(block_type="x")  # abstract


def test_block_defaults_match_original():
    block = TransformerBlock(**T_BLOCK)
    assert (block.attn_dropout, block.ff_multiplier, block.ff_dropout) == (0.0, 2, 0.0)
    assert (block.use_flash_attn, block.block_type) == (False, "transformer")
    assert TransformerEncoderBlock(**T_BLOCK).block_type == "transformerEncoder"
    assert MambaBlock(**M_BLOCK).dropout == 0.0


def test_registry_parses_in_registration_order():
    assert list(block_registry) == [TransformerBlock, MambaBlock, TransformerEncoderBlock]
    # a transformer dict without block_type fits both transformer classes: the causal one wins
    cfg = MBLMModelConfig.model_validate(_cfg(block=[T_BLOCK, {**T_BLOCK, "pos_emb_type": None}]))
    assert [type(b) for b in cfg.stage_blocks()] == [TransformerBlock, TransformerBlock]
    explicit = {**T_BLOCK, "block_type": "transformerEncoder"}
    cfg = MBLMModelConfig.model_validate(_cfg(block=explicit))
    assert isinstance(cfg.block, TransformerEncoderBlock)
    cfg = MBLMModelConfig.model_validate(_cfg(block=[M_BLOCK, T_BLOCK]))
    assert [type(b) for b in cfg.stage_blocks()] == [MambaBlock, TransformerBlock]


def test_registry_is_a_set_with_stable_order():
    class A(TransformerBlock):
        pass

    class B(TransformerBlock):
        pass

    registry = StageBlockRegistry()
    for klass in (B, A, B):
        registry.register()(klass)
    assert isinstance(registry, set) and len(registry) == 2
    assert list(registry) == [B, A]
    assert repr(registry).startswith("StageBlockRegistry({") and repr(registry).index("B") < repr(
        registry
    ).index("A")
    registry.discard(B)
    assert list(registry) == [A]


def test_single_block_repeated_and_list_kept():
    cfg = MBLMModelConfig.model_validate(_cfg())
    blocks = cfg.stage_blocks()
    assert len(blocks) == 2 and blocks[0] is blocks[1]
    cfg = MBLMModelConfig.model_validate(_cfg(seq_lens=(8, 4)))
    assert cfg.seq_lens == (8, 4)


@pytest.mark.parametrize(
    "block",
    [
        T_BLOCK,
        [M_BLOCK, {**T_BLOCK, "use_flash_attn": True, "ff_multiplier": 3}],
        [{**T_BLOCK, "block_type": "transformerEncoder"}, T_BLOCK],
    ],
)
def test_dump_validate_round_trips(block):
    cfg = MBLMModelConfig.model_validate(_cfg(block=block, train_checkpoint_chunks=[2]))
    dumped = cfg.model_dump()
    assert all(
        "block_type" in b
        for b in (dumped["block"] if isinstance(block, list) else [dumped["block"]])
    )
    assert MBLMModelConfig.model_validate(dumped) == cfg
    assert MBLMModelConfig.model_validate_json(cfg.model_dump_json()) == cfg
    text = yaml.safe_dump(cfg.model_dump(mode="json"))
    assert MBLMModelConfig.model_validate(yaml.safe_load(text)) == cfg
    enc = MBLMEncoderModelConfig(mask_token_id=3, mblm_config=cfg, mask_reduce_strat="all")
    assert MBLMEncoderModelConfig.model_validate_json(enc.model_dump_json()) == enc
    assert enc.model_dump(mode="json")["mask_reduce_strat"] == "all"


def test_encoder_config_defaults():
    enc = MBLMEncoderModelConfig(mask_token_id=3, mblm_config=_cfg())
    assert enc.mask_reduce_strat is MaskReduceStrat.ANY


def test_repo_configs_present():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {
        "pg19_30bb_360m_2d_st.yaml",
        "pg19_30bb_360m_1d_t.yaml",
        "pg19_30bb_360m_2d_ss.yaml",
        "pg19_200bb_360m_3d_stt.yaml",
        "clevr_7mi_360m_1d_s_ft.yaml",
        "quickstart_2stage.yaml",
    } <= names


EXPECTED_STAGES = {
    "pg19_30bb_360m_2d_st.yaml": ["MambaBlock", "TransformerBlock"],
    "pg19_30bb_360m_1d_t.yaml": ["TransformerBlock"],
    "pg19_30bb_360m_2d_ss.yaml": ["MambaBlock", "MambaBlock"],
    "pg19_200bb_360m_3d_stt.yaml": ["MambaBlock", "TransformerBlock", "TransformerBlock"],
    "clevr_7mi_360m_1d_s_ft.yaml": ["MambaBlock"],
    "quickstart_2stage.yaml": ["MambaBlock", "TransformerBlock"],
    "demo.yaml": ["MambaBlock", "TransformerBlock"],
}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_repo_config_params_parse_and_build(path):
    with open(path, encoding="utf8") as f:
        raw = yaml.safe_load(f)
    assert {"io", "params", "train"} <= set(raw)
    cfg = MBLMModelConfig.model_validate(raw["params"])
    assert [type(b).__name__ for b in cfg.stage_blocks()] == EXPECTED_STAGES[os.path.basename(path)]
    assert raw["params"]["input_seq_len"] <= __import__("math").prod(cfg.seq_lens)
    # the full-size models are built on the meta device (structure and sizes, no memory)
    with torch.device("meta"):
        model = MBLM(cfg)
    num_params = sum(p.numel() for p in model.parameters())
    expected = {"quickstart_2stage.yaml": 96e6, "demo.yaml": 0.85e6}.get(
        os.path.basename(path), 360e6
    )
    assert 0.9 * expected < num_params < 1.2 * expected


LSTM_MODEL_SRC = """
class LSTM(torch.nn.Module):
    def __init__(self, lstm: torch.nn.LSTM):
        super().__init__()
        self.lstm = lstm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(input_ids)
        return out
"""


def test_readme_custom_lstm_block_example():
    """The original README's "Custom stage blocks" example, unchanged apart from the seed."""
    import torch.nn  # noqa: F401

    scope: dict = {"torch": torch}
    exec(LSTM_MODEL_SRC, scope)
    LSTM = scope["LSTM"]  # noqa: N806

    class LSTMBlock(StageBlock):
        block_type: str = "lstm"
        dropout: float

        def to_model(self, model_dim: int, num_layers: int) -> torch.nn.Module:
            return LSTM(
                torch.nn.LSTM(
                    input_size=model_dim,
                    hidden_size=model_dim,
                    batch_first=True,
                    dropout=self.dropout,
                    num_layers=num_layers,
                )
            )

    torch.manual_seed(0)
    model = MBLM(
        MBLMModelConfig(
            num_tokens=257,
            hidden_dims=[1024, 1024],
            seq_lens=[1024, 8],
            num_layers=[5, 5],
            pad_token_id=256,
            train_checkpoint_chunks=None,
            block=[
                LSTMBlock(dropout=0.1, pos_emb_type=None),
                TransformerBlock(
                    attn_head_dims=64,
                    attn_num_heads=16,
                    attn_use_rot_embs=True,
                    use_flash_attn=True,
                    pos_emb_type="fixed",
                ),
            ],
        )
    )
    x = torch.randint(0, 258, (1, 12)).long()
    assert x.max() < 257  # seed 0 does not draw 257, which is outside the vocabulary
    loss = model.forward(x, return_type=MBLMReturnType.LOSS)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_readme_registered_lstm_block_from_yaml():
    """The README's registered custom block parsed from YAML (small widths to keep it fast)."""
    scope: dict = {"torch": torch}
    exec(LSTM_MODEL_SRC, scope)
    LSTM = scope["LSTM"]  # noqa: N806

    @block_registry.register()
    class LSTMBlock(StageBlock):
        block_type: str = "lstm"
        dropout: float
        my_property: int

        def to_model(self, model_dim: int, num_layers: int) -> torch.nn.Module:
            return LSTM(
                torch.nn.LSTM(
                    input_size=model_dim,
                    hidden_size=model_dim,
                    batch_first=True,
                    dropout=self.dropout,
                    num_layers=num_layers,
                )
            )

    yml_model_config = """
num_tokens: 257
hidden_dims: [64, 64]
seq_lens: [1024, 8]
num_layers: [5, 5]
pad_token_id: 256
train_checkpoint_chunks: null
block:
    - dropout: 0.1
      my_property: 1
      pos_emb_type: null
    - attn_head_dims: 16
      attn_num_heads: 4
      attn_use_rot_embs: true
      use_flash_attn: true
      pos_emb_type: fixed
"""
    try:
        parsed_config = yaml.safe_load(yml_model_config)
        cfg = MBLMModelConfig.model_validate(parsed_config)
        assert [type(b) for b in cfg.stage_blocks()] == [LSTMBlock, TransformerBlock]
        assert list(block_registry)[-1] is LSTMBlock
        torch.manual_seed(0)
        model = MBLM(cfg)
        x = torch.randint(0, 257, (1, 12)).long()
        loss = model.forward(x, return_type=MBLMReturnType.LOSS)
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert MBLMModelConfig.model_validate(cfg.model_dump()) == cfg
    finally:
        block_registry.discard(LSTMBlock)
