"""Pydantic configs of MBLM and MBLMEncoder, the return types and the stage block registry."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from enum import Enum, auto
from typing import Any

from pydantic import (
    BaseModel,
    SerializationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from mblm.model.block import StageBlock, StageBlockRegistry
from mblm.model.mamba import MambaBlock
from mblm.model.transformer import TransformerBlock, TransformerEncoderBlock

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


block_registry = StageBlockRegistry()
# Registration order is the parse order (see StageBlockRegistry): a transformer dict without
# block_type becomes a causal TransformerBlock.
block_registry.register()(TransformerBlock)
block_registry.register()(MambaBlock)
block_registry.register()(TransformerEncoderBlock)


class MBLMReturnType(str, Enum):
    """What ``forward`` returns. The values are the strings "1" to "4" (as in the original)."""

    LOGITS = auto()
    LOSS = auto()
    LOSS_LOGITS = auto()
    HIDDEN_STATE = auto()


class MBLMModelConfig(BaseModel):
    """Config of an MBLM model. Every sequence is ordered from the global to the local stage.

    Params:
        num_tokens: The vocabulary size
        pad_token_id: Id of the padding token
        hidden_dims: The model's hidden dimensions at each stage
        num_layers: The number of layers at each stage
        seq_lens: The sequence length at each stage
        train_checkpoint_chunks: Per non-global stage, into how many chunks its batch of patch
            sequences is split (activation checkpointing in training); null for none
        block: One stage block for every stage, or a list with one block per stage
    """

    num_tokens: int
    pad_token_id: int
    hidden_dims: Sequence[int]
    num_layers: Sequence[int]
    seq_lens: Sequence[int]
    train_checkpoint_chunks: list[int] | None

    block: StageBlock | Sequence[StageBlock]

    @field_validator("block", mode="before")
    @classmethod
    def parse_block(cls, value: Any) -> Any:
        """Parses every raw block (dict) into the first registered stage block class it fits."""
        given_as_list = isinstance(value, list)
        raw_blocks = value if given_as_list else [value]
        parsed = [
            block
            if isinstance(block, StageBlock)
            else block_registry.try_parse(block, lambda model, data: model.model_validate(data))
            for block in raw_blocks
        ]
        return parsed if given_as_list else parsed[0]

    @model_validator(mode="after")
    def validate_stages(self) -> MBLMModelConfig:
        if not len(self.hidden_dims) == len(self.num_layers) == len(self.seq_lens):
            raise ValueError("hidden_dims, num_layers and seq_lens are not of the same length")
        if isinstance(self.block, list) and len(self.block) != len(self.hidden_dims):
            raise ValueError(
                "When given as a list of blocks, must have the appropriate number of stages"
            )
        return self

    @field_serializer("block")
    def serialize_block(
        self, block: StageBlock | Sequence[StageBlock], info: SerializationInfo
    ) -> dict | list[dict]:
        """Dumps each block with its own class (keeping subclass fields and ``block_type``)."""
        if not isinstance(block, Sequence):
            return block.model_dump(mode=info.mode)
        return [b.model_dump(mode=info.mode) for b in block]

    def stage_blocks(self) -> Sequence[StageBlock]:
        """One block per stage (the single block repeated when only one is given)."""
        if isinstance(self.block, Sequence):
            return self.block
        return [self.block] * len(self.hidden_dims)


class MaskReduceStrat(StrEnum):
    """How MBLMEncoder reduces a byte-level attention mask to a coarser stage: a patch is
    attended to when ANY (or ALL) of its bytes are."""

    ANY = "any"
    ALL = "all"


class MBLMEncoderModelConfig(BaseModel):
    """Config of an MBLMEncoder (masked language model over the MBLM hierarchy)."""

    mask_token_id: int
    mblm_config: MBLMModelConfig
    mask_reduce_strat: MaskReduceStrat = MaskReduceStrat.ANY
