"""Cached generation (``mblm.model.decoding``): exactness against the full forward pass, batches,
sampling, bad inputs.

Every per-step distribution of the cached decoder must equal the full forward pass's (fp32,
1e-5 abs) for Transformer, Mamba1, Mamba2 and hybrid hierarchies of 1 to 3 stages, every
positional choice and every prompt length relative to the patch sizes; greedy decoding must give
exactly the bytes of full recomputation (``use_cache=False``), batch rows their single results.
"""

from __future__ import annotations

import io

import pytest
import torch

from mblm import MBLM, MBLMModelConfig, MBLMReturnType, TransformerBlock
from mblm.model.decoding import HierarchicalDecoder
from mblm.model.mamba import MambaBlock
from mblm.model.mblm import MBLMInputError
from mblm.utils.stream import ByteStreamer

RT = MBLMReturnType
VOCAB = 40


def _tf(pos=None, rot=True, heads=2):
    return TransformerBlock(
        attn_head_dims=4, attn_num_heads=heads, attn_use_rot_embs=rot, pos_emb_type=pos
    )


def _mamba(variant, pos=None):
    return MambaBlock(
        d_state=4, d_conv=3, expand=2, headdim=8, block_type=variant, pos_emb_type=pos
    )


def _model(blocks, dims, lens, layers=None, seed=0) -> MBLM:
    torch.manual_seed(seed)
    cfg = MBLMModelConfig(
        num_tokens=VOCAB,
        pad_token_id=0,
        hidden_dims=list(dims),
        seq_lens=list(lens),
        num_layers=list(layers or [1] * len(dims)),
        train_checkpoint_chunks=None,
        block=list(blocks),
    )
    model = MBLM(cfg).eval()
    # larger logits than the default init: a real test of the 1e-5 tolerance
    with torch.no_grad():
        model.to_logits.weight.mul_(4)
    return model


# name -> model factory. Patch sizes: the local one 3, global patches of 3 or 6 bytes.
MODELS = {
    "tf2_fixed_rot": lambda: _model([_tf("fixed"), _tf("fixed")], (16, 8), (5, 3)),
    "tf2_rope_norot": lambda: _model([_tf("rope", rot=False), _tf("rope")], (16, 8), (5, 3)),
    "tf2_none_rot": lambda: _model([_tf(None), _tf(None, rot=False)], (16, 8), (5, 3), (2, 2)),
    "tf3_fixed": lambda: _model([_tf("fixed"), _tf("fixed"), _tf("fixed")], (16, 12, 8), (3, 2, 3)),
    "tf3_mixed_pos": lambda: _model([_tf("rope"), _tf(None), _tf("fixed")], (16, 12, 8), (3, 2, 3)),
    "tf1_fixed": lambda: _model([_tf("fixed")], (8,), (12,), (2,)),
    "mamba1_2": lambda: _model([_mamba("mamba1"), _mamba("mamba1")], (16, 8), (5, 3)),
    "mamba2_2": lambda: _model([_mamba("mamba2", "fixed"), _mamba("mamba2")], (16, 16), (5, 3)),
    "mamba1_3": lambda: _model(
        [_mamba("mamba1", "rope"), _mamba("mamba1"), _mamba("mamba1")], (16, 12, 8), (3, 2, 3)
    ),
    "mamba2_1": lambda: _model([_mamba("mamba2")], (16,), (12,), (2,)),
    "hybrid2_m1_tf": lambda: _model([_mamba("mamba1"), _tf("fixed")], (16, 8), (5, 3), (2, 1)),
    "hybrid3_m2_tf_m1": lambda: _model(
        [_mamba("mamba2", "fixed"), _tf("rope"), _mamba("mamba1")], (16, 16, 8), (3, 2, 3)
    ),
}


def _context(model: MBLM) -> int:
    return int(torch.tensor(model.seq_lens).prod())


def _prompt_lengths(model: MBLM) -> list[int]:
    """Empty, shorter than a local patch, exact multiples of the local and global patches and
    one past them, the full context minus one."""
    local = model.seq_lens[-1]
    glob = _context(model) // model.seq_lens[0]
    lens = {0, 1, local - 1, local, local + 1, glob, glob + 1, 2 * glob, 2 * glob - 1}
    return sorted(x for x in lens if 0 <= x < _context(model))


