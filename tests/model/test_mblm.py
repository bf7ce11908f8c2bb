"""MBLM / MBLMEncoder behaviour: input validation, loss semantics, checkpoint chunks, nested input,
inputs_embeds, forward_empty and generate (the original's semantics, semantics.md §2)."""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch

from mblm import (
    MBLM,
    MBLMEncoder,
    MBLMEncoderModelConfig,
    MBLMModelConfig,
    MBLMReturnType,
    TransformerBlock,
    TransformerEncoderBlock,
)
from mblm.model.mblm import MBLMInputError
from mblm.utils.stream import ByteStreamer

RT = MBLMReturnType


def _block(pos="fixed", rot=True, **kw):
    return TransformerBlock(
        attn_head_dims=4, attn_num_heads=2, attn_use_rot_embs=rot, pos_emb_type=pos, **kw
    )


def _model(
    dims=(16, 8), lens=(6, 4), layers=(1, 1), vocab=40, pad=0, block=None, chunks=None, seed=0
) -> MBLM:
    torch.manual_seed(seed)
    cfg = MBLMModelConfig(
        num_tokens=vocab,
        pad_token_id=pad,
        hidden_dims=list(dims),
        seq_lens=list(lens),
        num_layers=list(layers),
        train_checkpoint_chunks=chunks,
        block=block if block is not None else _block(),
    )
    return MBLM(cfg)


def _ids(shape, vocab=40, low=1, seed=1):
    return torch.randint(low, vocab, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------- bad inputs


def test_float_input_ids_rejected():
    model = _model()
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(_ids((1, 5)).float())
    with pytest.raises(ValueError, match="input_ids"):
        model(_ids((1, 5)).bool())


@pytest.mark.parametrize("bad", [40, 41, 255, -1])
def test_out_of_vocabulary_ids_rejected(bad):
    model = _model()
    ids = _ids((2, 7))
    ids[1, 3] = bad
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, num_tokens\) = \[0, 40\)"):
        model(ids)


def test_wrong_rank_rejected():
    assert issubclass(MBLMInputError, ValueError) and issubclass(MBLMInputError, AssertionError)
    model = _model()
    with pytest.raises(ValueError, match=r"input_ids must have 2 dims \(B, L\) or 3 dims"):
        model(_ids((1, 2, 3, 4)))
    with pytest.raises(AssertionError):  # the original asserted: still an AssertionError
        model(_ids((8,)))
    with pytest.raises(ValueError, match=r"inner patch sizes seq_lens\[1:\] = \(4,\)"):
        model(_ids((1, 2, 3)))


def test_fixed_global_positions_length_check_message():
    model = _model(lens=(3, 4))
    model(_ids((1, 12)))
    expected = (
        r"Because you are using a fixed global patch embedding, the input sequence length \(4\) "
        r"must be less than the first tuple element of seq_lens \(3\)"
    )
    with pytest.raises(AssertionError, match=expected):
        model(_ids((1, 13)))
    with pytest.raises(ValueError, match=expected):
        model(_ids((1, 4, 4)))


def test_no_length_check_without_fixed_global_positions():
    model = _model(lens=(3, 4), block=[_block(pos="rope"), _block(pos=None)])
    out = model(_ids((1, 21)), return_type=RT.LOGITS)  # longer than prod(seq_lens) = 12
    assert out.shape == (1, 21, 40)
    assert model.pos_embs[0].max_seq_len == 6  # the RoPE cache grew


def test_loss_mask_shape_checked():
    model = _model()
    with pytest.raises(ValueError, match=r"loss_mask must have the shape of input_ids \(2, 7\)"):
        model(_ids((2, 7)), loss_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="loss_mask is only supported with flat input_ids"):
        model(_ids((2, 3, 4)), loss_mask=torch.ones(2, 3, 4))


