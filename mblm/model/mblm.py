"""MBLM, the Multiscale Byte Language Model, and MBLMEncoder, its bidirectional (MLM) variant.

Wording: a hierarchy has n stages; stage 0 is the most global, stage n-1 the local one.
Notation in comments: V vocabulary size, B batch, L flat input length, P_k / D_k the sequence
length / model width of stage k, P0' = ceil(L / (P_1 * ... * P_{n-1})) the number of global
patches actually used.

The module tree, parameter creation order (seeded initial weights), state_dict keys and results
are those of the original mblm 0.4.2. The data movement of the hierarchy (padding into patches,
stage-input assembly with the start token, positional and previous-stage terms, and reading the
local outputs back in byte order) runs in the fused ``mblm.ops.patch`` kernels; Transformer
stages run attention in ``mblm.ops.attention``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal, overload

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.checkpoint import checkpoint

from mblm.model.block import StageBlock
from mblm.model.config import (
    MaskReduceStrat,
    MBLMEncoderModelConfig,
    MBLMModelConfig,
    MBLMReturnType,
)
from mblm.model.mamba1 import Mamba as Mamba1Stage
from mblm.model.mamba2 import Mamba2Mixer
from mblm.model.multi_stage_token_embedding import MultiStageTokenEmbedding
from mblm.model.transformer import TransformerDecoder
from mblm.model.utils import Rearrange, RoPE
from mblm.ops.loss import cross_entropy, cross_entropy_kernel_ok
from mblm.ops.patch import patch_pad, patch_unpatch, stage_input
from mblm.utils.stream import ByteStreamer

if TYPE_CHECKING:
    from mblm.model.scoring import ScoreResult

__all__ = ["MBLM", "MBLMEncoder", "MBLMInputError"]


class MBLMInputError(ValueError, AssertionError):
    """Invalid model input. A ValueError, and also an AssertionError because the original
    reported these conditions with ``assert`` (code catching either keeps working)."""


# ---------------------------------------------------------------------------------------------
# Construction shared by MBLM and MBLMEncoder
# ---------------------------------------------------------------------------------------------


def _positional_embeddings(
    model_dims: Iterable[int], seq_lens: Iterable[int], blocks: Iterable[StageBlock]
) -> nn.ModuleList:
    """One module per stage: Identity, a learned ``Embedding(P_k, D_k)`` or a ``RoPE``."""
    modules = nn.ModuleList()
    for model_dim, seq_len, block in zip(model_dims, seq_lens, blocks, strict=False):
        if not block.pos_emb_type:
            modules.append(nn.Identity())
        elif block.pos_emb_type == "fixed":
            modules.append(nn.Embedding(seq_len, model_dim))
        elif block.pos_emb_type == "rope":
            # the cache grows when a longer sequence arrives
            modules.append(RoPE(model_dim, max_seq_len=seq_len))
    return modules


def _stage_models(
    model_dims: Sequence[int],
    seq_lens: Sequence[int],
    num_stage_layers: Iterable[int],
    blocks: Iterable[StageBlock],
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Stage models and the projections of each stage's outputs onto the next stage's patches:
    ``Linear(D_k, D_{k+1} * P_{k+1})`` split into P_{k+1} rows (Identity for the last stage)."""
    stage_models = nn.ModuleList([])
    to_next_stage_proj = nn.ModuleList([])
    for block, model_dim, num_layers, next_model_dim, next_seq_len in zip(
        blocks,
        model_dims,
        num_stage_layers,
        (*model_dims[1:], None),
        (*seq_lens[1:], None),
        strict=False,
    ):
        stage_models.append(block.to_model(model_dim=model_dim, num_layers=num_layers))
        proj: nn.Module = nn.Identity()
        if next_model_dim and next_seq_len:
            proj = nn.Sequential(
                Rearrange("b ... d -> b (...) d"),
                nn.Linear(model_dim, next_model_dim * next_seq_len),
                Rearrange("b m (n d) -> (b m) n d", n=next_seq_len),
            )
        to_next_stage_proj.append(proj)
    return stage_models, to_next_stage_proj


# Stage models whose forward has no side effects, so that recomputing it in backward is safe.
_OWN_STAGES = (TransformerDecoder, Mamba1Stage, Mamba2Mixer)


def _checkpoint_chunks(cfg: MBLMModelConfig, num_stages: int) -> list[int | None]:
    chunks = cfg.train_checkpoint_chunks
    if chunks:
        if len(chunks) != num_stages - 1:
            raise MBLMInputError(
                f"train_checkpoint_chunks must have one entry per non-global stage "
                f"({num_stages - 1}), got {len(chunks)}: {chunks}"
            )
        return [None, *chunks]
    return [None] * num_stages


def _check_stage_lengths(cfg: MBLMModelConfig) -> None:
    if not len(cfg.hidden_dims) == len(cfg.num_layers) == len(cfg.seq_lens):
        raise MBLMInputError("hidden_dims, num_layers and seq_lens are not of the same length")


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


