"""Transformer stage modules: MEGABYTE layer tree and numerics, attention through mblm.ops."""

from __future__ import annotations

import warnings

import pytest
import torch

from mblm.model.transformer import (
    Attend,
    Attention,
    AttentionEncoder,
    FeedForward,
    RMSNorm,
    RotaryEmbedding,
    TransformerBlock,
    TransformerDecoder,
    TransformerEncoder,
    TransformerEncoderBlock,
    apply_rotary_pos_emb,
    token_shift,
)


def _megabyte_attention(attn: Attention, x: torch.Tensor, freqs, causal: bool, mask=None):
    """MEGABYTE-pytorch's non-flash Attention.forward, written out (einsum, -finfo.max fill)."""
    h = attn.heads
    x = attn.norm(x)
    q, k, v = (attn.to_q(x), *attn.to_kv(x).chunk(2, dim=-1))
    q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))
    if freqs is not None:
        q, k = apply_rotary_pos_emb(freqs, q), apply_rotary_pos_emb(freqs, k)
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    big = -torch.finfo(sim.dtype).max
    if mask is not None:
        sim = sim.masked_fill(~mask[:, None, None, :], big)
    if causal:
        n = sim.shape[-1]
        sim = sim.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), big)
    out = torch.einsum("bhij,bhjd->bhid", sim.softmax(-1), v)
    return attn.to_out(out.transpose(1, 2).flatten(-2))


@pytest.mark.parametrize("rot", [True, False])
@pytest.mark.parametrize("flash", [True, False])
def test_attention_equals_megabyte_formula(rot, flash):
    torch.manual_seed(0)
    attn = Attention(dim=12, dim_head=6, heads=3, flash=flash)
    x = torch.randn(4, 9, 12)
    freqs = RotaryEmbedding(6)(9) if rot else None
    expected = _megabyte_attention(attn, x, freqs, causal=True)
    torch.testing.assert_close(attn(x, rotary_emb=freqs), expected, rtol=1e-5, atol=1e-5)


def test_encoder_attention_with_and_without_mask():
    torch.manual_seed(1)
    attn = AttentionEncoder(dim=8, dim_head=4, heads=2)
    x = torch.randn(3, 5, 8)
    freqs = RotaryEmbedding(4)(5)
    expected = _megabyte_attention(attn, x, freqs, causal=False)
    torch.testing.assert_close(attn(x, rotary_emb=freqs), expected, rtol=1e-5, atol=1e-5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1]], dtype=torch.bool)
    expected = _megabyte_attention(attn, x, freqs, causal=False, mask=mask)
    torch.testing.assert_close(
        attn(x, attention_mask=mask, rotary_emb=freqs), expected, rtol=1e-5, atol=1e-5
    )


def test_attend_heads_first_api():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    out = Attend(causal=True)(q, k, v)
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * 0.5
    sim = sim.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.einsum("bhij,bhjd->bhid", sim.softmax(-1), v)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_rmsnorm_clamps_and_token_shift():
    norm = RMSNorm(4)
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(norm(x)[0], x[0] / 2.5)
    assert torch.equal(norm(x)[1], torch.zeros(4))  # clamped at 1e-8, no NaN
    t = torch.arange(10.0).view(1, 2, 5)  # odd width: first ceil(5/2) = 3 features kept
    shifted = token_shift(t)
    assert shifted.tolist() == [[[0, 1, 2, 0, 0], [5, 6, 7, 3, 4]]]


def test_decoder_tree_keys_shapes_and_causality():
    torch.manual_seed(0)
    model = TransformerBlock(
        attn_head_dims=8, attn_num_heads=2, attn_use_rot_embs=True, ff_multiplier=3
    ).to_model(model_dim=12, num_layers=2)
    assert isinstance(model, TransformerDecoder)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes)[:10] == [
        "rotary_emb.inv_freq",
        "layers.0.0.norm.g",
        "layers.0.0.to_q.weight",
        "layers.0.0.to_kv.weight",
        "layers.0.0.to_out.weight",
        "layers.0.1.0.g",
        "layers.0.1.1.weight",
        "layers.0.1.1.bias",
        "layers.0.1.4.weight",
        "layers.0.1.4.bias",
    ]
    assert shapes["rotary_emb.inv_freq"] == (4,)
    assert shapes["layers.1.0.to_kv.weight"] == (32, 12)
    assert shapes["layers.1.1.1.weight"] == (36, 12) and shapes["norm.g"] == (12,)
    x = torch.randn(2, 7, 12)
    y = model(x)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 3, 12)
    torch.testing.assert_close(model(x2)[:, :4], y[:, :4])  # causal: no future leakage


def test_encoder_stage_sees_the_future_and_has_same_keys():
    torch.manual_seed(0)
    block = dict(attn_head_dims=4, attn_num_heads=2, attn_use_rot_embs=False)
    enc = TransformerEncoderBlock(**block).to_model(model_dim=8, num_layers=1)
    dec = TransformerBlock(**block).to_model(model_dim=8, num_layers=1)
    assert isinstance(enc, TransformerEncoder)
    assert list(enc.state_dict()) == list(dec.state_dict())
    x = torch.randn(1, 5, 8)
    x2 = x.clone()
    x2[:, -1] = 0
    assert not torch.allclose(enc(x2)[:, 0], enc(x)[:, 0])


def test_feedforward_layout():
    ff = FeedForward(dim=6, mult=2, dropout=0.1)
    assert [type(m).__name__ for m in ff] == ["RMSNorm", "Linear", "GELU", "Dropout", "Linear"]
    assert ff[2].approximate == "none"


def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    attn = Attention(dim=8, dim_head=4, heads=2, dropout=0.5)
    x = torch.randn(2, 6, 8)
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
    attn.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "dropout runs the reference" (once)
        torch.manual_seed(1)
        a = attn(x)
        torch.manual_seed(2)
        assert not torch.allclose(a, attn(x))
