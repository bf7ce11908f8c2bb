"""The C++ runtime's config parser (csrc/runtime/config.cpp) against pydantic: for every case, the
runtime accepts exactly what ``MBLMModelConfig.model_validate(yaml.safe_load(text))`` accepts,
with the same field values and the same block class picked, except sizes no model can be built
with (which the runtime rejects early, naming the field).

The C++ side runs through the GoogleTest binary ``mblm_runtime_tests``
(``RuntimeConfigInterop.ParsesConfigDirectory``).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from mblm import MBLMModelConfig

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / os.environ.get("MBLM_BUILD_DIR", "build/dev") / "mblm_runtime_tests"

STAGES = {
    "num_tokens": 257,
    "pad_token_id": 256,
    "hidden_dims": [64, 32],
    "num_layers": [2, 1],
    "seq_lens": [16, 8],
    "train_checkpoint_chunks": None,
}
TB = {"attn_head_dims": 16, "attn_num_heads": 2, "attn_use_rot_embs": True}
MB = {"d_state": 16, "d_conv": 4, "expand": 2, "headdim": 16}


def cfg(block: Any = None, **top: Any) -> str:
    return yaml.safe_dump({**STAGES, **top, "block": TB if block is None else block})


STAGE_LINES = "".join(f"{k}: {json.dumps(v)}\n" for k, v in STAGES.items())

CASES: dict[str, str] = {
    "transformer": cfg(),
    "encoder": cfg({**TB, "block_type": "transformerEncoder"}),
    "transformer_all": cfg(
        {**TB, "attn_dropout": 0.1, "ff_multiplier": 4, "ff_dropout": 0.2, "use_flash_attn": True}
    ),
    "bad_type": cfg({**TB, "block_type": "foo"}),
    "mamba2": cfg(MB),
    "mamba1": cfg({**MB, "block_type": "mamba1", "dropout": 0.5}),
    "mamba3": cfg({**MB, "block_type": "mamba3"}),
    "mamba_no_headdim": cfg({"d_state": 1, "d_conv": 2, "expand": 2}),
    "both_kinds": cfg({**TB, **MB}),
    "both_kinds_mamba": cfg({**TB, **MB, "block_type": "mamba2"}),
    "both_kinds_encoder": cfg({**TB, **MB, "block_type": "transformerEncoder"}),
    "mamba_as_transformer": cfg({**MB, "block_type": "transformer"}),
    "extra_keys": cfg({**TB, "foo": 1}, input_seq_len=128, bar="x"),
    "no_chunks": yaml.safe_dump(
        {k: v for k, v in STAGES.items() if k != "train_checkpoint_chunks"} | {"block": TB}
    ),
    "chunks": cfg(train_checkpoint_chunks=[2]),
    "chunks_bad": cfg(train_checkpoint_chunks=["a"]),
    "chunks_int": cfg(train_checkpoint_chunks=3),
    "int_float": cfg({**TB, "attn_head_dims": 16.0}),
    "int_fraction": cfg({**TB, "attn_head_dims": 16.5}),
    "int_strings": cfg({**TB, "attn_head_dims": " 1_6 ", "attn_num_heads": "2.00"}),
    "int_string_bad": cfg({**TB, "attn_head_dims": "0x10"}),
    "int_bool": cfg({**TB, "attn_num_heads": True}),
    "bool_forms": cfg({**TB, "attn_use_rot_embs": "Yes", "use_flash_attn": 0}),
    "bool_bad": cfg({**TB, "use_flash_attn": 2}),
    "bool_null": cfg({**TB, "use_flash_attn": None}),
    "float_forms": cfg({**TB, "attn_dropout": "1e-1", "ff_dropout": True}),
    "float_null": cfg({**TB, "attn_dropout": None}),
    "type_not_str": cfg({**TB, "block_type": 5}),
    "pos_rope": cfg({**TB, "pos_emb_type": "rope"}),
    "pos_fixed_null": cfg([{**MB, "pos_emb_type": None}, {**TB, "pos_emb_type": "fixed"}]),
    "pos_bad": cfg({**TB, "pos_emb_type": "None"}),
    "lengths": cfg(num_layers=[1, 2, 3]),
    "block_list_short": cfg([TB]),
    "block_list": cfg([MB, {**TB, "block_type": "transformerEncoder"}]),
    "hidden_str": cfg(hidden_dims="64"),
    "hidden_int": cfg(hidden_dims=64),
    "block_null": STAGE_LINES + "block: null\n",
    "block_int": STAGE_LINES + "block: 5\n",
    "block_empty": STAGE_LINES + "block: {}\n",
    "block_nested": cfg([[TB], TB]),
    "numtok_str": cfg(num_tokens="257"),
    "numtok_float": cfg(num_tokens=257.0),
    "missing_num_tokens": yaml.safe_dump(
        {k: v for k, v in STAGES.items() if k != "num_tokens"} | {"block": TB}
    ),
    "params_section": yaml.safe_dump(
        {"io": {"name_model": "x"}, "params": {**STAGES, "block": MB}}
    ),
    # YAML 1.1 scalars as yaml.safe_load reads them
    "yaml_scalars": STAGE_LINES
    + "block:\n  attn_head_dims: 0x10\n  attn_num_heads: 0b10\n  attn_use_rot_embs: on\n"
    "  ff_multiplier: 1_0\n  attn_dropout: .5\n  use_flash_attn: NO\n  pos_emb_type: ~\n",
    "yaml_exponent_int": STAGE_LINES + "block:\n  attn_head_dims: 1e1\n  attn_num_heads: 2\n"
    "  attn_use_rot_embs: true\n",
    "yaml_duplicate_key": STAGE_LINES + "block:\n  attn_head_dims: 3\n  attn_head_dims: 8\n"
    "  attn_num_heads: 2\n  attn_use_rot_embs: true\n",
    "yaml_octal": STAGE_LINES + "block:\n  attn_head_dims: 010\n  attn_num_heads: 2\n"
    "  attn_use_rot_embs: false\n",
}

# Accepted by pydantic, rejected by the runtime (no model can be built or run with them).
RUNTIME_ONLY = {
    "neg_dims": (cfg({**TB, "attn_head_dims": -1}), "block.attn_head_dims: must be positive"),
    "pad_outside": (cfg(pad_token_id=300), "pad_token_id: must lie in [0, num_tokens)"),
    "no_stages": (
        cfg([], hidden_dims=[], num_layers=[], seq_lens=[]),
        "hidden_dims: the model needs at least one stage",
    ),
    "headdim": (cfg({**MB, "headdim": 48}), "block.headdim: must divide expand * hidden_dims[0]"),
    "odd_rotary": (cfg({**TB, "attn_head_dims": 15}), "need an even head width"),
    "dropout": (cfg({**TB, "ff_dropout": 1.5}), "block.ff_dropout"),
}


def python_result(text: str) -> dict[str, Any] | None:
    data = yaml.safe_load(text)
    if "params" in data and "num_tokens" not in data:
        data = data["params"]
    try:
        config = MBLMModelConfig.model_validate(data)
    except ValidationError:
        return None
    blocks = [b.model_dump(mode="python") for b in config.stage_blocks()]
    return {
        "num_tokens": config.num_tokens,
        "pad_token_id": config.pad_token_id,
        "hidden_dims": list(config.hidden_dims),
        "num_layers": list(config.num_layers),
        "seq_lens": list(config.seq_lens),
        "blocks": blocks,
    }


@pytest.fixture(scope="module")
def cpp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    if not BINARY.is_file():
        pytest.skip(f"{BINARY} is not built (bash tools/dev_build.sh)")
    src = tmp_path_factory.mktemp("configs")
    out = tmp_path_factory.mktemp("parsed")
    for name, text in {**CASES, **{k: v[0] for k, v in RUNTIME_ONLY.items()}}.items():
        (src / f"{name}.yaml").write_text(text)
    result = subprocess.run(
        [str(BINARY), "--gtest_filter=RuntimeConfigInterop.ParsesConfigDirectory"],
        env={
            **os.environ,
            "MBLM_RUNTIME_CONFIG_DIR": str(src),
            "MBLM_RUNTIME_CONFIG_OUT": str(out),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_runtime_parses_like_pydantic(name: str, cpp_results: dict[str, dict[str, Any]]) -> None:
    expected = python_result(CASES[name])
    got = cpp_results[name]
    if expected is None:
        assert "error" in got, f"pydantic rejects {name}, the runtime accepted {got}"
        return
    assert "error" not in got, got.get("error")
    assert got == expected


@pytest.mark.parametrize("name", sorted(RUNTIME_ONLY))
def test_runtime_rejects_unbuildable_sizes(
    name: str, cpp_results: dict[str, dict[str, Any]]
) -> None:
    text, message = RUNTIME_ONLY[name]
    assert python_result(text) is not None  # pydantic accepts it
    assert message in cpp_results[name].get("error", ""), cpp_results[name]