def _sequence(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_step_logits_match_the_full_forward(name):
    """Teacher-forced: prefill a prompt of every length, then feed the rest of a fixed sequence
    byte by byte; every step's logits equal the full forward pass's at that position."""
    model = MODELS[name]()
    total = _context(model)
    seq = _sequence(total)
    with torch.no_grad():
        full = model(seq[None], return_type=RT.LOGITS)[0]  # full[t]: after bytes 0..t
        empty = model.forward_empty(1)[0, -1]
    for prompt_len in _prompt_lengths(model):
        decoder = HierarchicalDecoder(model, 1, total)
        got = [decoder.prefill([seq[:prompt_len]])[0]]
        for t in range(prompt_len, total - 1):
            got.append(decoder.step(seq[t : t + 1])[0])
        expected = torch.cat((empty[None], full[: total - 1]))[prompt_len:]
        torch.testing.assert_close(
            torch.stack(got),
            expected,
            rtol=0,
            atol=1e-5,
            msg=lambda m, p=prompt_len: f"{name} prompt {p}: {m}",
        )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_bytes_equal_full_recomputation(name):
    model = MODELS[name]()
    for prompt_len in (0, 4, min(model.seq_lens[-1] * 2, _context(model) - 2)):
        prompt = _sequence(prompt_len, seed=prompt_len)
        cached = model.generate(prompt, enable_progress=False)
        full = model.generate(prompt, enable_progress=False, use_cache=False)
        assert cached.tolist() == full.tolist(), f"{name} prompt {prompt_len}"
        assert len(cached) == _context(model)


@pytest.mark.parametrize("name", ["tf3_mixed_pos", "hybrid3_m2_tf_m1", "mamba2_2", "tf1_fixed"])
def test_batch_rows_equal_single_results(name):
    """Prompts of different lengths (different phases in every stage) in one call."""
    model = MODELS[name]()
    prompts = [_sequence(n, seed=n) for n in (0, 1, 5, 6, 7, 8)]
    steps = _context(model) - 8  # the longest prompt fills the context
    singles = [
        model.generate(p, num_tokens_to_generate=steps, enable_progress=False) for p in prompts
    ]
    batch = model.generate(prompts, num_tokens_to_generate=steps, enable_progress=False)
    assert isinstance(batch, list) and len(batch) == len(prompts)
    for i, (row, single) in enumerate(zip(batch, singles, strict=True)):
        assert row.ndim == 1 and row.dtype == torch.long
        assert row.tolist() == single.tolist(), f"row {i}"
    uncached = model.generate(prompts, num_tokens_to_generate=steps, enable_progress=False,
                              use_cache=False)  # fmt: skip
    assert [r.tolist() for r in uncached] == [r.tolist() for r in batch]


def test_batch_default_length_fills_each_rows_context():
    model = MODELS["tf2_fixed_rot"]()
    prompts = [_sequence(n, seed=n) for n in (2, 9, 15)]
    batch = model.generate(prompts, enable_progress=False)
    assert [len(r) for r in batch] == [15, 15, 15]
    for p, row in zip(prompts, batch, strict=True):
        assert row.tolist() == model.generate(p, enable_progress=False).tolist()


def test_2d_prime_is_a_batch():
    model = MODELS["tf3_fixed"]()
    prime = torch.stack([_sequence(5, seed=s) for s in range(3)])
    batch = model.generate(prime, num_tokens_to_generate=7, enable_progress=False)
    assert isinstance(batch, list) and [len(r) for r in batch] == [12, 12, 12]
    for p, row in zip(prime, batch, strict=True):
        assert row.tolist() == model.generate(p, num_tokens_to_generate=7).tolist()


def test_decoder_rows_out_of_phase_match_single_rows():
    """Step a subset of rows at different positions: each row's logits equal its own run."""
    model = MODELS["hybrid3_m2_tf_m1"]()
    seqs = [_sequence(18, seed=s) for s in range(3)]
    starts = [0, 4, 7]
    decoder = HierarchicalDecoder(model, 3, 18)
    decoder.prefill([s[:n] for s, n in zip(seqs, starts, strict=True)])
    got: list[list[torch.Tensor]] = [[], [], []]
    for it in range(10):
        rows = [r for r in range(3) if (it + r) % 3 != 0]  # a changing subset of rows
        tokens = torch.stack([seqs[r][decoder.length[r]] for r in rows])
        logits = decoder.step(tokens, rows)
        for r, lg in zip(rows, logits, strict=True):
            got[r].append((decoder.length[r], lg))
    with torch.no_grad():
        for r in range(3):
            full = model(seqs[r][None], return_type=RT.LOGITS)[0]
            for length, lg in got[r]:
                torch.testing.assert_close(lg, full[length - 1], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------- sampling


def test_sampling_matches_uncached_under_the_same_seed():
    """The cached path draws the same noise as the original loop: same seed, same bytes."""
    model = MODELS["tf2_fixed_rot"]()
    prompt = _sequence(4)
    for thres, temp in ((0.5, 1.0), (0.0, 0.7)):
        torch.manual_seed(3)
        cached = model.generate(prompt, filter_thres=thres, temperature=temp)
        torch.manual_seed(3)
        full = model.generate(prompt, filter_thres=thres, temperature=temp, use_cache=False)
        assert cached.tolist() == full.tolist()


def test_sampling_with_a_generator_is_reproducible():
    model = MODELS["mamba1_2"]()
    prompts = [_sequence(3), _sequence(8, seed=2)]
    runs = [
        model.generate(prompts, filter_thres=0.0, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert [r.tolist() for r in runs[0]] == [r.tolist() for r in runs[1]]
    other = model.generate(prompts, filter_thres=0.0, generator=torch.Generator().manual_seed(8))
    assert [r.tolist() for r in other] != [r.tolist() for r in runs[0]]
    state = torch.get_rng_state()
    model.generate(prompts[0], filter_thres=0.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is untouched


def test_greedy_ignores_temperature_zero():
    model = MODELS["tf2_fixed_rot"]()
    prompt = _sequence(4)
    assert model.generate(prompt, temperature=0.0).tolist() == model.generate(prompt).tolist()


# ------------------------------------------------------------------------ stopping, streams


def test_end_of_generation_stops_each_row():
    model = MODELS["tf3_fixed"]()
    prompts = [_sequence(n, seed=n) for n in (2, 5)]
    full = model.generate(prompts, num_tokens_to_generate=8, enable_progress=False)
    eos = full[0][2 + 3].item()  # the 4th byte row 0 generates
    stopped = model.generate(prompts, num_tokens_to_generate=8, end_of_gen_token_id=eos)
    for row, ref, n in zip(stopped, full, (2, 5), strict=True):
        gen = ref[n:].tolist()
        cut = gen.index(eos) + 1 if eos in gen else len(gen)
        assert row.tolist() == ref[: n + cut].tolist()


def test_streams_per_row_and_single_stream():
    model = MODELS["tf2_none_rot"]()
    prompts = [_sequence(1), _sequence(4, seed=3)]
    buffers = [io.BytesIO(), io.BytesIO()]
    streams = [ByteStreamer(b) for b in buffers]
    out = model.generate(prompts, streams, num_tokens_to_generate=6)
    for buf, row, p in zip(buffers, out, prompts, strict=True):
        assert list(buf.getvalue()) == row[len(p) :].tolist()
    buf = io.BytesIO()
    single = model.generate(prompts[1], ByteStreamer(buf), num_tokens_to_generate=6)
    assert list(buf.getvalue()) == single[4:].tolist()


def test_single_prompt_return_shapes_as_the_original():
    model = MODELS["tf2_fixed_rot"]()
    assert model.generate(num_tokens_to_generate=1).ndim == 0
    assert model.generate(_sequence(3), num_tokens_to_generate=0).shape == (15,)
    long_prompt = _sequence(20)
    assert torch.equal(model.generate(long_prompt), long_prompt)  # no room left: no steps


def test_unknown_stage_model_falls_back_to_full_recomputation(monkeypatch):
    from mblm.model import decoding

    model = MODELS["tf2_fixed_rot"]()
    monkeypatch.setattr(decoding, "supports_cache", lambda m: False)
    decoding.warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="no inference cache"):
        out = model.generate(_sequence(2), num_tokens_to_generate=4)
    monkeypatch.undo()
    assert out.tolist() == model.generate(_sequence(2), num_tokens_to_generate=4).tolist()


# ------------------------------------------------------------------------------ bad inputs


def _failing_stream():
    class Stream:
        written: list[int] = []

        def write(self, b):
            self.written.append(b)

        def flush(self):
            pass

    return Stream()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prime=torch.tensor([1, 2, VOCAB])), r"ids must lie in \[0, num_tokens\) = \[0, 40\)"),
        (dict(prime=torch.tensor([-1])), r"ids must lie in \[0, num_tokens\)"),
        (dict(prime=[torch.tensor([1]), torch.tensor([99])]), r"prime\[1\] ids must lie"),
        (dict(prime=[]), "empty batch"),
        (dict(prime=torch.zeros(0, 3, dtype=torch.long)), "empty batch"),
        (dict(prime=torch.ones(2, 2, 2, dtype=torch.long)), "prime must be a 1-D tensor"),
        (dict(prime=torch.ones(3)), "integer byte ids"),
        (dict(filter_thres=0.5, temperature=0.0), "temperature must be > 0 when sampling"),
        (dict(filter_thres=0.5, temperature=-1.0), "temperature must be > 0"),
        (dict(filter_thres=0.5, temperature=float("nan")), "temperature must be > 0"),
        (dict(filter_thres=-0.5), "filter_thres must be >= 0"),
        (dict(num_tokens_to_generate=17), "fixed global patch embedding.*15 bytes"),
        (dict(prime=_sequence(10), num_tokens_to_generate=7), "would feed 16 bytes"),
        (dict(prime=[_sequence(1), _sequence(2)], stream=io.BytesIO()), "single ByteStreamer"),
    ],
)
def test_bad_inputs_fail_before_any_work(kwargs, match):
    model = MODELS["tf2_fixed_rot"]()  # fixed global positions: 15 bytes of context
    stream = kwargs.pop("stream", None) or _failing_stream()
    with pytest.raises(MBLMInputError, match=match):
        model.generate(**kwargs, stream=stream)
    if hasattr(stream, "written"):
        assert stream.written == []


