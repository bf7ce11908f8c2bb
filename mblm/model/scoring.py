"""Chunked scoring: the loss (and optionally the logits) of inputs longer than fit in memory.

The input is cut into chunks of whole global patches. The global stage carries its inference
cache (attention keys/values or Mamba states, ``mblm.model.cache``) from chunk to chunk; the
stages below it only ever see one global patch at a time, so they run on each chunk exactly as
in the forward pass. Peak activation memory is that of one chunk plus the global cache, and the
result equals the one-shot ``forward`` up to float rounding (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from mblm.model.cache import make_stage_cache, supports_cache
from mblm.model.decoding import _cpu_small_op_flags, _model_error, stage_tokens
from mblm.ops.patch import patch_unpatch

__all__ = ["ScoreResult", "score"]


@dataclass
class ScoreResult:
    """What ``MBLM.score`` returns.

    loss: the 0-d loss ``forward(input_ids, return_type=LOSS, loss_mask=...)`` returns (mean
        cross entropy in nats over the counted bytes).
    bits_per_byte: ``loss / ln 2``.
    num_counted: how many byte positions the mean is over (non-zero entries: pad targets and
        positions masked out by ``loss_mask`` are not counted).
    logits: (B, L, V) as ``forward(input_ids, return_type=LOGITS)`` when requested, else None;
        ``logits[:, t]`` is the distribution of byte t + 1.
    """

    loss: Tensor
    bits_per_byte: float
    num_counted: int
    logits: Tensor | None = None


def _check(model: nn.Module, input_ids: Tensor, loss_mask: Tensor | None, chunk_size: int) -> None:
    model._check_input_ids(input_ids)
    if input_ids.ndim != 2:
        raise _model_error(f"score takes flat input_ids (B, L), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise _model_error(
            f"score needs at least one row and one byte, got input_ids of shape "
            f"{tuple(input_ids.shape)}"
        )
    if loss_mask is not None and loss_mask.shape != input_ids.shape:
        raise _model_error(
            f"loss_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
            f"{tuple(loss_mask.shape)}"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise _model_error(f"chunk_size must be a positive int (bytes), got {chunk_size!r}")
    if not all(supports_cache(m) for m in model.stage_models[:1]):
        raise _model_error(
            f"score: no inference cache for the global stage model "
            f"{type(model.stage_models[0]).__name__}; use forward() instead"
        )
    patch = math.prod(int(s) for s in model.seq_lens[1:])
    model._check_global_length(-(-input_ids.shape[1] // patch))


@torch.inference_mode()
def score(
    model: nn.Module,
    input_ids: Tensor,
    *,
    chunk_size: int = 8192,
    loss_mask: Tensor | None = None,
    return_logits: bool = False,
    logits_device: torch.device | str | None = None,
) -> ScoreResult:
    """``MBLM.score`` (see there)."""
    _check(model, input_ids, loss_mask, chunk_size)
    device = next(model.parameters()).device
    ids = input_ids.to(device=device, dtype=torch.long)
    with _cpu_small_op_flags(device):
        ce, logits = _chunked(model, ids, chunk_size, return_logits, logits_device)
    from mblm.model.mblm import _masked_mean_loss

    mask = loss_mask.to(device) if loss_mask is not None else None
    loss = _masked_mean_loss(ce, mask)
    counted = int((ce != 0).sum())  # after the in-place mask multiplication
    return ScoreResult(loss, float(loss) / math.log(2), counted, logits)


def _chunked(
    model: nn.Module,
    ids: Tensor,
    chunk_size: int,
    return_logits: bool,
    logits_device: torch.device | str | None,
) -> tuple[Tensor, Tensor | None]:
    """Per-byte cross entropies (B, L) (0 at pad targets) and, if asked, the logits."""
    n = model.num_stages
    batch, length = ids.shape
    patch = math.prod(int(s) for s in model.seq_lens[1:])  # bytes per global token
    per_chunk = max(1, chunk_size // patch) * patch
    num_patches = -(-length // patch)
    glob = model.stage_models[0]
    dim = int(model.start_tokens[0].numel())
    dtype = next(glob.parameters()).dtype
    cache = make_stage_cache(glob, batch, num_patches + 1, dim, ids.device, dtype)
    template = make_stage_cache(glob, 1, 1, dim, ids.device, dtype)
    start_out = template.extend(model.start_tokens[0].to(dtype)[None, None], None)
    cache.load_start(None, template)

    ces, outs = [], []
    last: Tensor | None = None  # the logits after the previous chunk's last byte
    for a in range(0, length, per_chunk):
        b = min(length, a + per_chunk)
        if n == 1:
            all_logits = _chunk_single_stage(model, ids, a, b, cache, start_out)
        else:
            all_logits = _chunk_hierarchy(model, ids, a, b, patch, cache, start_out)
        # the logits after each byte of the chunk; the first chunk's start with the prediction of
        # byte 0 (the start output), later chunks' byte a is predicted by the previous ``last``
        if last is None:
            preds, out = all_logits[:, :-1], all_logits[:, 1:]
        else:
            out = all_logits
            preds = torch.cat((last, out[:, :-1]), dim=1)
        last = out[:, -1:]
        vocab = preds.shape[-1]
        ces.append(
            F.cross_entropy(
                preds.reshape(-1, vocab),
                ids[:, a:b].reshape(-1),
                ignore_index=model.pad_token_id,
                reduction="none",
            ).view(batch, b - a)
        )
        if return_logits:
            outs.append(out.to(logits_device) if logits_device is not None else out)
    return torch.cat(ces, dim=1), (torch.cat(outs, dim=1) if return_logits else None)


def _chunk_single_stage(
    model: nn.Module, ids: Tensor, a: int, b: int, cache, start_out: Tensor
) -> Tensor:
    """One stage: the global stage is the local one; byte t is fed at position t + 1."""
    batch = ids.shape[0]
    positions = torch.arange(a, b, device=ids.device).expand(batch, b - a)
    y = cache.extend(stage_tokens(model, 0, ids[:, a:b], positions, b - 1), None)
    if a == 0:
        y = torch.cat((start_out.expand(batch, 1, -1).to(y.dtype), y), dim=1)
    return model.to_logits(y)


def _chunk_hierarchy(
    model: nn.Module, ids: Tensor, a: int, b: int, patch: int, cache, start_out: Tensor
) -> Tensor:
    batch = ids.shape[0]
    first, count = a // patch, -(-(b - a) // patch)  # the chunk's global patches
    # the global outputs at positions first .. first + count - 1: position p has seen the start
    # token and tokens 0 .. p - 1, so this chunk feeds tokens first - 1 .. first + count - 2
    lo = max(first - 1, 0)
    hi = first + count - 1
    outputs = []
    if first == 0:
        outputs.append(start_out.expand(batch, 1, -1))
    if hi > lo:
        tokens = ids[:, lo * patch : hi * patch].reshape(batch, hi - lo, patch)
        positions = torch.arange(lo, hi, device=ids.device).expand(batch, hi - lo)
        outputs.append(cache.extend(stage_tokens(model, 0, tokens, positions, hi - 1), None))
    y = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
    prev = model.to_next_stage_proj[0](y)

    # the stages below the global one, as in the forward pass, on this chunk's patches
    nested = model._nest(ids[:, a:b])
    embs = model._embed_stages(nested, None, None)
    from mblm.model.mblm import _assemble

    for k in range(1, model.num_stages):
        emb = embs[k]
        seq_len, dim = emb.shape[-2], emb.shape[-1]
        x = emb.reshape(-1, seq_len, dim)
        tokens = _assemble(x, model.start_tokens[k], model._fixed_positions(k, seq_len), prev)
        y = model._run_stage(k, tokens)
        if k < model.num_stages - 1:
            prev = model.to_next_stage_proj[k](y[:, :-1])
    local_shape = (*embs[-1].shape[:-2], y.shape[-2], y.shape[-1])
    rows = patch_unpatch(model._as_patches(y, local_shape), b - a + 1, True)
    # row 0 predicts byte a: only the first chunk needs it (later ones have the previous chunk's)
    return model.to_logits(rows if a == 0 else rows[:, 1:])
