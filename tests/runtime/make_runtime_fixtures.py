"""Fixtures that pin the C++ runtime (csrc/runtime) to the Python package.

For every case below, tests/golden/runtime/ holds:

- ``<name>.yaml``: the model config (the fields of ``MBLMModelConfig``);
- ``<name>.safetensors``: the weights of a seeded tiny model, state_dict names;
- ``<name>.expected.safetensors``: what the Python package computes with them: input ids, full
  logits and loss, greedy generation for a batch of prompts (empty, shorter than a patch, whole
  patches, not a multiple) with and without an end token, a context-filling greedy run and a
  seeded sampled run; the generation settings are in its metadata.

tests/cpp/runtime/test_model.cpp checks the runtime against them; test_fixtures_current.py
checks that the current Python package still computes them. Regenerate (from the repository root)
after a deliberate change of the model's numerics:

    python tests/runtime/make_runtime_fixtures.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

from mblm import MBLM, MBLMModelConfig, MBLMReturnType
from mblm.utils.safetensors import load_safetensors, save_safetensors

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "runtime"

VOCAB, PAD = 257, 256
GEN_TOKENS = 12
SAMPLE_SEED = 1234
TEMPERATURE = 0.8
FILTER_THRES = 0.5


def _transformer(pos: str | None, rotary: bool = True, heads: int = 2, head_dim: int = 8) -> dict:
    return dict(
        block_type="transformer",
        attn_head_dims=head_dim,
        attn_num_heads=heads,
        attn_use_rot_embs=rotary,
        ff_multiplier=2,
        pos_emb_type=pos,
    )


def _mamba(variant: str, pos: str | None = None) -> dict:
    return dict(block_type=variant, d_state=8, d_conv=4, expand=2, headdim=8, pos_emb_type=pos)


def _config(dims: list[int], layers: list[int], seq_lens: list[int], blocks: list[dict]) -> dict:
    return dict(
        num_tokens=VOCAB,
        pad_token_id=PAD,
        hidden_dims=dims,
        num_layers=layers,
        seq_lens=seq_lens,
        train_checkpoint_chunks=None,
        block=blocks,
    )


# name -> (model config, seed of the initial weights, input length of the logits/loss check)
CASES: dict[str, tuple[dict, int, int]] = {
    # learned positions on both stages: generation limited to prod(seq_lens) = 32 bytes
    "transformer_fixed_2stage": (
        _config([32, 16], [2, 1], [8, 4], [_transformer("fixed"), _transformer("fixed")]),
        11,
        27,
    ),
    # model-level RoPE on the global stage (no length limit: the input is longer than the
    # context), no positional embedding on the middle stage, rotary off there
    "transformer_rope_3stage": (
        _config(
            [32, 24, 16],
            [1, 1, 1],
            [4, 3, 4],
            [
                _transformer("rope"),
                _transformer(None, rotary=False, heads=3),
                _transformer("fixed"),
            ],
        ),
        12,
        53,
    ),
    "mamba1_2stage": (
        _config([32, 16], [2, 1], [8, 4], [_mamba("mamba1"), _mamba("mamba1", "fixed")]),
        13,
        27,
    ),
    "mamba2_2stage": (
        _config([32, 16], [2, 1], [8, 4], [_mamba("mamba2", "rope"), _mamba("mamba2")]),
        14,
        30,
    ),
    # the demo's layout: Mamba2 global stage, Transformer local stage
    "hybrid_mamba2_transformer": (
        _config([32, 16], [2, 2], [8, 4], [_mamba("mamba2"), _transformer("fixed")]),
        15,
        27,
    ),
    "hybrid_mamba1_transformer_3stage": (
        _config(
            [32, 24, 16],
            [1, 1, 1],
            [4, 3, 4],
            [_mamba("mamba1", "rope"), _transformer("fixed"), _transformer(None)],
        ),
        16,
        41,
    ),
}


def build_model(name: str) -> MBLM:
    """The seeded tiny model of a case (fresh weights)."""
    cfg, seed, _ = CASES[name]
    torch.manual_seed(seed)
    return MBLM(MBLMModelConfig.model_validate(cfg)).eval()


def load_model(name: str) -> MBLM:
    """The model of a case with its committed config and weights."""
    cfg = yaml.safe_load((GOLDEN / f"{name}.yaml").read_text())
    model = MBLM(MBLMModelConfig.model_validate(cfg)).eval()
    state, _ = load_safetensors(GOLDEN / f"{name}.safetensors")
    model.load_state_dict(state, strict=True)
    return model


def prompts(name: str) -> list[torch.Tensor]:
    """Empty, shorter than a local patch, whole global patches, and not a multiple of a patch."""
    patch = 1
    for s in CASES[name][0]["seq_lens"][1:]:
        patch *= s
    g = torch.Generator().manual_seed(7)
    lengths = [0, 3, patch, patch + 5]
    return [torch.randint(0, 256, (n,), generator=g) for n in lengths]


def input_ids(name: str) -> torch.Tensor:
    """(2, L) byte ids with a few pad ids (ignored as loss targets)."""
    length = CASES[name][2]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, length), generator=g)
    ids[0, 5] = PAD
    ids[1, -1] = PAD
    return ids


@torch.inference_mode()
def expected_outputs(model: MBLM, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every output the C++ test compares, and the generation settings (metadata)."""
    out: dict[str, torch.Tensor] = {}
    ids = input_ids(name)
    out["ids"] = ids
    out["logits"] = model(ids, return_type=MBLMReturnType.LOGITS)
    out["loss"] = model(ids, return_type=MBLMReturnType.LOSS)
    ps = prompts(name)
    greedy = model.generate(ps, num_tokens_to_generate=GEN_TOKENS, enable_progress=False)
    # an end token the prompt-3 row generates at its 5th step: that row stops there (the others
    # stop wherever they generate it, or after GEN_TOKENS bytes)
    eos = int(greedy[2][ps[2].numel() + 4])
    stopped = model.generate(
        ps, num_tokens_to_generate=GEN_TOKENS, end_of_gen_token_id=eos, enable_progress=False
    )
    fill = model.generate(ps[3], enable_progress=False)  # num_tokens_to_generate=None: the context
    sampled = model.generate(
        ps,
        num_tokens_to_generate=GEN_TOKENS,
        temperature=TEMPERATURE,
        filter_thres=FILTER_THRES,
        generator=torch.Generator().manual_seed(SAMPLE_SEED),
        enable_progress=False,
    )
    for i, p in enumerate(ps):
        out[f"prompt.{i}"] = p
        out[f"greedy.{i}"] = greedy[i]
        out[f"stopped.{i}"] = stopped[i]
        out[f"sampled.{i}"] = sampled[i]
    out["fill"] = fill
    meta = {
        "num_prompts": str(len(ps)),
        "gen_tokens": str(GEN_TOKENS),
        "end_token": str(eos),
        "seed": str(SAMPLE_SEED),
        "temperature": repr(TEMPERATURE),
        "filter_thres": repr(FILTER_THRES),
    }
    return out, meta


def write_case(name: str) -> None:
    model = build_model(name)
    GOLDEN.mkdir(parents=True, exist_ok=True)
    cfg = MBLMModelConfig.model_validate(CASES[name][0]).model_dump(mode="json")
    (GOLDEN / f"{name}.yaml").write_text(
        f"# C++ runtime fixture '{name}' (tests/runtime/make_runtime_fixtures.py)\n"
        + yaml.safe_dump(cfg, sort_keys=False)
    )
    save_safetensors(model.state_dict(), GOLDEN / f"{name}.safetensors")
    # the expected outputs come from the weights as written (what the C++ test loads)
    expected, meta = expected_outputs(load_model(name), name)
    save_safetensors(expected, GOLDEN / f"{name}.expected.safetensors", metadata=meta)


def main() -> None:
    names = sys.argv[1:] or list(CASES)
    for name in names:
        write_case(name)
        sizes = [
            (GOLDEN / f"{name}{s}").stat().st_size
            for s in (".safetensors", ".expected.safetensors")
        ]
        print(f"{name}: weights {sizes[0] / 1024:.0f} KiB, expected {sizes[1] / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