def test_context_limit_is_exact():
    model = MODELS["tf2_fixed_rot"]()
    # 15 bytes of context: a 16th byte can be generated (the last byte is never fed)
    for prompt_len in (0, 10):
        n = 16 - prompt_len
        out = model.generate(_sequence(prompt_len), num_tokens_to_generate=n)
        full = model.generate(_sequence(prompt_len), num_tokens_to_generate=n, use_cache=False)
        assert len(out) == 16 and out.tolist() == full.tolist()


# ------------------------------------------------------------------------------ dtypes, GPU


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_run_and_match_the_full_forward(dtype):
    """The caches take the model's dtype (Mamba SSM states stay float32/float64)."""
    model = _model([_mamba("mamba2", "fixed"), _tf("rope")], (16, 16), (5, 3)).to(dtype)
    seq = _sequence(14)
    decoder = HierarchicalDecoder(model, 1, 15)
    got = [decoder.prefill([seq[:4]])[0]]
    for t in range(4, 14):
        got.append(decoder.step(seq[t : t + 1])[0])
    with torch.no_grad():
        full = model(seq[None], return_type=RT.LOGITS)[0, 3:]
    atol = 1e-10 if dtype == torch.float64 else 0.1
    torch.testing.assert_close(torch.stack(got), full, rtol=0, atol=atol)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["tf3_mixed_pos", "hybrid3_m2_tf_m1", "mamba1_2"])
def test_cuda_generation_equals_full_recomputation(name):
    model = MODELS[name]().cuda()
    prompts = [_sequence(n, seed=n).cuda() for n in (0, 3, 7)]
    steps = _context(model) - 8
    cached = model.generate(prompts, num_tokens_to_generate=steps, enable_progress=False)
    for p, row in zip(prompts, cached, strict=True):
        assert row.device.type == "cuda"
        full = model.generate(p, num_tokens_to_generate=steps, use_cache=False)
        assert row.tolist() == full.tolist()
    ids = torch.stack([_sequence(_context(model) - 1, seed=s) for s in range(2)]).cuda()
    with torch.no_grad():
        loss = model(ids, return_type=RT.LOSS)
    torch.testing.assert_close(model.score(ids, chunk_size=5).loss, loss, rtol=0, atol=1e-5)