class _HierarchyMixin(nn.Module):
    """Input checks and per-stage embedding shared by MBLM and MBLMEncoder."""

    num_stages: int
    seq_lens: Sequence[int]
    pad_token_id: int
    num_tokens: int
    pos_embs: nn.ModuleList
    token_embs_rev: nn.ModuleList
    _warned_single_tensor_embeds: bool

    def _init_hierarchy(self, cfg: MBLMModelConfig, *, with_start_tokens: bool) -> None:
        """The attributes and modules of the hierarchy, created in the original's order (seeded
        initial weights depend on it): start tokens (MBLM only), positional embeddings, token
        embeddings, stage models with their next-stage projections, the logits head."""
        _check_stage_lengths(cfg)
        self.num_stages = len(cfg.hidden_dims)
        self.seq_lens = cfg.seq_lens
        self.pad_token_id = cfg.pad_token_id
        self.num_tokens = cfg.num_tokens
        self.checkpoint_chunks: list[int | None] = _checkpoint_chunks(cfg, self.num_stages)
        if with_start_tokens:
            self.start_tokens = nn.ParameterList(
                [nn.Parameter(torch.randn(model_dim)) for model_dim in cfg.hidden_dims]
            )
        stage_blocks = cfg.stage_blocks()
        self.pos_embs = self._init_positional_embeddings(
            cfg.hidden_dims, cfg.seq_lens, stage_blocks
        )
        self.token_embs_rev = MultiStageTokenEmbedding.build(
            model_dims=cfg.hidden_dims,
            seq_lens=cfg.seq_lens,
            vocab_size=cfg.num_tokens,
            pad_token_id=cfg.pad_token_id,
        )
        self.stage_models, self.to_next_stage_proj = self._init_models_at_stages(
            cfg.hidden_dims, cfg.seq_lens, cfg.num_layers, stage_blocks
        )
        self.to_logits = nn.Linear(cfg.hidden_dims[-1], cfg.num_tokens)
        self._warned_single_tensor_embeds = False

    @classmethod
    def _init_positional_embeddings(
        cls,
        model_dims: Iterable[int],
        seq_lens: Iterable[int],
        blocks: Iterable[StageBlock],
    ) -> nn.ModuleList:
        """Creates the positional embedding of each stage."""
        return _positional_embeddings(model_dims, seq_lens, blocks)

    @classmethod
    def _init_models_at_stages(
        cls,
        model_dims: Sequence[int],
        seq_lens: Sequence[int],
        num_stage_layers: Iterable[int],
        blocks: Iterable[StageBlock],
    ) -> tuple[nn.ModuleList, nn.ModuleList]:
        """Creates the stage models and the next-stage projections."""
        return _stage_models(model_dims, seq_lens, num_stage_layers, blocks)

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        dtype = input_ids.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise MBLMInputError(
                f"input_ids must be an integer tensor (torch.long) of byte/token ids, got dtype {dtype}"
            )
        if input_ids.ndim not in {2, self.num_stages + 1}:
            raise MBLMInputError(
                f"input_ids must have 2 dims (B, L) or {self.num_stages + 1} dims (B, P0', "
                f"{', '.join(f'P{k}' for k in range(1, self.num_stages))}) for this "
                f"{self.num_stages}-stage model, got shape {tuple(input_ids.shape)}"
            )
        if input_ids.ndim > 2 and tuple(input_ids.shape[2:]) != tuple(self.seq_lens[1:]):
            raise MBLMInputError(
                f"nested input_ids must have the inner patch sizes seq_lens[1:] = "
                f"{tuple(self.seq_lens[1:])}, got shape {tuple(input_ids.shape)}"
            )
        if input_ids.numel() and not _is_compiling():
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()
            if lo < 0 or hi >= self.num_tokens:
                raise MBLMInputError(
                    f"input_ids must lie in [0, num_tokens) = [0, {self.num_tokens}), got values "
                    f"in [{lo}, {hi}]"
                )

    def _check_global_length(self, num_patches: int) -> None:
        if isinstance(self.pos_embs[0], nn.Embedding) and num_patches > self.seq_lens[0]:
            raise MBLMInputError(
                "Because you are using a fixed global patch embedding, "
                f"the input sequence length ({num_patches}) "
                f"must be less than the first tuple element of seq_lens ({self.seq_lens[0]})"
            )

    def _nest(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, P0', P_1, ..., P_{n-1}), right-padded with ``pad_token_id``."""
        return patch_pad(input_ids, list(self.seq_lens[1:]), self.pad_token_id)

    def _check_embeds(
        self, inputs_embeds: torch.Tensor | Sequence[torch.Tensor], final_hidden_dim: int
    ) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
        """Validates ``inputs_embeds``; returns (per-stage list local first, None) or
        (None, single nested tensor)."""
        if isinstance(inputs_embeds, (list, tuple)):
            if len(inputs_embeds) != self.num_stages:
                raise MBLMInputError(
                    f"`inputs_embeds` sequence must have {self.num_stages} tensors (one per stage), "
                    f"got {len(inputs_embeds)}"
                )
            device = inputs_embeds[0].device
            for k, embeds in enumerate(inputs_embeds):
                if not isinstance(embeds, torch.Tensor):
                    raise MBLMInputError(f"`inputs_embeds[{k}]` must be a torch.Tensor")
                if embeds.device != device:
                    raise MBLMInputError(
                        "All tensors in `inputs_embeds` must be on the same device"
                    )
            return list(inputs_embeds), None
        single = inputs_embeds
        if not self._warned_single_tensor_embeds and self.num_stages > 1:
            warnings.warn(
                "Passing a single tensor to `inputs_embeds` bypasses per-stage embedding tables "
                "and cannot fully reproduce the results of passing `input_ids`. "
                "For exact consistency, pass a sequence of tensors (one per stage) instead.",
                UserWarning,
                stacklevel=3,
            )
            self._warned_single_tensor_embeds = True
        if single.ndim != self.num_stages + 2:
            raise MBLMInputError(
                f"`inputs_embeds` must be nested with {self.num_stages} hierarchy dims "
                f"(B + P1'..Pn + D), got shape {tuple(single.shape)}"
            )
        if single.shape[-1] != final_hidden_dim:
            raise MBLMInputError(
                f"Last dim of `inputs_embeds` must equal final hidden dim ({final_hidden_dim}), "
                f"got {single.shape[-1]}"
            )
        for k, expected in enumerate(self.seq_lens[1:], start=2):
            if single.shape[k] != expected:
                raise MBLMInputError(
                    f"`inputs_embeds` inner dim at stage {k - 1} must be {expected}, got "
                    f"{single.shape[k]}"
                )
        if isinstance(self.pos_embs[0], nn.Embedding) and single.shape[1] > self.seq_lens[0]:
            raise MBLMInputError(
                f"With fixed global positional embedding, P1'={single.shape[1]} must "
                f"be <= P1={self.seq_lens[0]}"
            )
        return None, single

    def _embed_stages(
        self,
        ids: torch.Tensor | None,
        embeds_list: list[torch.Tensor] | None,
        embeds_single: torch.Tensor | None,
        skip_local: bool = False,
    ) -> list[torch.Tensor]:
        """Byte embeddings of every stage (global first): stage k gets (B, P0', P_1, ..., P_k,
        D_k); RoPE stages are rotated here, learned ("fixed") positions are added later. With
        ``skip_local`` the local stage's entry is left empty (``_run_stages`` embeds it)."""
        n = self.num_stages
        embs: list[torch.Tensor] = [torch.empty(0)] * n
        for k in range(n - 1, -1, -1):
            if skip_local and k == n - 1:
                continue
            if embeds_list is not None:
                emb = embeds_list[n - 1 - k]
            elif ids is not None:
                # stage k sees every patch of S_k = P_{k+1} * ... * P_{n-1} bytes as one token
                patch = math.prod(self.seq_lens[k + 1 :])
                stage_ids = ids if k == n - 1 else ids.reshape(*ids.shape[: k + 2], patch)
                emb = self._stage_embedding(k, stage_ids, None)
            else:
                assert embeds_single is not None
                stage_embeds = embeds_single
                if k < n - 1:
                    # (B, P0', P_1, ..., P_k, S_k, D_local): one row per byte of each patch
                    lead = embeds_single.shape[: k + 2]
                    stage_embeds = embeds_single.reshape(*lead, -1, embeds_single.shape[-1])
                emb = self._stage_embedding(k, None, stage_embeds)
            embs[k] = self._rotate(k, emb)
        return embs

    def _rotate(self, k: int, emb: torch.Tensor) -> torch.Tensor:
        """Stage k's embeddings rotated by its RoPE, if it has one."""
        pos_emb = self.pos_embs[k]
        if not isinstance(pos_emb, RoPE):
            return emb
        # RoPE takes [b, s, heads, head_dim]: one "head" of the full width
        s, d = emb.shape[-2], emb.shape[-1]
        return pos_emb(emb.reshape(-1, s, 1, d)).view(emb.shape)

    def _stage_embedding(
        self, k: int, ids: torch.Tensor | None, embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """Stage k's byte embedding. A global stage's (LayerNorm over the patch's bytes, Linear,
        LayerNorm) keeps activations of the width of its whole patch per byte: when training
        with checkpoint chunks (the memory-saving mode) it is recomputed in backward instead."""
        module = self.token_embs_rev[self.num_stages - 1 - k]
        if k < self.num_stages - 1 and self._saving_memory():
            return checkpoint(module, ids, embeds, use_reentrant=False)
        return module(ids, embeds)

    def _saving_memory(self) -> bool:
        """Training with checkpoint chunks: activations are recomputed in backward wherever
        that is cheap, not only in the chunked stages."""
        return (
            self.training
            and torch.is_grad_enabled()
            and any(c is not None for c in self.checkpoint_chunks)
        )

    def _fixed_positions(self, k: int, length: int) -> torch.Tensor | None:
        """The learned positional embeddings of positions 0..length-1 of stage k, if any."""
        pos_emb = self.pos_embs[k]
        return pos_emb.weight[:length] if isinstance(pos_emb, nn.Embedding) else None


def _next_byte_targets(ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """The byte each local output predicts, laid out as the outputs (N, 1 + P): output i >= 1 of
    a local sequence follows byte i - 1 of its patch and predicts the byte after it; output 0
    (the start) predicts byte 0 in the first sequence of a batch row and nothing (the pad id,
    ignored by the loss) elsewhere. ``ids``: nested (B, ..., P)."""
    batch, patch = ids.shape[0], ids.shape[-1]
    flat = ids.reshape(batch, -1)
    pad = torch.full_like(flat[:, :1], pad_token_id)
    after = torch.cat((flat[:, 1:], pad), dim=1).view(-1, patch)
    start = torch.full_like(flat.view(batch, -1, patch)[..., :1], pad_token_id)
    start[:, 0, 0] = flat[:, 0]
    return torch.cat((start.view(-1, 1), after), dim=1)


def _masked_mean_loss(ce: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the non-zero entries of ``ce * loss_mask`` (the original's loss reduction).

    Pad targets, mask-0 positions and exactly-zero CE values leave the denominator. When
    nothing is left (NaN): logs and returns a fresh zero leaf (eager, as the original); under
    torch.compile a zero connected to the graph (no data-dependent branch, no log).
    """
    if loss_mask is not None:
        ce = ce.mul_(loss_mask)
    count = (ce != 0).sum()
    if _is_compiling():
        loss = ce.sum() / count.clamp(min=1)
        return torch.where(torch.isnan(loss), torch.zeros_like(loss), loss)
    loss = ce.sum() / count
    if torch.isnan(loss):
        logging.fatal("Edge case detected, loss is nan")
        loss = torch.zeros_like(loss, requires_grad=True)
    return loss


# ---------------------------------------------------------------------------------------------
# MBLM
# ---------------------------------------------------------------------------------------------


class MBLM(_HierarchyMixin):
    """Multiscale Byte Language Model: a hierarchical causal byte-level model.

    Stage k runs over sequences of P_k patch embeddings (P0' <= P_0 for the global stage) plus a
    learned start token; the outputs of stage k, projected, are added to the inputs of stage k+1
    (shifted by one patch), and the local stage predicts the next byte. Based on
    MEGABYTE-pytorch's design; any ``StageBlock`` can implement a stage.
    """

    def __init__(self, cfg: MBLMModelConfig):
        super().__init__()
        self._init_hierarchy(cfg, with_start_tokens=True)
        # what the C++ runtime builds its decoder from (generate); not part of the state_dict
        self._config = cfg.model_copy(deep=True)

    def forward_empty(self, batch_size: int) -> torch.Tensor:
        """Logits (B, 1, V) for an empty input (the start tokens only), as the original computes
        them: each stage sees its start token plus the first row of the previous projection."""
        prev: torch.Tensor | None = None
        tokens = torch.empty(0)
        for start, stage_model, proj in zip(
            self.start_tokens, self.stage_models, self.to_next_stage_proj, strict=False
        ):
            tokens = start.repeat(batch_size, 1, 1)
            if prev is not None:
                tokens = tokens + prev[..., : tokens.shape[-2], :]
            tokens = stage_model(tokens)
            prev = proj(tokens)
        return self.to_logits(tokens)

    @overload
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | Sequence[torch.Tensor] | None = None,
        return_type: Literal[MBLMReturnType.LOSS_LOGITS] = ...,
        loss_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    @overload
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | Sequence[torch.Tensor] | None = None,
        return_type: Literal[
            MBLMReturnType.LOSS, MBLMReturnType.LOGITS, MBLMReturnType.HIDDEN_STATE
        ] = ...,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | Sequence[torch.Tensor] | None = None,
        return_type: MBLMReturnType = MBLMReturnType.LOSS,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One forward pass.

        Args:
            input_ids: integer ids (B, L), or nested (B, P0', P_1, ..., P_{n-1}). A flat input
                is right-padded with ``pad_token_id`` to whole patches.
            inputs_embeds: instead of ids (HIDDEN_STATE only): one tensor per stage, local
                first (reproduces the ids path exactly), or a single nested tensor (B, P0', P_1,
                ..., P_{n-1}, D_local) fed to every stage's projection.
            return_type: LOSS (default, 0-d), LOGITS (B, L, V), LOSS_LOGITS (loss, logits) or
                HIDDEN_STATE (the local stage's output before ``to_logits``).
            loss_mask: weights (B, L) multiplied into the per-byte cross entropy, e.g. 0 for a
                prompt and 1 for the answer; None weighs every byte 1. The loss is the mean of
                the non-zero weighted entries.

        Output position t of LOGITS is the distribution of byte t+1 given bytes 0..t. A flat
        HIDDEN_STATE has L-1 rows (position 0 dropped, as the original returns it).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")

        embeds_list: list[torch.Tensor] | None = None
        embeds_single: torch.Tensor | None = None
        ids: torch.Tensor | None = None
        flattened = False
        flat_seq_len = 0
        if input_ids is not None:
            self._check_input_ids(input_ids)
            batch_size = input_ids.shape[0]
            if input_ids.numel() == 0:
                return self.forward_empty(batch_size)
            if loss_mask is not None and loss_mask.shape != input_ids.shape:
                raise MBLMInputError(
                    f"loss_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                    f"{tuple(loss_mask.shape)}"
                )
            flattened = input_ids.ndim == 2
            flat_seq_len = input_ids.shape[-1]
            if not flattened and loss_mask is not None:
                raise MBLMInputError(
                    "loss_mask is only supported with flat input_ids (B, L); got nested "
                    f"input_ids of shape {tuple(input_ids.shape)}"
                )
            ids = self._nest(input_ids) if flattened else input_ids
            self._check_global_length(ids.shape[1])
        else:
            if return_type != MBLMReturnType.HIDDEN_STATE:
                raise ValueError(
                    f"Forward pass with return type {return_type} has not been tested and is not "
                    "supported when providing `inputs_embeds`."
                )
            assert inputs_embeds is not None
            embeds_list, embeds_single = self._check_embeds(
                inputs_embeds, self.start_tokens[-1].numel()
            )

        # Training with checkpoint chunks: the local stage embeds its bytes and projects the
        # previous stage's outputs inside its checkpointed chunks (and for the loss alone also
        # computes the per-byte losses there), so that backward keeps the ids and the previous
        # stage's outputs, not the local stage's float input, outputs or logits.
        defer_local = ids is not None and self.num_stages > 1 and self._saving_memory()
        embs = self._embed_stages(ids, embeds_list, embeds_single, skip_local=defer_local)
        if defer_local and return_type == MBLMReturnType.LOSS:
            assert ids is not None
            targets = _next_byte_targets(ids, self.pad_token_id)
            ce_rows = self._run_stages(embs, ids, targets)
            patches = ce_rows.view(ids.shape[0], -1, ce_rows.shape[-1], 1)
            ce = patch_unpatch(patches, flat_seq_len, True)[..., 0]
            return _masked_mean_loss(ce, loss_mask)
        y = self._run_stages(embs, ids if defer_local else None)
        lead = ids.shape[:-1] if defer_local else embs[-1].shape[:-2]
        local_shape = (*lead, y.shape[-2], y.shape[-1])

        if return_type == MBLMReturnType.HIDDEN_STATE:
            if flattened:
                rows = patch_unpatch(self._as_patches(y, local_shape), flat_seq_len, False)
                return rows[:, 1:]
            return y.view(local_shape)[..., 1:, :]

        assert ids is not None
        nested_logits: torch.Tensor | None = None
        if not flattened and return_type != MBLMReturnType.LOSS:
            nested_logits = self.to_logits(y.view(local_shape))
        if return_type == MBLMReturnType.LOGITS:
            if flattened:
                rows = patch_unpatch(self._as_patches(y, local_shape), flat_seq_len, False)
                return self.to_logits(rows)
            return nested_logits

        # preds[:, t] predicts byte t: the first start position's output, then the output after
        # every byte. Only the positions that are used get projected onto the vocabulary.
        patches = self._as_patches(y, local_shape)
        want_logits = return_type != MBLMReturnType.LOSS
        targets = ids.reshape(ids.shape[0], -1)[:, :flat_seq_len]
        if flattened and want_logits:
            all_logits = self.to_logits(patch_unpatch(patches, flat_seq_len + 1, True))
            preds, logits_out = all_logits[:, :flat_seq_len], all_logits[:, 1:]
        else:
            rows = patch_unpatch(patches, flat_seq_len, True)
            preds, logits_out = self.to_logits(rows), nested_logits
        loss = self._loss(preds, targets, loss_mask)
        if return_type == MBLMReturnType.LOSS:
            return loss
        assert logits_out is not None
        return loss, logits_out

    @staticmethod
    def _as_patches(y: torch.Tensor, local_shape: Sequence[int]) -> torch.Tensor:
        """Local outputs (N, 1+P, D) as (B, N/B, 1+P, D) for ``patch_unpatch``."""
        return y.view(local_shape[0], -1, y.shape[-2], y.shape[-1])

    def _run_stages(
        self,
        embs: list[torch.Tensor],
        local_ids: torch.Tensor | None = None,
        loss_targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Runs the stages global to local; returns the local outputs (N_{n-1}, 1 + P, D).
        ``local_ids``: the nested ids, when the local stage's embedding was left to this (see
        ``_run_local_from_ids``, also for ``loss_targets``)."""
        prev: torch.Tensor | None = None
        y = torch.empty(0)
        for k in range(self.num_stages):
            if k == self.num_stages - 1 and local_ids is not None:
                return self._run_local_from_ids(local_ids, y, loss_targets)
            emb = embs[k]
            seq_len, dim = emb.shape[-2], emb.shape[-1]
            # the patches of stage k-1 are the batch of stage k: (N_k, s_k, D_k)
            x = emb.reshape(-1, seq_len, dim)
            pos = self._fixed_positions(k, seq_len)
            if k == self.num_stages - 1:
                return self._run_stage(k, _assemble(x, self.start_tokens[k], pos, prev))
            # Output i feeds patch i + 1: the output after the last patch is not used. A causal
            # Transformer stage computes the others without that last input at all.
            if isinstance(self.stage_models[k], TransformerDecoder):
                x = x[:, :-1]
                pos = pos[:-1] if pos is not None else None
                prev = prev[:, :-1] if prev is not None else None
                y = self._run_stage(k, _assemble(x, self.start_tokens[k], pos, prev))
            else:
                y = self._run_stage(k, _assemble(x, self.start_tokens[k], pos, prev))[:, :-1]
            if k < self.num_stages - 2 or local_ids is None:
                prev = self.to_next_stage_proj[k](y)
        return y

    def _run_local_from_ids(
        self, ids: torch.Tensor, upper: torch.Tensor, targets: torch.Tensor | None
    ) -> torch.Tensor:
        """The local stage in its checkpoint chunks, each of which embeds its own bytes and
        projects its rows of ``upper`` (the previous stage's outputs, one per local sequence):
        backward keeps those two instead of the float stage input. Returns the local outputs
        (N, 1 + P, D), or with ``targets`` (N, 1 + P) (see ``_next_byte_targets``) the loss of
        every output, computed in the chunks too so that neither outputs nor logits are kept."""
        k = self.num_stages - 1
        rows = ids.reshape(-1, ids.shape[-1])
        upper_rows = upper.reshape(-1, upper.shape[-1])
        # to_next_stage_proj[k - 1] is (Rearrange, Linear, Rearrange): the Linear maps one
        # upper position to the P rows of a local sequence
        project = self.to_next_stage_proj[k - 1][1]
        pos = self._fixed_positions(k, rows.shape[-1])
        chunks = self.checkpoint_chunks[k]
        assert chunks is not None and upper_rows.shape[0] == rows.shape[0]

        def run(
            ids_chunk: torch.Tensor, upper_chunk: torch.Tensor, targets_chunk: torch.Tensor | None
        ) -> torch.Tensor:
            emb = self._rotate(k, self._stage_embedding(k, ids_chunk, None))
            prev = project(upper_chunk).unflatten(-1, (ids_chunk.shape[-1], -1))
            out = self.stage_models[k](_assemble(emb, self.start_tokens[k], pos, prev))
            if targets_chunk is None:
                return out
            return self._row_losses(self.to_logits(out), targets_chunk)

        def split(t: torch.Tensor | None) -> tuple:
            return torch.chunk(t, chunks, dim=0) if t is not None else (None,) * chunks

        id_chunks = torch.chunk(rows, chunks, dim=0)
        outs = [
            checkpoint(run, i, u, t, use_reentrant=False)
            for i, u, t in zip(id_chunks, split(upper_rows), split(targets), strict=False)
        ]
        return torch.cat(outs, dim=0)

    def _run_stage(self, k: int, tokens: torch.Tensor) -> torch.Tensor:
        model = self.stage_models[k]
        chunks = self.checkpoint_chunks[k]
        if chunks is None:
            # the global stage (one sequence per batch row, so no chunks) is recomputed whole:
            # its L / S_0 positions cost little to recompute but keep every layer's activations.
            # Only this package's stages: a custom block may have forward side effects (say,
            # BatchNorm's running statistics) that a recomputation would repeat.
            if k == 0 and isinstance(model, _OWN_STAGES) and self._saving_memory():
                return checkpoint(model, tokens, use_reentrant=False)
            return model(tokens)
        outs = [
            checkpoint(model, chunk, use_reentrant=False) if self.training else model(chunk)
            for chunk in torch.chunk(tokens, chunks, dim=0)
        ]
        return torch.cat(outs, dim=0)

    def _loss(
        self, preds: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None
    ) -> torch.Tensor:
        return _masked_mean_loss(self._row_losses(preds, targets), loss_mask)

    def _row_losses(self, preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross entropy of every position, (B, L); pad targets give 0."""
        batch, length, vocab = preds.shape
        rows, row_targets = preds.reshape(batch * length, vocab), targets.reshape(-1).long()
        if cross_entropy_kernel_ok(rows) and not torch.is_autocast_enabled(rows.device.type):
            ce = cross_entropy(rows, row_targets, self.pad_token_id)
        else:
            ce = F.cross_entropy(
                rows, row_targets, ignore_index=self.pad_token_id, reduction="none"
            )
        return ce.view(batch, length)

    @torch.inference_mode()
    def generate(
        self,
        prime: torch.Tensor | Sequence[torch.Tensor] | None = None,
        stream: ByteStreamer | Sequence[ByteStreamer | None] | None = None,
        num_tokens_to_generate: int | None = None,
        end_of_gen_token_id: int = -1,
        temperature: float = 1.0,
        filter_thres: float = 1.0,
        enable_progress: bool = True,
        *,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Generates bytes autoregressively after ``prime``.

        Args:
            prime: the prompt, a 1-D long tensor, or None (empty). A batch of prompts: a 2-D
                tensor (B, L) or a list of 1-D tensors of any lengths.
            stream: a ``ByteStreamer`` each new byte is written to as it is generated (for a
                batch: a list with one ``ByteStreamer`` or None per prompt).
            num_tokens_to_generate: how many bytes to generate per prompt; None (or 0) fills the
                context, ``prod(seq_lens) - len(prompt)`` bytes.
            end_of_gen_token_id: stop (that prompt) after generating this id (default -1: never).
            temperature: divides the logits before Gumbel sampling; lower is sharper. Must be
                > 0 when sampling (more than one logit kept).
            filter_thres: keep the top ``max(int((1 - filter_thres) * V), 1)`` logits; the
                default 1.0 keeps one, i.e. greedy decoding whatever the temperature.
            enable_progress: show a progress bar (only when not streaming).
            use_cache: cached decoding (default): every stage keeps its keys/values or states
                and runs once per completed patch (the local stage once per byte), the prompt is
                fed in one pass. False: the original loop, a full forward pass over the whole
                sequence for every byte. Both give the same bytes (greedy decoding is tested
                equal). On CPU the cached loop runs in the C++ runtime where it applies (float32
                /float64, Transformer/Mamba stages, no active dropout), with the same bytes and
                generator use as the Python decoder (``mblm.model.decoding.RUNTIME_DECODING``).
                As in the original, the model is not switched to eval mode: call
                ``model.eval()`` when its stages have dropout.
            generator: draw the sampling noise from this generator (on the model's device)
                instead of the global one.

        Returns ``squeeze()`` of the prompt followed by the generated bytes (1-D) for a single
        prompt; for a batch, a list of 1-D long tensors (prompt + generated bytes), one per
        prompt, each equal to that prompt's single result under greedy decoding.

        Raises MBLMInputError (before any work) for ids outside the vocabulary, an empty batch,
        temperature <= 0 while sampling, a negative filter_thres, or requests that need more
        context than a learned ("fixed") global positional embedding has.
        """
        from mblm.model.decoding import generate

        return generate(
            self,
            prime,
            stream,
            num_tokens_to_generate,
            end_of_gen_token_id,
            temperature,
            filter_thres,
            enable_progress,
            use_cache=use_cache,
            generator=generator,
        )

    def score(
        self,
        input_ids: torch.Tensor,
        *,
        chunk_size: int = 8192,
        loss_mask: torch.Tensor | None = None,
        return_logits: bool = False,
        logits_device: torch.device | str | None = None,
    ) -> ScoreResult:
        """Scores (B, L) byte ids of any length in chunks: returns a ``ScoreResult`` with the
        ``loss`` that ``forward(input_ids, return_type=LOSS, loss_mask=loss_mask)`` computes, its
        ``bits_per_byte``, the number of counted positions and, with ``return_logits``, the
        (B, L, V) logits of ``forward(..., return_type=LOGITS)`` (kept on ``logits_device``,
        default the model's).

        The input is processed ``chunk_size`` bytes (rounded down to whole global patches, at
        least one) at a time; the global stage carries its keys/values or states across chunks,
        so activation memory is that of one chunk while the result equals the one-shot forward
        pass (up to float rounding). Runs without gradients.
        """
        from mblm.model.scoring import score

        return score(
            self,
            input_ids,
            chunk_size=chunk_size,
            loss_mask=loss_mask,
            return_logits=return_logits,
            logits_device=logits_device,
        )


def _assemble(
    x: torch.Tensor,
    start: torch.Tensor,
    pos: torch.Tensor | None,
    prev: torch.Tensor | None,
) -> torch.Tensor:
    """``stage_input`` after promoting its operands to a common dtype (as the original's
    additions would, e.g. fp32 embeddings plus bf16 projections under autocast)."""
    dtype = x.dtype
    for t in (start, pos, prev):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    x, start = x.to(dtype), start.to(dtype)
    pos = pos.to(dtype) if pos is not None else None
    prev = prev.to(dtype) if prev is not None else None
    return stage_input(x, start, pos, prev)


# ---------------------------------------------------------------------------------------------
# MBLMEncoder
# ---------------------------------------------------------------------------------------------


class MBLMEncoder(_HierarchyMixin):
    """Multiscale Byte Language Model encoder: a bidirectional hierarchy for masked language
    modelling (TransformerEncoderBlock stages).

    Unlike MBLM there are no start tokens and no shift: stage k's outputs, projected, are added
    to stage k+1's inputs of the same patch, and output position t is trained to predict label
    t. An optional attention mask (False = padding) is reduced to every stage (a patch is
    attended if ANY / ALL of its bytes are, ``mask_reduce_strat``).
    """

    def __init__(self, config: MBLMEncoderModelConfig):
        super().__init__()
        self.mask_token_id = config.mask_token_id
        self.reduce_strat = config.mask_reduce_strat
        self.mblm_config = config.mblm_config
        self.final_hidden_dim = config.mblm_config.hidden_dims[-1]
        self._init_hierarchy(config.mblm_config, with_start_tokens=False)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | Sequence[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        return_type: MBLMReturnType = MBLMReturnType.HIDDEN_STATE,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One forward pass.

        Args:
            input_ids: integer ids (B, L) (masked input), or nested (B, P0', P_1, ..., P_{n-1}).
            inputs_embeds: instead of ids (HIDDEN_STATE only), as in ``MBLM.forward``.
            attention_mask: bool (shape of input_ids), False for positions (padding) that
                no position may attend to and that are left out of the loss.
            labels: target ids, shape of input_ids (needed for the loss types).
            loss_mask: weights multiplied into the per-position cross entropy.
            return_type: HIDDEN_STATE (default), LOGITS, LOSS or LOSS_LOGITS.

        The loss is the mean of the non-zero weighted cross entropies; positions whose
        ``attention_mask`` is False are ignored. ``labels`` is not modified.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        wants_loss = return_type in (MBLMReturnType.LOSS, MBLMReturnType.LOSS_LOGITS)
        if labels is None and wants_loss:
            raise ValueError("You can't compute a loss without the labels")

        embeds_list: list[torch.Tensor] | None = None
        embeds_single: torch.Tensor | None = None
        ids: torch.Tensor | None = None
        mask: torch.Tensor | None = None
        flattened = False
        flat_seq_len = 0
        if input_ids is not None:
            self._check_input_ids(input_ids)
            if input_ids.numel() == 0:
                raise ValueError("input_ids must have at least one element.")
            for name, t in (("loss_mask", loss_mask), ("attention_mask", attention_mask)):
                if t is not None and t.shape != input_ids.shape:
                    raise MBLMInputError(
                        f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got "
                        f"{tuple(t.shape)}"
                    )
            flattened = input_ids.ndim == 2
            if not flattened and loss_mask is not None:
                raise MBLMInputError(
                    "loss_mask is only supported with flat input_ids (B, L); got nested "
                    f"input_ids of shape {tuple(input_ids.shape)}"
                )
            flat_seq_len = input_ids.shape[-1]
            if flattened:
                ids = self._nest(input_ids)
                padded = ids.numel() != input_ids.numel()
                if attention_mask is not None or padded:
                    # the padding must not be attended to; without padding and without a mask
                    # every position is attended, which is the unmasked computation
                    mask = self._nest_mask(attention_mask, input_ids)
            else:
                ids, mask = input_ids, attention_mask
            self._check_global_length(ids.shape[1])
        else:
            if return_type != MBLMReturnType.HIDDEN_STATE:
                raise ValueError(
                    f"Forward pass with return type {return_type} has not been tested and is not "
                    "supported when providing `inputs_embeds`."
                )
            assert inputs_embeds is not None
            embeds_list, embeds_single = self._check_embeds(inputs_embeds, self.final_hidden_dim)

        embs = self._embed_stages(ids, embeds_list, embeds_single)
        prev: torch.Tensor | None = None
        attended = torch.empty(0)
        for k in range(self.num_stages):
            emb = embs[k]
            seq_len = emb.shape[-2]
            pos = self._fixed_positions(k, seq_len)
            if pos is not None:
                emb = emb + pos
            tokens = emb.reshape(-1, seq_len, emb.shape[-1])
            if prev is not None:
                tokens = tokens + prev
            stage_mask = self.compute_mask_at_stage(mask, k, self.reduce_strat)
            attended = self.stage_models[k](tokens, stage_mask)
            prev = self.to_next_stage_proj[k](attended)
        nested = attended.view(*embs[-1].shape[:-1], attended.shape[-1])

        if return_type == MBLMReturnType.HIDDEN_STATE:
            if flattened:
                return nested.reshape(nested.shape[0], -1, nested.shape[-1])[:, :flat_seq_len]
            return nested

        logits = self.to_logits(nested)
        flat_logits = logits.reshape(logits.shape[0], -1, logits.shape[-1])[:, :flat_seq_len]
        if return_type == MBLMReturnType.LOGITS:
            return flat_logits if flattened else logits

        assert labels is not None
        targets = labels.reshape(labels.shape[0], -1)[:, :flat_seq_len].to(flat_logits.device)
        if mask is not None:
            keep = mask.reshape(mask.shape[0], -1)[:, :flat_seq_len]
            targets = targets.masked_fill(~keep, -100)
        batch, length, vocab = flat_logits.shape
        ce = F.cross_entropy(
            flat_logits.reshape(batch * length, vocab),
            targets.reshape(-1).long(),
            ignore_index=-100,
            reduction="none",
        ).view(batch, length)
        loss = _masked_mean_loss(ce, loss_mask)
        if return_type == MBLMReturnType.LOSS:
            return loss
        return loss, (flat_logits if flattened else logits)

    def _nest_mask(
        self, attention_mask: torch.Tensor | None, input_ids: torch.Tensor
    ) -> torch.Tensor:
        """(B, L) bool mask (None = all True) -> nested like the ids, padding False."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        inner = list(self.seq_lens[1:])
        padding = -input_ids.shape[-1] % math.prod(inner)
        mask = F.pad(attention_mask.bool(), (0, padding), value=False)
        return mask.reshape(input_ids.shape[0], -1, *inner)

    @staticmethod
    def pad_and_nest(
        input_ids: torch.Tensor,
        mask: torch.Tensor | None,
        seq_length_config: Sequence[int],
        batch_size: int,
        flat_seq_len: int,
        pad_token_id: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pads (B, L) ids with ``pad_token_id`` and a (B, L) mask (None = all True) with False
        to whole patches and nests both to (B, P0', P_1, ..., P_{n-1})."""
        if input_ids.ndim != 2:
            raise MBLMInputError(f"input_ids must have 2 dims (B, L), got {tuple(input_ids.shape)}")
        if mask is None:
            mask = torch.ones_like(input_ids).to(torch.bool)
        if mask.ndim != 2:
            raise MBLMInputError(f"mask must have 2 dims (B, L), got {tuple(mask.shape)}")
        inner = list(seq_length_config[1:])
        padding = -flat_seq_len % math.prod(inner)
        ids = F.pad(input_ids, (0, padding), value=pad_token_id)
        mask = F.pad(mask, (0, padding), value=0)
        return ids.reshape(batch_size, -1, *inner), mask.reshape(batch_size, -1, *inner)

    @staticmethod
    def compute_mask_at_stage(
        nested_mask: torch.Tensor | None,
        stage_idx: int = 0,
        reduce_strat: MaskReduceStrat = MaskReduceStrat.ANY,
    ) -> torch.Tensor | None:
        """The key mask of stage ``stage_idx`` (N_k, P_k) from a nested (B, P0', ..., P_{n-1})
        mask: a patch is attended if ANY (or ALL) of its bytes are."""
        if nested_mask is None:
            return None
        if stage_idx > nested_mask.ndim:
            raise ValueError(
                f"attention_mask: stage {stage_idx} needs a nested mask of shape (B, P1, ..., Pn) "
                f"with one axis per stage, got shape {tuple(nested_mask.shape)}"
            )
        reduce_dims = tuple(range(stage_idx + 2, nested_mask.ndim))
        stage_mask = nested_mask
        if reduce_dims:
            reduce = {MaskReduceStrat.ANY: torch.any, MaskReduceStrat.ALL: torch.all}.get(
                MaskReduceStrat(reduce_strat)
            )
            if reduce is None:  # an enum member added without a reduction
                raise ValueError(f"mask_reduce_strat: no reduction for {reduce_strat!r}")
            stage_mask = reduce(nested_mask, dim=reduce_dims)
        return stage_mask.reshape(-1, stage_mask.shape[-1])
