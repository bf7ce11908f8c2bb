"""Generates the Transformer-MBLM parity goldens from the ORIGINAL mblm package.

Run, from the repository root, with the interpreter of the separate environment that has the
original ``mblm`` 0.4.x and ``MEGABYTE-pytorch`` installed (never the mblm-cpp environment,
both packages are called ``mblm``):

    /tmp/orig_venv/bin/python tests/parity/make_goldens.py

It rewrites ``tests/parity/goldens/*.pt`` (``torch.save`` of plain dicts of tensors, strings,
numbers and lists, loadable with ``weights_only=True``), one file per case, and
``tests/parity/goldens/versions.txt``. Every case is a small seeded model (tiny widths and a
small vocabulary keep all goldens well under 5 MB) and stores:

- ``config``: ``model_dump(mode="json")`` of the MBLMModelConfig / MBLMEncoderModelConfig;
- ``seed`` and ``init_state_dict``: the state_dict of ``torch.manual_seed(seed); MBLM(config)``;
- ``state_dict``: the weights the outputs were computed with (the initial ones plus small noise,
  so that every parameter, norm gains and pad rows included, affects the result);
- ``train``: whether the forward passes ran in training mode (checkpoint chunks do then);
- the inputs (``input_ids``, optional ``loss_mask``; encoder: ``attention_mask``, ``labels``);
- ``logits``, ``loss``, ``hidden`` (return types LOGITS, LOSS, HIDDEN_STATE), ``grads`` (the
  gradient of the LOSS w.r.t. every parameter that gets one);
- ``embeds`` / ``embeds_hidden`` (some cases): a random single nested ``inputs_embeds`` tensor
  (B, P0', P_1, ..., P_{n-1}, D_local) and the HIDDEN_STATE it gives;
- MBLM only: ``generate``: a list of ``(kwargs, seed, output)`` of ``generate()`` runs (greedy
  on a short prime, from an empty prime, and one sampled run with a fixed seed);
- ``versions``: the original's package versions.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "goldens")

import mblm  # noqa: E402

if "site-packages" not in (mblm.__file__ or ""):
    sys.exit(
        f"make_goldens.py must run with the ORIGINAL mblm (site-packages), got {mblm.__file__}; "
        "use /tmp/orig_venv/bin/python"
    )

from mblm import MBLM, MBLMEncoder, MBLMEncoderModelConfig, MBLMModelConfig, MBLMReturnType  # noqa: E402


def _versions() -> dict[str, str]:
    names = ("mblm", "MEGABYTE-pytorch", "torch", "pydantic", "einops")
    return {n: importlib.metadata.version(n) for n in names}


def _tblock(dh: int, heads: int, rot: bool, pos: str | None, **kw: Any) -> dict[str, Any]:
    return {
        "block_type": "transformer",
        "attn_head_dims": dh,
        "attn_num_heads": heads,
        "attn_use_rot_embs": rot,
        "pos_emb_type": pos,
        **kw,
    }


def _eblock(dh: int, heads: int, rot: bool, pos: str | None, **kw: Any) -> dict[str, Any]:
    return {**_tblock(dh, heads, rot, pos, **kw), "block_type": "transformerEncoder"}


def _cfg(
    vocab: int,
    pad: int,
    dims: list[int],
    lens: list[int],
    layers: list[int],
    block: Any,
    chunks: list[int] | None = None,
) -> dict[str, Any]:
    return {
        "num_tokens": vocab,
        "pad_token_id": pad,
        "hidden_dims": dims,
        "seq_lens": lens,
        "num_layers": layers,
        "train_checkpoint_chunks": chunks,
        "block": block,
    }


# name: dict(config, seed, ids shape / nested flag, options)
MBLM_CASES: dict[str, dict[str, Any]] = {
    "s1_fixed_rot": dict(
        cfg=_cfg(24, 0, [16], [12], [2], _tblock(8, 2, True, "fixed")),
        seed=1,
        batch=2,
        length=7,
    ),
    "s1_rope_norot_flash": dict(
        cfg=_cfg(20, 19, [16], [8], [1], _tblock(4, 3, False, "rope", use_flash_attn=True)),
        seed=2,
        batch=1,
        length=8,
        loss_mask="float",
    ),
    "s2_fixed_rot_odd_len": dict(
        cfg=_cfg(33, 32, [32, 16], [6, 4], [2, 1], _tblock(8, 2, True, "fixed")),
        seed=3,
        batch=2,
        length=13,
        loss_mask="float",
    ),
    "s2_none_rope_inner_ne_d": dict(
        cfg=_cfg(
            26,
            0,
            [24, 16],
            [5, 3],
            [1, 2],
            [
                _tblock(4, 3, False, None, ff_multiplier=3),
                _tblock(6, 2, True, "rope", ff_multiplier=1, use_flash_attn=True),
            ],
        ),
        seed=4,
        batch=3,
        length=11,
        loss_mask="long",
    ),
    "s2_full_length": dict(
        cfg=_cfg(18, 17, [16, 8], [4, 3], [1, 1], _tblock(4, 2, True, "fixed")),
        seed=5,
        batch=2,
        length=12,
    ),
    "s2_rope_global_longer_than_context": dict(
        cfg=_cfg(
            22,
            0,
            [16, 8],
            [3, 2],
            [1, 1],
            [_tblock(4, 2, True, "rope"), _tblock(4, 2, False, None)],
        ),
        seed=6,
        batch=1,
        length=9,
    ),
    "s2_nested_input": dict(
        cfg=_cfg(21, 20, [16, 12], [5, 4], [1, 1], _tblock(6, 2, True, "fixed")),
        seed=7,
        batch=2,
        nested=(3, 4),
    ),
    "s2_chunks_eval": dict(
        cfg=_cfg(19, 0, [16, 8], [4, 3], [1, 1], _tblock(4, 2, True, "fixed"), chunks=[2]),
        seed=8,
        batch=3,
        length=10,
    ),
    "s3_mixed": dict(
        cfg=_cfg(
            30,
            29,
            [24, 16, 8],
            [4, 3, 2],
            [1, 1, 2],
            [
                _tblock(4, 2, True, "fixed"),
                _tblock(6, 3, False, "rope", use_flash_attn=True),
                _tblock(4, 3, True, None, ff_multiplier=3),
            ],
        ),
        seed=9,
        batch=2,
        length=17,
        loss_mask="long",
        embeds=(2, 3, 2),
    ),
    "s3_chunks_train": dict(
        cfg=_cfg(
            25,
            0,
            [16, 12, 8],
            [3, 4, 2],
            [1, 1, 1],
            _tblock(4, 2, True, "fixed"),
            chunks=[2, 3],
        ),
        seed=10,
        batch=2,
        length=19,
        train=True,
        loss_mask="float",
    ),
    "s3_nested_input": dict(
        cfg=_cfg(23, 22, [16, 8, 8], [3, 2, 2], [1, 1, 1], _tblock(4, 2, False, "rope")),
        seed=11,
        batch=1,
        nested=(2, 2, 2),
    ),
    "s2_single_byte": dict(
        cfg=_cfg(17, 16, [8, 8], [4, 2], [1, 1], _tblock(4, 2, True, "fixed")),
        seed=12,
        batch=2,
        length=1,
    ),
}

ENCODER_CASES: dict[str, dict[str, Any]] = {
    "enc_s2_no_padding": dict(
        cfg=_cfg(24, 0, [16, 8], [4, 3], [1, 1], _eblock(4, 2, True, "fixed")),
        mask_token_id=23,
        seed=21,
        batch=2,
        length=12,
        embeds=(3, 3),
    ),
    "enc_s2_padding_and_mask": dict(
        cfg=_cfg(
            24,
            0,
            [16, 8],
            [4, 3],
            [1, 2],
            [_eblock(4, 2, False, "rope"), _eblock(4, 2, True, "fixed", use_flash_attn=True)],
        ),
        mask_token_id=23,
        seed=22,
        batch=2,
        length=10,
        attention_mask=True,
        loss_mask="float",
    ),
    "enc_s3_all_reduce_flash": dict(
        cfg=_cfg(
            20,
            19,
            [16, 12, 8],
            [3, 2, 2],
            [1, 1, 1],
            _eblock(4, 2, True, "fixed", use_flash_attn=True),
        ),
        mask_token_id=18,
        reduce="all",
        seed=23,
        batch=2,
        length=9,
        attention_mask=True,
    ),
}


def _perturbed(state_dict: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Adds N(0, 0.05^2) noise to every floating tensor except the rotary frequencies."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state_dict.items():
        t = t.detach().clone()
        if t.is_floating_point() and not name.endswith("inv_freq"):
            t += 0.05 * torch.randn(t.shape, generator=gen, dtype=t.dtype)
        out[name] = t
    return out


def _clone(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state_dict.items()}


def _inputs(case: dict[str, Any], vocab: int, pad: int, gen: torch.Generator) -> dict[str, Any]:
    batch = case["batch"]
    shape = (batch, *case["nested"]) if "nested" in case else (batch, case["length"])
    ids = torch.randint(0, vocab, shape, generator=gen)
    if ids.numel() > 3:
        ids.view(-1)[2] = pad  # a pad byte inside the input is ignored by the loss
    out: dict[str, Any] = {"input_ids": ids}
    kind = case.get("loss_mask")
    if kind == "float":
        out["loss_mask"] = torch.rand(shape, generator=gen) * (
            torch.rand(shape, generator=gen) > 0.3
        )
    elif kind == "long":
        out["loss_mask"] = (torch.rand(shape, generator=gen) > 0.4).long()
    return out


def _embeds(model: torch.nn.Module, case: dict[str, Any], local_dim: int, gen: torch.Generator):
    """A random single-tensor ``inputs_embeds`` and the HIDDEN_STATE the model gives for it."""
    if "embeds" not in case:
        return {}
    embeds = torch.randn(case["batch"], *case["embeds"], local_dim, generator=gen)
    with torch.no_grad():
        hidden = model(inputs_embeds=embeds, return_type=MBLMReturnType.HIDDEN_STATE)
    return {"embeds": embeds, "embeds_hidden": hidden}


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def make_mblm(name: str, case: dict[str, Any]) -> dict[str, Any]:
    cfg = MBLMModelConfig.model_validate(case["cfg"])
    torch.manual_seed(case["seed"])
    model = MBLM(cfg)
    init = _clone(model.state_dict())
    weights = _perturbed(init, case["seed"] + 1000)
    model.load_state_dict(weights, strict=True)
    train = case.get("train", False)
    model.train(train)
    gen = torch.Generator().manual_seed(case["seed"] + 2000)
    inputs = _inputs(case, cfg.num_tokens, cfg.pad_token_id, gen)
    ids, loss_mask = inputs["input_ids"], inputs.get("loss_mask")

    with torch.no_grad():
        logits = model(ids, return_type=MBLMReturnType.LOGITS)
        hidden = model(ids, return_type=MBLMReturnType.HIDDEN_STATE)
    model.zero_grad(set_to_none=True)
    loss = model(ids, return_type=MBLMReturnType.LOSS, loss_mask=loss_mask)
    loss.backward()
    grads = _grads(model)
    embeds = _embeds(model, case, cfg.hidden_dims[-1], gen)

    generate = []
    if "nested" not in case:
        model.eval()
        prime = ids[0, : min(3, ids.shape[1])].clone()
        runs = [
            (dict(prime=prime, num_tokens_to_generate=5), 0),
            (dict(prime=None, num_tokens_to_generate=3), 0),
            (dict(prime=prime, num_tokens_to_generate=4, temperature=0.7, filter_thres=0.5), 77),
        ]
        for kwargs, seed in runs:
            torch.manual_seed(seed)
            out = model.generate(**kwargs, enable_progress=False)
            generate.append((kwargs, seed, out.clone()))
    return {
        "name": name,
        "kind": "mblm",
        "config": cfg.model_dump(mode="json"),
        "seed": case["seed"],
        "init_state_dict": init,
        "state_dict": weights,
        "train": train,
        **inputs,
        "logits": logits,
        "hidden": hidden,
        "loss": loss.detach(),
        "grads": grads,
        **embeds,
        "generate": generate,
        "versions": _versions(),
    }


def make_encoder(name: str, case: dict[str, Any]) -> dict[str, Any]:
    cfg = MBLMEncoderModelConfig.model_validate(
        {
            "mask_token_id": case["mask_token_id"],
            "mblm_config": case["cfg"],
            "mask_reduce_strat": case.get("reduce", "any"),
        }
    )
    torch.manual_seed(case["seed"])
    model = MBLMEncoder(cfg)
    init = _clone(model.state_dict())
    weights = _perturbed(init, case["seed"] + 1000)
    model.load_state_dict(weights, strict=True)
    model.eval()
    gen = torch.Generator().manual_seed(case["seed"] + 2000)
    inputs = _inputs(case, cfg.mblm_config.num_tokens, cfg.mblm_config.pad_token_id, gen)
    ids = inputs["input_ids"]
    labels = torch.randint(0, cfg.mblm_config.num_tokens, ids.shape, generator=gen)
    attention_mask = None
    if case.get("attention_mask"):
        attention_mask = torch.ones_like(ids, dtype=torch.bool)
        attention_mask[:, -2:] = False
        attention_mask[0, 1] = False
    kwargs = dict(attention_mask=attention_mask, labels=labels.clone())
    with torch.no_grad():
        logits = model(input_ids=ids, return_type=MBLMReturnType.LOGITS, **kwargs)
        hidden = model(input_ids=ids, return_type=MBLMReturnType.HIDDEN_STATE, **kwargs)
    loss = model(
        input_ids=ids,
        return_type=MBLMReturnType.LOSS,
        loss_mask=inputs.get("loss_mask"),
        attention_mask=attention_mask,
        labels=labels.clone(),
    )
    loss.backward()
    grads = _grads(model)
    embeds = _embeds(model, case, cfg.mblm_config.hidden_dims[-1], gen)
    return {
        "name": name,
        "kind": "encoder",
        "config": cfg.model_dump(mode="json"),
        "seed": case["seed"],
        "init_state_dict": init,
        "state_dict": weights,
        "train": False,
        **inputs,
        "attention_mask": attention_mask,
        "labels": labels,
        "logits": logits,
        "hidden": hidden,
        "loss": loss.detach(),
        "grads": grads,
        **embeds,
        "generate": [],
        "versions": _versions(),
    }


def main() -> None:
    os.makedirs(OUT_DIR, exist_ok=True)
    for stale in os.listdir(OUT_DIR):
        if stale.endswith(".pt"):
            os.remove(os.path.join(OUT_DIR, stale))
    total = 0
    for name, case in MBLM_CASES.items():
        path = os.path.join(OUT_DIR, f"{name}.pt")
        torch.save(make_mblm(name, case), path)
        total += os.path.getsize(path)
    for name, case in ENCODER_CASES.items():
        path = os.path.join(OUT_DIR, f"{name}.pt")
        torch.save(make_encoder(name, case), path)
        total += os.path.getsize(path)
    with open(os.path.join(OUT_DIR, "versions.txt"), "w", encoding="utf8") as f:
        for pkg, version in _versions().items():
            f.write(f"{pkg}=={version}\n")
    print(
        f"wrote {len(MBLM_CASES) + len(ENCODER_CASES)} goldens, {total / 1e6:.2f} MB, to {OUT_DIR}"
    )


if __name__ == "__main__":
    main()
