"""Adding special tokens (start/end of modality, padding) to 1-D token tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812


@dataclass
class TokenizerOptions:
    """Special token ids; a None id means "do not add this token".

    Args:
        pad_token_id: padding id.
        eom_token_id: end of a modality.
        som_text_token_id: start of a text part.
        som_image_token_id: start of an image part.
    """

    pad_token_id: int
    eom_token_id: int | None
    som_text_token_id: int | None
    som_image_token_id: int | None
    dtype = torch.long  # class attribute, not a field


@dataclass
class Tokenizer:
    """Starts ``TokenizerPipeline``s with fixed options::

    pipe = Tokenizer(TokenizerOptions(10, 11, 13, 12)).pipeline
    pipe(torch.arange(5)).with_som_text().with_eom().pad_right_to(10).to_long_tensor()
    """

    options: TokenizerOptions

    def pipeline(self, tensor: torch.Tensor) -> TokenizerPipeline:
        return TokenizerPipeline(tensor=tensor, options=self.options)


@dataclass
class TokenizerPipeline:
    """Chainable edits of one 1-D tensor."""

    tensor: torch.Tensor
    options: TokenizerOptions

    def __post_init__(self) -> None:
        if self.tensor.ndim > 1:
            raise ValueError(f"Can only process 1D tensors, input is {self.tensor.ndim}D")

    def _token(self, token_id: int | None) -> torch.Tensor:
        if token_id is None:
            return torch.empty(0, dtype=self.options.dtype)
        return torch.tensor([token_id], dtype=self.options.dtype)

    def with_eom(self) -> TokenizerPipeline:
        self.tensor = torch.cat([self.tensor, self._token(self.options.eom_token_id)])
        return self

    def with_som_text(self) -> TokenizerPipeline:
        self.tensor = torch.cat([self._token(self.options.som_text_token_id), self.tensor])
        return self

    def with_som_image(self) -> TokenizerPipeline:
        self.tensor = torch.cat([self._token(self.options.som_image_token_id), self.tensor])
        return self

    def pad_right_to(self, to_length: int, strict: bool = True) -> TokenizerPipeline:
        """Casts to long and right-pads with the padding id up to ``to_length``. A longer
        tensor raises (``strict``) or is cut to ``to_length``."""
        length = self.tensor.size(0)
        if strict and length > to_length:
            raise ValueError(
                f"Tensor at dim 0 (length {length}) larger than desired padded size {to_length}"
            )
        self.tensor = F.pad(
            self.tensor.long(), (0, to_length - length), value=self.options.pad_token_id
        )
        return self

    def to_long_tensor(self) -> torch.Tensor:
        return self.tensor.long()
