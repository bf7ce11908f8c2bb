"""``MBLM.generate`` on the C++ runtime (``mblm.model.runtime_decoding``) against the Python
decoder: the same bytes greedy and sampled, the same generator states, streams, stops and
progress; the runtime path really taken where it applies, the Python decoder (with the same
results) where it does not."""

from __future__ import annotations

import copy

import pytest
import torch
from test_generate import MODELS, _context, _mamba, _model, _sequence, _tf

from mblm import MBLM, MBLMModelConfig
from mblm.model import decoding, runtime_decoding
from mblm.model.block import StageBlock
from mblm.ops._loader import load_extension

RuntimeModel = getattr(load_extension(), "RuntimeModel", None)
pytestmark = pytest.mark.skipif(RuntimeModel is None, reason="mblm._C built without the runtime")


@pytest.fixture
def runtime_calls(monkeypatch):
    """The runtime models decoding.generate ran on (spied on the dispatch)."""
    calls: list = []
    real = decoding.generate_on_runtime

    def spy(runtime, *args):
        assert isinstance(runtime, RuntimeModel)
        calls.append(runtime)
        return real(runtime, *args)

    monkeypatch.setattr(decoding, "generate_on_runtime", spy)
    return calls


def _python_decoder(monkeypatch, run):
    """run() on the Python decoder."""
    with monkeypatch.context() as m:
        m.setattr(decoding, "RUNTIME_DECODING", False)
        return run()


def _rows(out) -> list[list[int]]:
    return [r.tolist() for r in out] if isinstance(out, list) else [out.tolist()]


def _prompts(model: MBLM) -> list[torch.Tensor]:
    """Mixed lengths, empty included, in every phase of the local patch."""
    lens = [0, 1, 5, 7, model.seq_lens[-1] * 2]
    return [_sequence(n, seed=n) for n in lens if n < _context(model) - 1]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_runtime_bytes_equal_the_python_decoder(name, monkeypatch, runtime_calls):
    model = MODELS[name]()
    prompts = _prompts(model)

    def greedy():
        return _rows(model.generate(prompts, enable_progress=False))

    def sampled_global():
        torch.manual_seed(5)
        out = model.generate(prompts, filter_thres=0.5, temperature=0.8, enable_progress=False)
        return _rows(out), torch.get_rng_state()

    def sampled_generator():
        generator = torch.Generator().manual_seed(11)
        before = torch.get_rng_state()
        out = model.generate(prompts[1], filter_thres=0.0, generator=generator)
        assert torch.equal(torch.get_rng_state(), before)  # the global generator is untouched
        return _rows(out), generator.get_state()

    for run in (greedy, sampled_global, sampled_generator):
        calls = len(runtime_calls)
        got = run()
        assert len(runtime_calls) == calls + 1, f"{name} {run.__name__}: runtime not taken"
        want = _python_decoder(monkeypatch, run)
        assert len(runtime_calls) == calls + 1
        if isinstance(got, tuple):
            assert got[0] == want[0], f"{name} {run.__name__}"
            assert torch.equal(got[1], want[1]), f"{name} {run.__name__}: generator state"
        else:
            assert got == want, f"{name} {run.__name__}"


def test_greedy_advances_the_global_generator_as_python_does(monkeypatch, runtime_calls):
    """Python draws the noise even when greedy: so does the runtime."""
    model = MODELS["tf2_rope_norot"]()

    def run():
        torch.manual_seed(1)
        model.generate(_sequence(3), num_tokens_to_generate=5)
        return torch.get_rng_state()

    assert torch.equal(run(), _python_decoder(monkeypatch, run))
    assert len(runtime_calls) == 1
    torch.manual_seed(1)
    seeded = torch.get_rng_state()
    assert not torch.equal(run(), seeded)


def test_float64_model_runs_on_the_runtime(monkeypatch, runtime_calls):
    model = _model([_mamba("mamba2", "fixed"), _tf("rope")], (16, 16), (5, 3)).double()
    prompts = _prompts(model)

    def run():
        torch.manual_seed(2)
        return _rows(model.generate(prompts, filter_thres=0.3, enable_progress=False))

    assert run() == _python_decoder(monkeypatch, run)
    assert len(runtime_calls) == 1


