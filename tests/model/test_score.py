"""Chunked scoring (``MBLM.score``): equal to the one-shot forward pass for every stage kind,
chunk size and input length; bad inputs refused before any work."""

from __future__ import annotations

import math

import pytest
import torch
from test_generate import MODELS, RT, VOCAB, _context, _model, _sequence, _tf

from mblm.model.mblm import MBLMInputError


def _inputs(model, length, batch=2):
    ids = torch.stack([_sequence(length, seed=s) for s in range(batch)])
    ids[0, min(3, length - 1)] = model.pad_token_id  # a pad target: not counted
    return ids


@pytest.mark.parametrize("name", sorted(MODELS))
def test_chunked_score_equals_one_shot_forward(name):
    model = MODELS[name]()
    ctx = _context(model)
    patch = ctx // model.seq_lens[0]
    for length in (1, patch, ctx - 1, ctx):
        ids = _inputs(model, length)
        mask = (
            torch.rand(ids.shape, generator=torch.Generator().manual_seed(length)) > 0.3
        ).float()
        cases = [(None, 1), (None, patch + 1), (None, 10_000), (mask, 2 * patch)]
        expected = {}
        with torch.no_grad():
            for loss_mask in (None, mask):
                expected[loss_mask is None] = model(
                    ids,
                    return_type=RT.LOSS_LOGITS,
                    loss_mask=None if loss_mask is None else loss_mask.clone(),
                )
        for loss_mask, chunk in cases:
            loss, logits = expected[loss_mask is None]
            got = model.score(
                ids,
                chunk_size=chunk,
                loss_mask=None if loss_mask is None else loss_mask.clone(),
                return_logits=True,
            )
            what = f"{name} L={length} chunk={chunk} mask={loss_mask is not None}"
            torch.testing.assert_close(got.loss, loss, rtol=0, atol=1e-5, msg=what)
            torch.testing.assert_close(got.logits, logits, rtol=0, atol=1e-5, msg=what)
            assert got.bits_per_byte == pytest.approx(got.loss.item() / math.log(2))


@pytest.mark.parametrize("pos", ["rope", None])
def test_inputs_longer_than_the_context(pos):
    """Without a learned global position table, inputs may exceed prod(seq_lens) (the forward
    pass allows it too); chunks carry the global state across the whole input."""
    model = _model([_tf(pos), _tf("fixed")], (16, 8), (5, 3), (2, 1))
    ids = _inputs(model, 61, batch=1)
    with torch.no_grad():
        loss = model(ids, return_type=RT.LOSS)
        logits = model(ids, return_type=RT.LOGITS)
    got = model.score(ids, chunk_size=6, return_logits=True, logits_device="cpu")
    torch.testing.assert_close(got.loss, loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.logits, logits, rtol=0, atol=1e-5)
    assert got.num_counted == 60  # one pad target


def test_all_masked_gives_zero_like_the_forward():
    model = MODELS["tf2_fixed_rot"]()
    ids = _inputs(model, 10)
    got = model.score(ids, chunk_size=3, loss_mask=torch.zeros(ids.shape))
    assert got.loss.item() == 0.0 and got.num_counted == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=torch.tensor([[1, 2, VOCAB]])), r"input_ids must lie in \[0, num_tokens\)"),
        (dict(input_ids=torch.ones(2, 0, dtype=torch.long)), "at least one row and one byte"),
        (dict(input_ids=torch.ones(0, 4, dtype=torch.long)), "at least one row and one byte"),
        (dict(input_ids=torch.ones(1, 5, 3, dtype=torch.long)), r"flat input_ids \(B, L\)"),
        (dict(chunk_size=0), "chunk_size must be a positive int"),
        (dict(loss_mask=torch.ones(1, 3)), "loss_mask must have the shape of input_ids"),
        (dict(input_ids=torch.ones(1, 16, dtype=torch.long)), "fixed global patch embedding"),
    ],
)
def test_bad_inputs(kwargs, match):
    model = MODELS["tf2_fixed_rot"]()  # 15 bytes of context, fixed global positions
    kwargs.setdefault("input_ids", torch.ones(1, 5, dtype=torch.long))
    ids = kwargs.pop("input_ids")
    with pytest.raises(MBLMInputError, match=match):
        model.score(ids, **kwargs)
