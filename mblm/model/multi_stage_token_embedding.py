"""Per-stage byte embeddings of MBLM (``token_embs_rev``): one table per stage, local first.

Every stage has its own embedding table of the local width ``D_local``. A global stage k embeds
the ``S_k`` bytes of each of its patches (``S_k`` = product of the patch sizes below it),
concatenates them and projects with ``LayerNorm -> Linear -> LayerNorm`` to ``D_k``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mblm.model.utils import Rearrange

# mblm 0.4.0 stored the local byte table as a bare Embedding and every global stage's table
# and projection as one Sequential(Embedding, Rearrange, LayerNorm, Linear, LayerNorm).
_OLD_GLOBAL_KEYS = {
    "0.weight": "embedding.weight",
    "2.weight": "_post.1.weight",
    "2.bias": "_post.1.bias",
    "3.weight": "_post.2.weight",
    "3.bias": "_post.2.bias",
    "4.weight": "_post.3.weight",
    "4.bias": "_post.3.bias",
}


def _rename_old_layout_keys(
    module: nn.Module, state_dict: dict, prefix: str, *args: object, **kwargs: object
) -> None:
    """Load-state-dict pre-hook: renames this stage's keys from the mblm 0.4.0 layout
    (``token_embs_rev.0.weight``, ``token_embs_rev.<j>.{0,2,3,4}.*``) to the current one, so
    checkpoints of either layout load."""
    renames = {"weight": "embedding.weight"} if module.is_local else _OLD_GLOBAL_KEYS
    for old, new in renames.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


class _StageTokenEmbedding(nn.Module):
    """The byte embedding of one stage; accepts ids or precomputed byte embeddings.

    Local stage (``is_local``): ids [..., L] -> [..., L, local_dim]; embeddings are returned
    unchanged. Global stage: ids [..., R] (R = patch_size) are embedded to [..., R, local_dim]
    (or such embeddings are given), flattened and projected to [..., model_dim].
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        pad_token_id: int,
        local_dim: int,
        is_local: bool,
        patch_size: int = 1,
        model_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.is_local = is_local
        self.local_dim = int(local_dim)
        self.patch_size = int(patch_size)
        self.model_dim = None if model_dim is None else int(model_dim)
        self.embedding = nn.Embedding(int(vocab_size), self.local_dim, padding_idx=pad_token_id)
        self._register_load_state_dict_pre_hook(_rename_old_layout_keys, with_module=True)
        if self.is_local:
            self._post: nn.Module = nn.Identity()
        else:
            if self.model_dim is None:
                raise ValueError("model_dim must be provided for global stages.")
            flat_dim = self.patch_size * self.local_dim
            self._post = nn.Sequential(
                Rearrange("... r d -> ... (r d)"),
                nn.LayerNorm(flat_dim),
                nn.Linear(flat_dim, self.model_dim),
                nn.LayerNorm(self.model_dim),
            )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if input_ids is not None:
            x = self.embedding(input_ids)
        else:
            x = inputs_embeds
            self._check_embeds(x)
        return x if self.is_local else self._post(x)

    def _check_embeds(self, x: object) -> None:
        if not isinstance(x, torch.Tensor):
            raise RuntimeError("inputs_embeds must be a torch.Tensor.")
        if x.ndim < 2:
            raise RuntimeError(f"inputs_embeds must be at least 2D (got {x.ndim}D).")
        if self.is_local:
            if x.shape[-1] != self.local_dim:
                raise RuntimeError(
                    f"Local stage expects inputs_embeds[..., local_dim={self.local_dim}], "
                    f"but got last dim={x.shape[-1]}."
                )
            return
        if x.shape[-2] != self.patch_size:
            raise RuntimeError(
                f"Global stage expects inputs_embeds[..., R={self.patch_size}, d], "
                f"but got R={x.shape[-2]}."
            )
        if x.shape[-1] != self.local_dim:
            raise RuntimeError(
                f"Global stage expects last dim local_dim={self.local_dim}, but got {x.shape[-1]}."
            )


class MultiStageTokenEmbedding:
    """Builds ``token_embs_rev``: a ModuleList in reverse stage order (local first)."""

    @classmethod
    def build(
        cls,
        *,
        model_dims: Sequence[int],
        seq_lens: Sequence[int],
        vocab_size: int,
        pad_token_id: int,
    ) -> nn.ModuleList:
        """Returns ``[local, global_{n-2}, ..., global_0]``; entry j embeds stage ``n-1-j``."""
        model_dims, seq_lens = list(model_dims), list(seq_lens)
        local_dim = model_dims[-1]
        modules = nn.ModuleList(
            [
                _StageTokenEmbedding(
                    vocab_size=vocab_size,
                    pad_token_id=pad_token_id,
                    local_dim=local_dim,
                    is_local=True,
                )
            ]
        )
        patch_size = 1
        for model_dim, seq_len in zip(
            reversed(model_dims[:-1]), reversed(seq_lens[1:]), strict=False
        ):
            patch_size *= int(seq_len)
            modules.append(
                _StageTokenEmbedding(
                    vocab_size=vocab_size,
                    pad_token_id=pad_token_id,
                    local_dim=local_dim,
                    is_local=False,
                    patch_size=patch_size,
                    model_dim=int(model_dim),
                )
            )
        return modules