class _Recorder:
    """A stream recording (row, byte) in the order of the writes across all rows."""

    def __init__(self, log: list, row: int) -> None:
        self.log, self.row = log, row

    def write(self, byte: int) -> None:
        self.log.append((self.row, byte))

    def flush(self) -> None:
        self.log.append((self.row, "flush"))


def test_streams_eos_and_progress_match(monkeypatch, runtime_calls):
    model = MODELS["tf3_fixed"]()
    prompts = [_sequence(n, seed=n) for n in (2, 0, 5)]
    eos = model.generate(prompts[0], num_tokens_to_generate=8)[2 + 3].item()
    bars: list[list] = []

    class FakeBar:
        def __init__(self, total, leave):
            bars.append([total, 0, False])

        def update(self, n):
            bars[-1][1] += n

        def close(self):
            bars[-1][2] = True

    monkeypatch.setattr(decoding, "tqdm", FakeBar)
    monkeypatch.setattr(runtime_decoding, "tqdm", FakeBar)

    def run():
        log: list = []
        streams = [_Recorder(log, 0), None, _Recorder(log, 2)]
        out = model.generate(prompts, streams, num_tokens_to_generate=8, end_of_gen_token_id=eos)
        unstreamed = model.generate(prompts, num_tokens_to_generate=8, end_of_gen_token_id=eos)
        return _rows(out), log, _rows(unstreamed)

    got = run()
    want = _python_decoder(monkeypatch, run)
    assert got == want
    assert len(runtime_calls) == 3  # eos, then run()'s two calls
    rows, log, _ = got
    assert rows[0][-1] == eos and len(rows[0]) < 2 + 8  # row 0 stopped early
    assert [b for r, b in log if r == 0][:-1] == rows[0][2:]
    assert [b for r, b in log if r == 2][:-1] == rows[2][5:]
    assert len(bars) == 2 and bars[0] == bars[1] and bars[0][0] == 8 and bars[0][2]


def test_a_failing_stream_stops_the_runtime(runtime_calls):
    model = MODELS["mamba1_2"]()

    class Broken:
        def write(self, byte):
            raise OSError("disk full")

        def flush(self):
            pass

    with pytest.raises(OSError, match="disk full"):
        model.generate(_sequence(2), Broken(), num_tokens_to_generate=4)
    assert len(runtime_calls) == 1


def test_model_copies_subclasses_and_loaded_weights(monkeypatch, runtime_calls):
    model = MODELS["hybrid2_m1_tf"]()
    prompt = _sequence(4)
    want = model.generate(prompt, num_tokens_to_generate=9).tolist()
    assert not any(key.startswith("_config") for key in model.state_dict())

    class Sub(MBLM):
        pass

    other = Sub(model._config).eval()
    other.load_state_dict(model.state_dict())
    assert other.generate(prompt, num_tokens_to_generate=9).tolist() == want
    copied = copy.deepcopy(model)
    assert copied.generate(prompt, num_tokens_to_generate=9).tolist() == want
    assert len(runtime_calls) == 3
    # weights changed in place after a first call are the ones the next call decodes with
    with torch.no_grad():
        other.to_logits.bias.add_(torch.linspace(-3, 3, other.num_tokens))
    changed = other.generate(prompt, num_tokens_to_generate=9).tolist()
    assert changed != want
    assert changed == _python_decoder(
        monkeypatch, lambda: other.generate(prompt, num_tokens_to_generate=9).tolist()
    )


