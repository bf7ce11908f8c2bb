"""``MBLM.generate``'s cached decoding on the C++ runtime (``mblm._C.RuntimeModel``, csrc/runtime).

The runtime is a port of ``mblm.model.decoding``'s ``HierarchicalDecoder`` and sampling loop to
C++: the same bytes, greedy and sampled (the Gumbel noise is drawn from the same generator in
the same order, so the generator's state afterwards is the same too), without Python's per-op
overhead. ``runtime_model`` says whether a call can run there and builds the runtime's model over
the module's own tensors (no copies); ``generate_on_runtime`` runs the loop with the streaming,
progress bar and outputs of the Python decoder. Everything else (CUDA, float16/bfloat16, custom
stage blocks, active dropout, models without a stored config) stays on the Python decoder.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from mblm.model.cache import supports_cache
from mblm.model.config import MBLMModelConfig
from mblm.model.utils import RoPE
from mblm.ops._loader import load_extension
from mblm.utils.stream import ByteStreamer

__all__ = ["generate_on_runtime", "runtime_model"]

_DTYPES = (torch.float32, torch.float64)


def _pos_emb_matches(module: nn.Module, pos_emb_type: str | None) -> bool:
    """Whether a stage's positional module is the one its config block describes (a subclass
    may build its own)."""
    expected = {None: nn.Identity, "fixed": nn.Embedding, "rope": RoPE}.get(pos_emb_type)
    return expected is not None and type(module) is expected


def _dropout_active(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.training and m.p > 0 for m in model.modules())


def runtime_model(model: nn.Module, generator: torch.Generator | None) -> Any | None:
    """The runtime's model over ``model``'s tensors when this call can decode there, else None:
    needs the extension's runtime, the config ``MBLM.__init__`` stores, causal Transformer /
    Mamba1 / Mamba2 stages matching it, every floating-point tensor on the CPU in one dtype
    (float32 or float64), a CPU generator (or None) and no active dropout. A model the runtime
    refuses (ValueError/RuntimeError from its checks) is None as well."""
    runtime_class = getattr(load_extension(), "RuntimeModel", None)
    config = getattr(model, "_config", None)
    if runtime_class is None or not isinstance(config, MBLMModelConfig):
        return None
    if generator is not None and generator.device.type != "cpu":
        return None
    if not all(supports_cache(m) for m in model.stage_models) or _dropout_active(model):
        return None
    blocks = config.stage_blocks()
    if len(blocks) != len(model.pos_embs) or not all(
        _pos_emb_matches(m, b.pos_emb_type) for m, b in zip(model.pos_embs, blocks, strict=True)
    ):
        return None
    tensors = model.state_dict()
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) != 1 or dtypes.pop() not in _DTYPES:
        return None
    if any(t.device.type != "cpu" for t in tensors.values()):
        return None
    try:
        return runtime_class(config.model_dump(), dict(tensors))
    except (ValueError, RuntimeError):
        return None


def generate_on_runtime(
    runtime: Any,
    prompts: list[Tensor],
    steps: list[int],
    streams: list[ByteStreamer | None],
    eos: int,
    progress: bool,
    sampling: dict,
) -> list[Tensor]:
    """``_generate_cached`` of ``mblm.model.decoding`` on the runtime: every byte goes to its
    row's stream as it is generated, the progress bar advances once per step."""
    active = [n for n in steps if n > 0]
    bar = tqdm(total=max(active), leave=False) if progress and active else None
    last_row = len(prompts)

    def on_byte(row: int, byte: int) -> None:
        nonlocal last_row
        # a step's bytes come in increasing row order: a row not after the last starts a step
        if bar is not None and row <= last_row:
            bar.update(1)
        last_row = row
        stream = streams[row]
        if stream is not None:
            stream.write(byte)

    streaming = any(s is not None for s in streams)
    generator = sampling["generator"]
    try:
        return runtime.generate(
            prompts,
            steps,
            temperature=float(sampling["temperature"]),
            filter_thres=float(sampling["filter_thres"]),
            end_of_gen_token_id=int(eos),
            generator=torch.default_generator if generator is None else generator,
            on_byte=on_byte if bar is not None or streaming else None,
        )
    finally:
        if bar is not None:
            bar.close()
