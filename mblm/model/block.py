"""Stage blocks: the pydantic config of one MBLM stage, and the registry used to parse them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, TypeVar

import torch
from pydantic import BaseModel, Field


class StageBlock(ABC, BaseModel):
    """Configuration of the model at one MBLM stage.

    Subclasses give ``block_type`` a default, add their own fields and implement ``to_model``.
    Register a subclass with ``block_registry.register()`` (``mblm.model.config``) when it must be
    parsed from YAML/JSON.
    """

    block_type: str = Field(
        description="A name for the block for easy identification, which can be any string name"
    )

    pos_emb_type: Literal["fixed", "rope"] | None = Field(
        default=None,
        description="The type of positional embedding to add to tokens of the stage block",
    )

    @abstractmethod
    def to_model(self, model_dim: int, num_layers: int) -> torch.nn.Module:
        """Builds the stage model: a module mapping (N, S, model_dim) to (N, S, model_dim)."""


TStageBlock = TypeVar("TStageBlock", bound=StageBlock)


class StageBlockRegistry(set[type[StageBlock]]):
    """The stage block classes a config's ``block`` entries may be parsed into.

    A set, as in the original, but iterated in **registration order** (the original iterates in
    set order, which depends on class addresses): ``try_parse`` returns the first class that
    validates, so a transformer dict without ``block_type`` deterministically becomes the first
    registered transformer class (``TransformerBlock``, causal) rather than, by chance,
    ``TransformerEncoderBlock``.
    """

    def __init__(self, blocks: Iterable[type[StageBlock]] = ()) -> None:
        super().__init__()
        self._rank: dict[type[StageBlock], int] = {}
        for block in blocks:
            self.add(block)

    def add(self, element: type[StageBlock]) -> None:
        self._rank.setdefault(element, len(self._rank))
        super().add(element)

    def __iter__(self) -> Iterator[type[StageBlock]]:
        unranked = len(self._rank)
        members = list(super().__iter__())
        return iter(sorted(members, key=lambda klass: self._rank.get(klass, unranked)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({{{', '.join(map(repr, self))}}})"

    def register(self) -> Callable[[type[TStageBlock]], type[TStageBlock]]:
        """Class decorator registering a stage block so configs can be parsed into it.

        Usage::

            @block_registry.register()
            class MyBlock(StageBlock): ...
        """

        def decorator(stage_block_klass: type[TStageBlock]) -> type[TStageBlock]:
            self.add(stage_block_klass)
            return stage_block_klass

        return decorator

    def try_parse(
        self,
        data: Any,
        parse_func: Callable[[type[StageBlock], Any], StageBlock],
    ) -> StageBlock:
        """Returns ``parse_func(klass, data)`` of the first registered class that accepts it."""
        for klass in self:
            try:
                return parse_func(klass, data)
            except Exception:
                pass
        raise ValueError(f"Could not parse data to any of {self}")