def _lstm_block():
    class LSTM(torch.nn.Module):
        def __init__(self, dim: int, layers: int) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(dim, dim, num_layers=layers, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lstm(x)[0]

    class LSTMBlock(StageBlock):
        block_type: str = "lstm"

        def to_model(self, model_dim: int, num_layers: int) -> torch.nn.Module:
            return LSTM(model_dim, num_layers)

    return LSTMBlock()


def _fallback_cases():
    def lstm():
        torch.manual_seed(0)
        cfg = MBLMModelConfig(
            num_tokens=40,
            pad_token_id=0,
            hidden_dims=[16, 8],
            seq_lens=[5, 3],
            num_layers=[1, 1],
            train_checkpoint_chunks=None,
            block=[_lstm_block(), _tf()],
        )
        return MBLM(cfg).eval()

    def bf16():
        return MODELS["tf2_fixed_rot"]().to(torch.bfloat16)

    def dropout_training():
        torch.manual_seed(0)
        block = _tf("fixed").model_copy(update={"ff_dropout": 0.5})
        model = _model([block, _tf()], (16, 8), (5, 3))
        return model.train()

    def no_config():
        model = MODELS["tf2_fixed_rot"]()
        del model._config  # e.g. a model pickled by an older mblm-cpp
        return model

    def refused():
        model = MODELS["tf3_fixed"]()
        model._config.num_layers = [1, 2, 1]  # the runtime misses stage 1's second layer
        return model

    return {f.__name__: f for f in (lstm, bf16, dropout_training, no_config, refused)}


FALLBACKS = _fallback_cases()


@pytest.mark.filterwarnings("ignore:MBLM.generate. no inference cache")
@pytest.mark.parametrize("case", sorted(FALLBACKS))
def test_unsupported_models_fall_back_to_python(case, monkeypatch, runtime_calls):
    model = FALLBACKS[case]()
    assert runtime_decoding.runtime_model(model, None) is None

    def run():
        torch.manual_seed(4)
        return _rows(model.generate([_sequence(2), _sequence(0)], num_tokens_to_generate=6))

    got = run()
    assert runtime_calls == []
    assert [len(r) for r in got] == [8, 6]
    if case != "dropout_training":  # dropout draws from the generator: compare seeded runs
        assert got == _python_decoder(monkeypatch, run)


def test_training_mode_without_dropout_uses_the_runtime(runtime_calls):
    model = MODELS["tf2_none_rot"]().train()
    model.generate(_sequence(2), num_tokens_to_generate=3)
    assert len(runtime_calls) == 1


def test_switches_force_the_python_decoder(monkeypatch, runtime_calls):
    model = MODELS["mamba2_2"]()
    monkeypatch.setenv("MBLM_DECODER", "python")
    model.generate(_sequence(2), num_tokens_to_generate=3)
    assert runtime_calls == []
    monkeypatch.setenv("MBLM_DECODER", "")
    model.generate(_sequence(2), num_tokens_to_generate=3)
    assert len(runtime_calls) == 1
    monkeypatch.setattr(decoding, "RUNTIME_DECODING", False)
    model.generate(_sequence(2), num_tokens_to_generate=3)
    model.generate(_sequence(2), num_tokens_to_generate=3, use_cache=False)
    assert len(runtime_calls) == 1


def test_binding_errors_are_python_exceptions():
    model = MODELS["tf2_fixed_rot"]()
    config = model._config.model_dump()
    tensors = model.state_dict()
    runtime = RuntimeModel(config, dict(tensors))
    with pytest.raises(ValueError, match="missing tensor 'to_logits.bias'"):
        RuntimeModel(config, {k: v for k, v in tensors.items() if k != "to_logits.bias"})
    with pytest.raises(
        ValueError, match=r"config.block\[1\].attn_num_heads: expected an int, got 'x'"
    ):
        bad = dict(config, block=[config["block"][0], dict(config["block"][1], attn_num_heads="x")])
        RuntimeModel(bad, dict(tensors))
    with pytest.raises(ValueError, match="block_type: the runtime decodes"):
        RuntimeModel(dict(config, block=dict(config["block"][0], block_type="lstm")), tensors)
    args = dict(temperature=1.0, filter_thres=1.0, end_of_gen_token_id=-1)
    gen = torch.default_generator
    with pytest.raises(ValueError, match="steps: one count per prompt"):
        runtime.generate([_sequence(2)], [3, 3], generator=gen, **args)
    with pytest.raises(ValueError, match=r"prime\[0\] ids must lie in \[0, num_tokens\)"):
        runtime.generate([torch.tensor([1, 99])], [3], generator=gen, **args)
    with pytest.raises(TypeError):
        runtime.generate([_sequence(2)], [3], generator=None, **args)
    out = runtime.generate([_sequence(2), _sequence(0)], [3, 0], generator=gen, **args)
    assert [len(r) for r in out] == [5, 0]
