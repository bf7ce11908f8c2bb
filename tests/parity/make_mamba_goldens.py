"""Generates the Mamba parity goldens from the ORIGINAL mblm (mambapy Mamba1 fallback).

Run with the interpreter of the environment that has the original packages (mblm 0.4.x,
mambapy, MEGABYTE-pytorch; no mamba_ssm, so the original builds mambapy's Mamba1):

    /tmp/orig_venv/bin/python tests/parity/make_mamba_goldens.py

Writes tests/parity/goldens_mamba/*.pt (torch.save of plain dicts of tensors, strings and numbers;
loadable with weights_only=True):

- mambapy_<name>.pt: mambapy's ``Mamba`` directly: config, seed, the seeded initial state_dict,
  a perturbed state_dict (so that D, A_log and the biases are not at their structured init
  values), an input, the output, a random upstream gradient and the gradients of
  ``(output * upstream).sum()`` with respect to every parameter and the input.
- mblm_<name>.pt: MBLM models with Mamba stages built by the original: config
  (``model_dump(mode="json")``, which records ``block_type: mamba1``), seed, seeded initial
  state_dict, perturbed state_dict, input ids, logits, loss and the gradients of the loss.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

import torch

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "goldens_mamba")


def _versions() -> dict[str, str]:
    names = ("mblm", "mambapy", "MEGABYTE-pytorch", "torch", "pydantic")
    return {n: importlib.metadata.version(n) for n in names}


def _perturbed(state_dict: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Adds N(0, 0.05^2) noise to every floating tensor (so every parameter matters)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state_dict.items():
        t = t.detach().clone()
        if t.is_floating_point():
            t += 0.05 * torch.randn(t.shape, generator=gen, dtype=t.dtype)
        out[name] = t
    return out


def _clone(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state_dict.items()}


MAMBAPY_CASES = {
    # name: (MambaConfig kwargs, batch, length, seed)
    "small": (dict(d_model=16, n_layers=2, d_state=4, d_conv=3, expand_factor=2), 2, 11, 0),
    "wide_state": (dict(d_model=24, n_layers=1, d_state=8, d_conv=4, expand_factor=1), 3, 9, 1),
    "conv1_rank2": (dict(d_model=18, n_layers=1, d_state=2, d_conv=1, expand_factor=3), 1, 17, 2),
}


def make_mambapy(name: str) -> dict:
    from mambapy.mamba import Mamba, MambaConfig

    kwargs, batch, length, seed = MAMBAPY_CASES[name]
    torch.manual_seed(seed)
    model = Mamba(MambaConfig(**kwargs))
    init_sd = _clone(model.state_dict())
    sd = _perturbed(init_sd, seed + 100)
    model.load_state_dict(sd)

    gen = torch.Generator().manual_seed(seed + 200)
    x = torch.randn(batch, length, kwargs["d_model"], generator=gen).requires_grad_(True)
    y = model(x)
    upstream = torch.randn(y.shape, generator=gen)
    (y * upstream).sum().backward()
    return {
        "versions": _versions(),
        "config": kwargs,
        "seed": seed,
        "init_state_dict": init_sd,
        "state_dict": sd,
        "input": x.detach(),
        "output": y.detach(),
        "upstream": upstream,
        "input_grad": x.grad.detach(),
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
    }


MBLM_CASES = {
    # 1 stage: a single Mamba stage over bytes
    "1stage": dict(
        config=dict(
            num_tokens=257,
            pad_token_id=256,
            hidden_dims=[16],
            num_layers=[2],
            seq_lens=[40],
            train_checkpoint_chunks=None,
            block=dict(d_state=8, d_conv=4, expand=2, headdim=8, pos_emb_type=None),
        ),
        batch=1,
        length=23,
        seed=3,
    ),
    # 2 stages: Mamba global (fixed pos emb), Transformer local
    "2stage_mamba_transformer": dict(
        config=dict(
            num_tokens=48,
            pad_token_id=47,
            hidden_dims=[24, 16],
            num_layers=[1, 1],
            seq_lens=[8, 4],
            train_checkpoint_chunks=None,
            block=[
                dict(d_state=4, d_conv=3, expand=2, headdim=8, pos_emb_type="fixed"),
                dict(
                    attn_head_dims=8,
                    attn_num_heads=2,
                    attn_use_rot_embs=True,
                    block_type="transformer",
                    pos_emb_type="fixed",
                ),
            ],
        ),
        batch=2,
        length=29,
        seed=4,
    ),
    # 3 stages: Mamba global (other d_state/d_conv/expand, no pos emb), Transformer, Mamba local
    "3stage_mamba_transformer_mamba": dict(
        config=dict(
            num_tokens=40,
            pad_token_id=0,
            hidden_dims=[24, 16, 8],
            num_layers=[2, 1, 1],
            seq_lens=[6, 3, 2],
            train_checkpoint_chunks=None,
            block=[
                dict(d_state=16, d_conv=2, expand=1, headdim=8, pos_emb_type=None),
                dict(
                    attn_head_dims=8,
                    attn_num_heads=2,
                    attn_use_rot_embs=False,
                    block_type="transformer",
                    pos_emb_type="rope",
                ),
                dict(d_state=2, d_conv=4, expand=3, headdim=8, pos_emb_type=None),
            ],
        ),
        batch=2,
        length=31,
        seed=5,
    ),
}


def make_mblm(name: str) -> dict:
    from mblm import MBLM, MambaBlock, MBLMModelConfig, MBLMReturnType, TransformerBlock

    case = MBLM_CASES[name]
    raw = case["config"]
    blocks = raw["block"] if isinstance(raw["block"], list) else [raw["block"]]
    built = [
        TransformerBlock(**b) if b.get("block_type") == "transformer" else MambaBlock(**b)
        for b in blocks
    ]
    cfg = MBLMModelConfig(**{**raw, "block": built if isinstance(raw["block"], list) else built[0]})
    assert all(b.block_type == "mamba1" for b in built if isinstance(b, MambaBlock)), (
        "expected the original to fall back to mambapy (mamba_ssm must not be importable)"
    )

    torch.manual_seed(case["seed"])
    model = MBLM(cfg)
    init_sd = _clone(model.state_dict())
    sd = _perturbed(init_sd, case["seed"] + 100)
    model.load_state_dict(sd)

    gen = torch.Generator().manual_seed(case["seed"] + 200)
    ids = torch.randint(0, cfg.num_tokens, (case["batch"], case["length"]), generator=gen)
    loss, logits = model(input_ids=ids, return_type=MBLMReturnType.LOSS_LOGITS)
    loss.backward()
    return {
        "versions": _versions(),
        "config": cfg.model_dump(mode="json"),
        "seed": case["seed"],
        "init_state_dict": init_sd,
        "state_dict": sd,
        "input_ids": ids,
        "logits": logits.detach(),
        "loss": loss.detach(),
        "grads": {
            n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
        },
    }


def main() -> None:
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        pass
    else:
        sys.exit("mamba_ssm is importable: the original would build Mamba2; run without it")
    os.makedirs(OUT_DIR, exist_ok=True)
    total = 0
    for name in MAMBAPY_CASES:
        path = os.path.join(OUT_DIR, f"mambapy_{name}.pt")
        torch.save(make_mambapy(name), path)
        total += os.path.getsize(path)
    for name in MBLM_CASES:
        path = os.path.join(OUT_DIR, f"mblm_{name}.pt")
        torch.save(make_mblm(name), path)
        total += os.path.getsize(path)
    print(f"wrote goldens to {OUT_DIR} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