def test_exactly_one_of_ids_and_embeds():
    model = _model()
    with pytest.raises(ValueError, match="Pass exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="Pass exactly one of input_ids or inputs_embeds"):
        model(_ids((1, 4)), inputs_embeds=torch.zeros(1, 1, 4, 8))
    with pytest.raises(ValueError, match="has not been tested and is not supported"):
        model(inputs_embeds=torch.zeros(1, 1, 4, 8), return_type=RT.LOSS)


def test_checkpoint_chunks_length_checked():
    with pytest.raises(ValueError, match="train_checkpoint_chunks must have one entry"):
        _model(chunks=[2, 2])


# ------------------------------------------------------------------------------- return types


def test_output_shapes_flat_input():
    model = _model()
    ids = _ids((3, 13))
    assert model(ids, return_type=RT.LOGITS).shape == (3, 13, 40)
    # the original drops flat position 0 of the hidden state
    assert model(ids, return_type=RT.HIDDEN_STATE).shape == (3, 12, 8)
    loss, logits = model(ids, return_type=RT.LOSS_LOGITS)
    assert loss.ndim == 0 and logits.shape == (3, 13, 40)
    assert torch.equal(logits, model(ids, return_type=RT.LOGITS))
    assert torch.equal(loss, model(ids))
    assert model(ids, return_type="2").ndim == 0  # plain strings work like the str enum


def test_output_shapes_nested_input():
    model = _model()
    ids = _ids((2, 3, 4))
    assert model(ids, return_type=RT.LOGITS).shape == (2, 3, 5, 40)  # start positions kept
    assert model(ids, return_type=RT.HIDDEN_STATE).shape == (2, 3, 4, 8)
    flat_logits = model(ids.reshape(2, 12), return_type=RT.LOGITS)
    nested_logits = model(ids, return_type=RT.LOGITS)
    torch.testing.assert_close(nested_logits[:, :, 1:].reshape(2, 12, 40), flat_logits)


def test_nested_loss_counts_only_the_first_local_patch_length():
    """Original behaviour (semantics §8.6): only the first P_{n-1} flat positions count."""
    model = _model()
    ids = _ids((2, 3, 4))
    flat = ids.reshape(2, 12)
    mask = torch.zeros(2, 12)
    mask[:, :4] = 1
    torch.testing.assert_close(model(ids), model(flat, loss_mask=mask))


def test_empty_input_returns_forward_empty():
    model = _model()
    empty = torch.zeros(3, 0, dtype=torch.long)
    expected = model.forward_empty(3)
    assert expected.shape == (3, 1, 40)
    for rt in RT:
        assert torch.equal(model(empty, return_type=rt), expected)


# ------------------------------------------------------------------------------------- loss


def test_all_zero_loss_mask_gives_zero_leaf_and_logs(caplog):
    model = _model()
    ids = _ids((2, 7))
    with caplog.at_level(logging.CRITICAL):
        loss = model(ids, loss_mask=torch.zeros(2, 7))
    assert loss.item() == 0.0 and loss.requires_grad
    assert "Edge case detected, loss is nan" in caplog.text
    all_pad = torch.zeros(2, 7, dtype=torch.long)  # pad_token_id 0: every target ignored
    assert model(all_pad).item() == 0.0


def test_all_ones_loss_mask_equals_no_mask():
    model = _model()
    ids = _ids((2, 9))
    assert torch.equal(model(ids, loss_mask=torch.ones(2, 9)), model(ids))
    assert torch.equal(model(ids, loss_mask=torch.ones(2, 9, dtype=torch.long)), model(ids))
    half = model(ids, loss_mask=torch.full((2, 9), 0.5, dtype=torch.float16))
    torch.testing.assert_close(half, 0.5 * model(ids))  # weights scale, they do not normalize


def test_loss_is_mean_of_nonzero_weighted_cross_entropy():
    model = _model(pad=3)
    ids = _ids((2, 10), low=0)
    ids[0, 4] = 3  # a pad target is ignored
    mask = torch.rand(2, 10, generator=torch.Generator().manual_seed(0))
    mask[1, 2:5] = 0
    mask[:, 0] = 0  # byte 0 is predicted by the start output, which LOGITS does not return
    logits = model(ids, return_type=RT.LOGITS)
    # LOGITS[:, t] predicts byte t + 1
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1), ignore_index=3, reduction="none"
    ).view(2, 9)
    weighted = ce * mask[:, 1:]
    expected = weighted[weighted != 0].mean()
    torch.testing.assert_close(model(ids, loss_mask=mask), expected)


