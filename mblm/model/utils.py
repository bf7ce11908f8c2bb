"""Model helpers: sampling, parameter counting, the model-level RoPE and reshaping modules."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def log(t: torch.Tensor, eps: float = 1e-20) -> torch.Tensor:
    """``log(max(t, eps))``."""
    return torch.log(t.clamp(min=eps))


def gumbel_noise(t: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise shaped like ``t`` (draws ``U(0, 1)`` from the global generator)."""
    noise = torch.zeros_like(t).uniform_(0, 1)
    return -log(-log(noise))


def gumbel_sample(logits: torch.Tensor, temperature: float = 1.0, dim: int = -1) -> torch.Tensor:
    """Gumbel-max sampling: ``argmax(logits / temperature + gumbel_noise)`` along ``dim``."""
    return ((logits / temperature) + gumbel_noise(logits)).argmax(dim=dim)


def top_k(logits: torch.Tensor, thres: float = 0.5) -> torch.Tensor:
    """Keeps the ``max(int((1 - thres) * V), 1)`` largest logits of every row of a (B, V)
    tensor and sets the rest to ``-inf``."""
    k = max(int((1 - thres) * logits.shape[-1]), 1)
    val, ind = torch.topk(logits, k)
    probs = torch.full_like(logits, float("-inf"))
    probs.scatter_(1, ind, val)
    return probs


ParamType = nn.Module | nn.ModuleList | nn.Parameter | nn.ParameterList


def _count(modules: Iterable[ParamType]) -> int:
    total = 0
    for module in modules:
        if isinstance(module, nn.Parameter):
            total += module.numel()
        else:
            total += sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total


def count_params(
    main_module: ParamType,
    *submodules: tuple[str, Iterable[ParamType]],
) -> tuple[int, dict[str, int]]:
    """Trainable parameter elements of ``main_module`` and of each named group of modules (a
    bare ``nn.Parameter`` in a group counts whether or not it requires grad)."""
    groups = {name: _count(modules) for name, modules in submodules}
    return _count([main_module]), groups


class RoPE(torch.nn.Module):
    """Rotary positional embedding with interleaved pairs (torchtune's layout), model level.

    ``theta_i = base^(-2i / dim)``; the pair ``(x[2i], x[2i+1])`` at position ``p`` is rotated by
    the angle ``p * theta_i``. Computed in float32 and returned in the input dtype. The cos/sin
    cache covers ``max_seq_len`` positions and is rebuilt (and ``max_seq_len`` raised) when a
    longer input arrives. ``theta`` and ``cache`` are non-persistent buffers (no state_dict keys).

    Args:
        dim: the rotated width (even).
        max_seq_len: positions cached up front.
        base: the base of the geometric frequency progression.
    """

    cache: torch.Tensor
    theta: torch.Tensor

    def __init__(self, dim: int, max_seq_len: int, base: int = 10_000) -> None:
        super().__init__()
        self.dim = dim
        self.base = base
        self.max_seq_len = max_seq_len
        self._rope_init()

    def reset_parameters(self) -> None:
        """Recomputes the buffers (FSDP meta-device initialisation calls this)."""
        self._rope_init()

    def _rope_init(self) -> None:
        exponents = torch.arange(0, self.dim, 2)[: self.dim // 2].float() / self.dim
        self.register_buffer("theta", 1.0 / (self.base**exponents), persistent=False)
        self.build_rope_cache(self.max_seq_len)

    def build_rope_cache(self, max_seq_len: int) -> None:
        """Caches ``(cos, sin)`` of every position < ``max_seq_len``: [max_seq_len, dim // 2, 2]."""
        positions = torch.arange(max_seq_len, dtype=self.theta.dtype, device=self.theta.device)
        angles = torch.outer(positions, self.theta).float()
        cache = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
        self.register_buffer("cache", cache, persistent=False)

    def forward(self, x: torch.Tensor, *, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x: [b, s, n_h, h_d]; input_pos: optional position ids ([b, s] or [s]), else 0..s-1."""
        seq_len = x.size(1)
        if seq_len > self.max_seq_len:
            self.max_seq_len = seq_len
            self.build_rope_cache(seq_len)
        rope_cache = self.cache[:seq_len] if input_pos is None else self.cache[input_pos]
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        rope_cache = rope_cache.view(-1, pairs.size(1), 1, pairs.size(3), 2)
        cos, sin = rope_cache[..., 0], rope_cache[..., 1]
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], -1)
        return rotated.flatten(3).type_as(x)


class Rearrange(nn.Module):
    """The three parameterless einops reshapes the MBLM module tree uses, without einops.

    Kept as modules (not inlined) so that ``nn.Sequential`` indices, and therefore state_dict
    keys, are those of the original. Supported patterns:

    - ``"... r d -> ... (r d)"``: merge the last two axes.
    - ``"b ... d -> b (...) d"``: merge every axis between the first and the last.
    - ``"b m (n d) -> (b m) n d"`` with ``n=...``: split the features into ``n`` rows and merge
      the first two axes.
    """

    _PATTERNS = (
        "... r d -> ... (r d)",
        "b ... d -> b (...) d",
        "b m (n d) -> (b m) n d",
    )

    def __init__(self, pattern: str, **axes: int) -> None:
        super().__init__()
        if pattern not in self._PATTERNS:
            raise ValueError(f"Rearrange: unsupported pattern {pattern!r}")
        if pattern == self._PATTERNS[2] and set(axes) != {"n"}:
            raise ValueError(f"Rearrange {pattern!r} needs the axis size n=...")
        self.pattern = pattern
        self.axes = axes

    def extra_repr(self) -> str:
        sizes = "".join(f", {k}={v}" for k, v in self.axes.items())
        return f"{self.pattern!r}{sizes}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern == self._PATTERNS[0]:
            return x.flatten(-2)
        if self.pattern == self._PATTERNS[1]:
            return x.reshape(x.shape[0], -1, x.shape[-1])
        n = self.axes["n"]
        return x.reshape(x.shape[0] * x.shape[1], n, x.shape[2] // n)


def prod(values: Iterable[int]) -> int:
    """``math.prod`` of plain ints (1 for an empty sequence)."""
    return math.prod(int(v) for v in values)
