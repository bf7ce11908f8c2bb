"""Mamba stage block: the pydantic config of a Mamba stage and the checkpoint-layout helpers.

The original mblm builds mamba_ssm's Mamba2 when mamba_ssm is importable and mambapy's Mamba1
otherwise, so which parameter tree a stage has depends on the environment. mblm-cpp builds both
natively on every device and lets the config choose: ``block_type="mamba2"`` (the default, the
mamba_ssm tree with a final norm) or ``block_type="mamba1"`` (the mambapy tree, no final norm).
The original records the variant it built in every config it saves, so a saved config selects the
variant its checkpoint holds.

``detect_mamba_variant`` tells which of the two layouts a state_dict holds under a prefix,
``check_mamba_variant`` raises a clear error when a checkpoint does not match its config, and
``check_mamba_stages`` does that for every Mamba stage of an MBLM state_dict (call it before
``load_state_dict``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from mblm.model.block import StageBlock
from mblm.model.mamba_shim import Mamba1, Mamba1Config, Mamba2Mixer

MAMBA_VARIANTS = ("mamba1", "mamba2")

MambaVariant = Literal["mamba1", "mamba2"]


class MambaBlock(StageBlock):
    """Config of a Mamba stage inside MBLM (about ``3 * expand * d_model**2`` parameters a layer).

    Parameters:
        d_state: SSM state size N.
        d_conv: width of the causal depthwise convolution.
        expand: expansion factor of the inner width (``expand * d_model``).
        headdim: head width P of Mamba2 (must divide ``expand * d_model``); unused by Mamba1.
        dropout: dropout before the final norm of Mamba2 (training mode only); unused by Mamba1.
        block_type: ``"mamba2"`` (mamba_ssm parameter tree, default) or ``"mamba1"`` (mambapy
            parameter tree).
    """

    d_state: int
    d_conv: int
    expand: int
    headdim: int
    dropout: float = 0.0

    block_type: str = Field(default="mamba2")

    @model_validator(mode="after")
    def validate_block_type(self) -> MambaBlock:
        if "mamba" not in self.block_type:
            raise ValueError("This model is a mamba block")
        if self.block_type not in MAMBA_VARIANTS:
            raise ValueError(
                f"Unknown Mamba variant block_type={self.block_type!r}: expected 'mamba2' "
                "(mamba_ssm parameter tree) or 'mamba1' (mambapy parameter tree)"
            )
        return self

    def to_model(self, model_dim: int, num_layers: int):
        model = self._build(model_dim, num_layers)
        # A checkpoint of the other layout fails on load with a message naming the fix (strict
        # loading alone would only list missing/unexpected keys).
        model._register_load_state_dict_pre_hook(_LayoutCheck(self.block_type))
        return model

    def _build(self, model_dim: int, num_layers: int):
        if self.block_type == "mamba1":
            return Mamba1(
                Mamba1Config(
                    d_model=model_dim,
                    n_layers=num_layers,
                    d_state=self.d_state,
                    d_conv=self.d_conv,
                    expand_factor=self.expand,
                )
            )
        return Mamba2Mixer(
            d_model=model_dim,
            n_layers=num_layers,
            d_state=self.d_state,
            d_conv=self.d_conv,
            headdim=self.headdim,
            expand=self.expand,
            dropout=self.dropout,
        )


# Keys that only one of the two layouts has (relative to a stage prefix).
_MAMBA1_MARKERS = (".mixer.x_proj.weight", ".mixer.dt_proj.weight", ".mixer.dt_proj.bias")
_MAMBA2_MARKERS = (".mixer.dt_bias", ".mixer.norm.weight")
_MAMBA2_FINAL = "norm_f.weight"


def detect_mamba_variant(state_dict: Mapping[str, Any], prefix: str = "") -> MambaVariant | None:
    """Which Mamba layout a state_dict holds under ``prefix`` (e.g. ``"stage_models.0."``).

    Returns ``"mamba1"`` for mambapy's tree (``layers.<l>.mixer.x_proj`` / ``dt_proj``, no final
    norm), ``"mamba2"`` for mamba_ssm's tree (``layers.<l>.mixer.dt_bias``, ``mixer.norm``,
    ``norm_f``), and None when there are no Mamba layer keys under the prefix. Raises ValueError
    when keys of both layouts are present.
    """
    layers = prefix + "layers."
    has1 = has2 = False
    for key in state_dict:
        if key == prefix + _MAMBA2_FINAL:
            has2 = True
        if not key.startswith(layers):
            continue
        rest = key[len(layers) :]
        # rest is "<l>.mixer.<name>" or "<l>.norm.weight"
        tail = rest[rest.find(".") :] if "." in rest else ""
        has1 = has1 or tail in _MAMBA1_MARKERS
        has2 = has2 or tail in _MAMBA2_MARKERS
    if has1 and has2:
        raise ValueError(
            f"state_dict holds keys of both Mamba layouts under prefix {prefix!r} "
            "(mambapy 'mixer.x_proj'/'mixer.dt_proj' and mamba_ssm 'mixer.dt_bias'/'norm_f')"
        )
    if has1:
        return "mamba1"
    if has2:
        return "mamba2"
    return None


def check_mamba_variant(
    state_dict: Mapping[str, Any], prefix: str, block_type: str, stage: int | None = None
) -> None:
    """Raises ValueError when the Mamba layout under ``prefix`` differs from ``block_type``.

    Does nothing when no Mamba layer keys are found under the prefix (the usual strict
    ``load_state_dict`` then reports the missing keys).
    """
    found = detect_mamba_variant(state_dict, prefix)
    if found is None or found == block_type:
        return
    where = f"stage {stage} ({prefix!r})" if stage is not None else repr(prefix)
    names = {"mamba1": "mambapy Mamba1", "mamba2": "mamba_ssm Mamba2"}
    raise ValueError(
        f"Checkpoint/config mismatch at {where}: the state_dict holds the {names[found]} layout, "
        f"but the config's MambaBlock has block_type={block_type!r}. Set block_type: {found} "
        "for this stage in the config to load this checkpoint."
    )


class _LayoutCheck:
    """load_state_dict pre-hook of a Mamba stage: refuses a state_dict of the other layout."""

    def __init__(self, block_type: str) -> None:
        self.block_type = block_type

    def __call__(self, state_dict: Mapping[str, Any], prefix: str, *_: object) -> None:
        match = re.search(r"stage_models\.(\d+)\.$", prefix)
        check_mamba_variant(state_dict, prefix, self.block_type, int(match[1]) if match else None)


def check_mamba_stages(
    stage_blocks: Sequence[StageBlock], state_dict: Mapping[str, Any], prefix: str = ""
) -> None:
    """Checks every Mamba stage of an MBLM state_dict against its block's ``block_type``.

    stage_blocks: ``MBLMModelConfig.stage_blocks()`` (global first); prefix: the MBLM's own key
    prefix (``""``, or ``"mblm."`` for an MBLMEncoder). Stage k's keys are
    ``f"{prefix}stage_models.{k}."``. Raises ValueError naming the first mismatching stage.
    """
    for k, block in enumerate(stage_blocks):
        if isinstance(block, MambaBlock):
            check_mamba_variant(state_dict, f"{prefix}stage_models.{k}.", block.block_type, k)
