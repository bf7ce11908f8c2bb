"""Every YAML config shipped in configs/ parses as a TrainEntryConfig and builds its model."""

from pathlib import Path

import pytest
import torch

from mblm import MBLM, MBLMModelConfig
from mblm.train.mblm import TrainEntryConfig
from mblm.utils.io import dump_yml, load_yml

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {
        "demo.yaml",
        "pg19_30bb_360m_1d_t.yaml",
        "pg19_30bb_360m_2d_ss.yaml",
        "pg19_30bb_360m_2d_st.yaml",
        "pg19_200bb_360m_3d_stt.yaml",
        "clevr_7mi_360m_1d_s_ft.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_builds(path, tmp_path):
    config = load_yml(path, TrainEntryConfig)
    params = config.params
    assert params.input_seq_len >= params.seq_lens[-1]
    # the model is built on the meta device: no memory for 360M parameters
    fields = set(MBLMModelConfig.model_fields)
    model_config = MBLMModelConfig.model_validate(
        {k: v for k, v in params.model_dump().items() if k in fields}
    )
    with torch.device("meta"):
        MBLM(model_config)
    # round trip through YAML keeps the config (the output config is an entry config again)
    again = load_yml(dump_yml(tmp_path / "c.yaml", config), TrainEntryConfig)
    assert again == config