# --------------------------------------------------------------------------- checkpoint chunks


@pytest.mark.parametrize("train", [True, False])
def test_checkpoint_chunks_equal_unchunked(train):
    block = [_block(), _block(pos="rope"), _block(pos=None)]
    kw = dict(dims=(16, 12, 8), lens=(3, 4, 2), layers=(1, 1, 1), block=block)
    plain = _model(**kw).train(train)
    chunked = _model(**kw, chunks=[3, 2]).train(train)
    chunked.load_state_dict(plain.state_dict())
    ids = _ids((2, 21))
    loss_p, logits_p = plain(ids, return_type=RT.LOSS_LOGITS)
    loss_c, logits_c = chunked(ids, return_type=RT.LOSS_LOGITS)
    torch.testing.assert_close(logits_c, logits_p, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss_c, loss_p, rtol=1e-6, atol=1e-6)
    loss_p.backward()
    loss_c.backward()
    grads_c = dict(chunked.named_parameters())
    for name, p in plain.named_parameters():
        if p.grad is None:
            assert grads_c[name].grad is None
            continue
        torch.testing.assert_close(grads_c[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------ inputs_embeds


def test_inputs_embeds_per_stage_reproduces_ids_path():
    model = _model(dims=(16, 12, 8), lens=(3, 4, 2), layers=(1, 1, 1)).eval()
    ids = _ids((2, 2, 4, 2))
    embeds = [model.token_embs_rev[0](ids)]
    embeds.append(model.token_embs_rev[1](ids.reshape(2, 2, 4, 2)))
    embeds.append(model.token_embs_rev[2](ids.reshape(2, 2, 8)))
    expected = model(ids, return_type=RT.HIDDEN_STATE)
    got = model(inputs_embeds=embeds, return_type=RT.HIDDEN_STATE)
    torch.testing.assert_close(got, expected)


def test_inputs_embeds_single_tensor_checks_and_warns():
    model = _model()
    with pytest.warns(UserWarning, match="bypasses per-stage embedding tables"):
        out = model(inputs_embeds=torch.randn(2, 3, 4, 8), return_type=RT.HIDDEN_STATE)
    assert out.shape == (2, 3, 4, 8)
    with pytest.raises(ValueError, match="Last dim of `inputs_embeds` must equal final hidden dim"):
        model(inputs_embeds=torch.randn(2, 3, 4, 7), return_type=RT.HIDDEN_STATE)
    with pytest.raises(ValueError, match="inner dim at stage 1 must be 4"):
        model(inputs_embeds=torch.randn(2, 3, 5, 8), return_type=RT.HIDDEN_STATE)


# ---------------------------------------------------------------------------------- generate


def test_generate_lengths_as_the_original():
    model = _model(dims=(16, 8), lens=(12, 4), vocab=256, pad=0)
    assert model.generate(enable_progress=False).shape == (48,)
    assert model.generate(torch.ones(10, dtype=torch.long), enable_progress=False).shape == (48,)
    assert model.generate(num_tokens_to_generate=5, enable_progress=False).shape == (5,)
    prime = torch.ones(50, dtype=torch.long)
    assert torch.equal(model.generate(prime, num_tokens_to_generate=0), prime)  # 0 steps
    assert model.generate(num_tokens_to_generate=1).ndim == 0  # squeeze of a single byte
    buffer = io.BytesIO()
    with ByteStreamer(buffer) as streamer:
        out = model.generate(stream=streamer)
    assert list(buffer.getvalue()) == out.tolist() and len(out) == 48
    # a 2-D prime is a batch now (tests/model/test_generate.py); other ranks are refused
    with pytest.raises(ValueError, match="prime must be a 1-D tensor"):
        model.generate(torch.ones(2, 3, 1, dtype=torch.long))


def test_generate_greedy_equals_argmax_of_full_forward_and_stops_at_eos():
    model = _model(dims=(16, 8), lens=(4, 3)).eval()
    prime = _ids((4,))
    out = model.generate(prime, num_tokens_to_generate=6, enable_progress=False)
    assert torch.equal(out[:4], prime)
    for t in range(4, 10):
        logits = model(out[None, :t], return_type=RT.LOGITS)[0, -1]
        assert out[t].item() == logits.argmax().item()
    eos = out[5].item()
    stopped = model.generate(prime, num_tokens_to_generate=6, end_of_gen_token_id=eos)
    assert stopped.tolist() == out[: out[4:].tolist().index(eos) + 5].tolist()


def test_generate_text_stream_writes_numbers():
    model = _model(dims=(8, 8), lens=(2, 2))
    text = io.StringIO()
    with ByteStreamer(text) as streamer:
        out = model.generate(_ids((2,)), stream=streamer, num_tokens_to_generate=3)
    assert text.getvalue() == " ".join(str(t) for t in out[2:].tolist())


# ------------------------------------------------------------------------------------- dtype


def test_float64_model_matches_float32():
    model = _model(block=[_block(), _block(pos="rope")]).eval()
    ids = _ids((2, 11))
    expected = model(ids, return_type=RT.LOGITS)
    got = model.double()(ids, return_type=RT.LOGITS)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- encoder


def _encoder(reduce="any", flash=False, seed=0) -> MBLMEncoder:
    torch.manual_seed(seed)
    block = TransformerEncoderBlock(
        attn_head_dims=4,
        attn_num_heads=2,
        attn_use_rot_embs=True,
        pos_emb_type="fixed",
        use_flash_attn=flash,
    )
    cfg = MBLMModelConfig(
        num_tokens=30,
        pad_token_id=0,
        hidden_dims=[16, 8],
        seq_lens=[4, 3],
        num_layers=[1, 1],
        train_checkpoint_chunks=None,
        block=block,
    )
    enc_cfg = MBLMEncoderModelConfig(mask_token_id=29, mblm_config=cfg, mask_reduce_strat=reduce)
    return MBLMEncoder(enc_cfg)


def test_encoder_state_dict_has_no_start_tokens_or_prefix():
    keys = list(_encoder().state_dict())
    assert keys[0] == "pos_embs.0.weight" and not any(k.startswith("start_tokens") for k in keys)


def test_encoder_default_return_type_is_hidden_state():
    enc = _encoder()
    ids = _ids((2, 12), vocab=30)
    assert enc(ids).shape == (2, 12, 8)
    assert enc(ids, return_type=RT.LOGITS).shape == (2, 12, 30)


def test_encoder_errors():
    enc = _encoder()
    ids = _ids((2, 12), vocab=30)
    with pytest.raises(ValueError, match="You can't compute a loss without the labels"):
        enc(ids, return_type=RT.LOSS)
    with pytest.raises(ValueError, match="input_ids must have at least one element"):
        enc(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        enc(ids, attention_mask=torch.ones(2, 11, dtype=torch.bool))


@pytest.mark.parametrize("flash", [False, True])
def test_encoder_all_true_mask_equals_no_mask_and_labels_untouched(flash):
    enc = _encoder(flash=flash).eval()
    ids = _ids((2, 12), vocab=30)
    labels = _ids((2, 12), vocab=30, seed=5)
    labels_copy = labels.clone()
    mask = torch.ones(2, 12, dtype=torch.bool)
    loss_a, logits_a = enc(ids, labels=labels, return_type=RT.LOSS_LOGITS)
    loss_b, logits_b = enc(ids, attention_mask=mask, labels=labels, return_type=RT.LOSS_LOGITS)
    torch.testing.assert_close(logits_a, logits_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    mask[0, 3:] = False
    enc(ids, attention_mask=mask, labels=labels, return_type=RT.LOSS)
    assert torch.equal(labels, labels_copy)


def test_encoder_mask_reduction_per_stage():
    nested = torch.tensor([[[True, False, False], [False, False, False]]])
    any_mask = MBLMEncoder.compute_mask_at_stage(nested, 0, "any")
    all_mask = MBLMEncoder.compute_mask_at_stage(nested, 0, "all")
    assert any_mask.tolist() == [[True, False]] and all_mask.tolist() == [[False, False]]
    assert MBLMEncoder.compute_mask_at_stage(nested, 1).shape == (2, 3)
    assert MBLMEncoder.compute_mask_at_stage(None, 1) is None
    ids, mask = MBLMEncoder.pad_and_nest(torch.ones(1, 4, dtype=torch.long), None, [2, 3], 1, 4)
    assert ids.tolist() == [[[1, 1, 1], [1, 0, 0]]]
    assert mask.tolist() == [[[True, True, True], [True, False, False]]]


def test_encoder_padding_is_masked_out():
    """A padded input's outputs do not depend on what the padding would have attended."""
    enc = _encoder().eval()
    ids = _ids((1, 10), vocab=30)
    out = enc(ids)
    assert out.shape == (1, 10, 8) and torch.isfinite(out).all()
    padded = torch.cat([ids, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[:, 10:] = False
    torch.testing.assert_close(enc(padded, attention_mask=mask)[:, :10], out)


def test_math_of_forward_is_reproducible_across_batches():
    """Batching does not change a sequence's result (each row is independent)."""
    model = _model().eval()
    ids = _ids((3, 11))
    batched = model(ids, return_type=RT.LOGITS)
    for b in range(3):
        torch.testing.assert_close(model(ids[b : b + 1], return_type=RT.LOGITS)[0], batched[b])
    assert math.isfinite(model(ids).item())


def test_checkpoints_of_the_0_4_0_embedding_layout_load():
    """mblm 0.4.0 named the byte tables token_embs_rev.0.weight / token_embs_rev.<j>.{0,2,3,4}.*
    (semantics.md §3.4); such state_dicts load strictly into the current layout."""
    model = _model(dims=(16, 12, 8), lens=(3, 4, 2), layers=(1, 1, 1))
    renames = {
        "embedding.weight": "0.weight",
        "_post.1.": "2.",
        "_post.2.": "3.",
        "_post.3.": "4.",
    }
    old = {}
    for key, value in model.state_dict().items():
        if key == "token_embs_rev.0.embedding.weight":
            key = "token_embs_rev.0.weight"
        elif key.startswith("token_embs_rev."):
            for new, was in renames.items():
                key = key.replace(new, was)
        old[key] = value + 1.0 if value.is_floating_point() else value
    assert "token_embs_rev.2.3.weight" in old and "token_embs_rev.1.0.weight" in old
    fresh = _model(dims=(16, 12, 8), lens=(3, 4, 2), layers=(1, 1, 1), seed=5)
    fresh.load_state_dict(old, strict=True)
    torch.testing.assert_close(
        fresh.token_embs_rev[2]._post[2].weight, model.token_embs_rev[2]._post[2].weight + 1
    )
    torch.testing.assert_close(
        fresh.token_embs_rev[0].embedding.weight, model.token_embs_rev[0].embedding.weight + 1
    )


@pytest.mark.parametrize("flash", [False, True])
def test_whole_model_pickles(flash):
    """torch.save(model) works (the original fails on torch's SDPBackend values); the loaded model
    computes the same logits and generates the same bytes."""
    model = _model(block=_block(use_flash_attn=flash)).eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    attend = loaded.stage_models[0].layers[0][0].attend
    assert attend.attn_cfg == model.stage_models[0].layers[0][0].attend.attn_cfg
    x = _ids((2, 13))
    torch.testing.assert_close(loaded(x, return_type=RT.LOGITS), model(x, return_type=RT.LOGITS))
    prompt = _ids((5,))
    assert torch.equal(
        loaded.generate(prompt, num_tokens_to_generate=6, enable_progress=False),
        model.generate(prompt, num_tokens_to_generate=6, enable_progress=False),
    )
