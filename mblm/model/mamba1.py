"""Mamba1 stage with mambapy 1.2.0's parameter tree, initialisation and RNG order.

The original mblm builds ``mambapy.mamba.Mamba`` when mamba_ssm is missing. This module builds the
same tree (``layers.<l>.mixer.{A_log, D, in_proj, conv1d, x_proj, dt_proj, out_proj}``,
``layers.<l>.norm.weight``, no final norm), draws its random initial values in the same order (so a
seeded construction gives the same weights as mambapy), and computes the same function through
the ``mblm.ops`` primitives (causal depthwise conv, selective scan).

Each residual layer is ``x + mixer(rmsnorm(x))`` (Gu & Dao, "Mamba", arXiv:2312.00752, Fig. 3):
the mixer expands to ``ED = expand_factor * d_model`` channels, splits into a convolved, SiLU'd
branch fed to the input-dependent SSM and a SiLU gate, and projects back to ``d_model``.

Stepping: ``Mamba.step(x, caches)`` follows mambapy's signature; a layer cache is ``(h, inputs)``
with ``h`` (B, ED, N) the SSM state (None at the start) and ``inputs`` (B, ED, d_conv - 1) the
last conv inputs. ``MambaBlock.forward_with_state`` runs any number of steps from a state and
returns the state to continue from (chunked scoring, prefill).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mblm.ops.conv import causal_conv1d, causal_conv1d_step
from mblm.ops.scan import selective_scan, selective_scan_step

Cache = tuple[Tensor | None, Tensor]


@dataclass
class MambaConfig:
    """mambapy-compatible configuration (same fields and defaults as ``mambapy.mamba.MambaConfig``).

    ``pscan`` and ``use_cuda`` choose an execution path in mambapy; here the ``mblm.ops``
    primitives always run, so they do not change anything.
    """

    d_model: int
    n_layers: int
    dt_rank: int | str = "auto"
    d_state: int = 16
    expand_factor: int = 2
    d_conv: int = 4

    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init: str = "random"
    dt_scale: float = 1.0
    dt_init_floor = 1e-4  # a class attribute in mambapy too (not a constructor argument)

    rms_norm_eps: float = 1e-5
    base_std: float = 0.02

    bias: bool = False
    conv_bias: bool = True
    inner_layernorms: bool = False

    mup: bool = False
    mup_base_width: float = 128

    pscan: bool = True
    use_cuda: bool = False

    def __post_init__(self) -> None:
        self.d_inner = self.expand_factor * self.d_model
        if self.dt_rank == "auto":
            self.dt_rank = math.ceil(self.d_model / 16)
        if self.dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {self.dt_init!r}")
        if self.mup:
            self.mup_width_mult = self.d_model / self.mup_base_width


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight`` (no weight when ``use_mup``, as in mambapy)."""

    def __init__(self, d_model: int, eps: float = 1e-5, use_mup: bool = False) -> None:
        super().__init__()
        self.use_mup = use_mup
        self.eps = eps
        if not use_mup:
            self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return out if self.use_mup else out * self.weight


class MambaBlock(nn.Module):
    """The Mamba1 mixer: in_proj -> (causal conv + SiLU -> selective SSM) * SiLU(z) -> out_proj."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        ed, rank, n = config.d_inner, int(config.dt_rank), config.d_state

        # Construction order = mambapy's, so the default initialisers draw the same numbers.
        self.in_proj = nn.Linear(config.d_model, 2 * ed, bias=config.bias)
        self.conv1d = nn.Conv1d(
            ed, ed, kernel_size=config.d_conv, bias=config.conv_bias, groups=ed,
            padding=config.d_conv - 1,
        )  # fmt: skip
        self.x_proj = nn.Linear(ed, rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(rank, ed, bias=True)

        std = rank**-0.5 * config.dt_scale
        if config.dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        # dt log-uniform in [dt_min, dt_max], floored; the bias is its softplus inverse.
        log_lo, log_hi = math.log(config.dt_min), math.log(config.dt_max)
        dt = torch.exp(torch.rand(ed) * (log_hi - log_lo) + log_lo).clamp(min=config.dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

        # S4D-real initialisation: A[d, n] = -(n + 1), stored as log(-A).
        a = torch.arange(1, n + 1, dtype=torch.float32).repeat(ed, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(ed))
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(ed, config.d_model, bias=config.bias)

        if config.inner_layernorms:
            self.dt_layernorm = RMSNorm(rank, config.rms_norm_eps, config.mup)
            self.B_layernorm = RMSNorm(n, config.rms_norm_eps, config.mup)
            self.C_layernorm = RMSNorm(n, config.rms_norm_eps, config.mup)
        else:
            self.dt_layernorm = self.B_layernorm = self.C_layernorm = None

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        return self.forward_with_state(x, None, None)[0]

    def forward_with_state(
        self, x: Tensor, conv_state: Tensor | None, ssm_state: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Runs x (B, L, D) from the given states (None = start of the sequence).

        conv_state: (B, ED, d_conv - 1) the previous conv inputs; ssm_state: (B, ED, N).
        Returns (out (B, L, D), conv_state, ssm_state) after the last step.
        """
        if x.shape[1] == 1 and conv_state is not None and not torch.is_grad_enabled():
            return self._decode_step(x, conv_state, ssm_state)
        cfg = self.config
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs, conv_state = causal_conv1d(
            xs.transpose(1, 2), self.conv1d.weight[:, 0], self.conv1d.bias, conv_state, True
        )
        dbc = self.x_proj(xs.transpose(1, 2))
        delta, b, c = torch.split(dbc, [int(cfg.dt_rank), cfg.d_state, cfg.d_state], dim=-1)
        if self.dt_layernorm is not None:
            delta, b, c = self.dt_layernorm(delta), self.B_layernorm(b), self.C_layernorm(c)
        # dt_proj's matmul here, its bias and the softplus inside the scan (as mambapy does).
        delta = (delta @ self.dt_proj.weight.t()).transpose(1, 2)  # channel-contiguous (B, ED, L)
        y, ssm_state = selective_scan(
            xs,
            delta,
            -torch.exp(self.A_log.float()),
            b.transpose(1, 2),
            c.transpose(1, 2),
            self.D.float(),
            z=z.transpose(1, 2),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            initial_state=ssm_state,
        )
        return self.out_proj(y.transpose(1, 2)), conv_state, ssm_state

    def _decode_step(
        self, x: Tensor, conv_state: Tensor, ssm_state: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``forward_with_state`` of one position (x (B, 1, D)) on the single-step ops
        (conv1d_update, scan_update): no sequence-shaped intermediates, no checkpoints."""
        cfg = self.config
        xs, z = self.in_proj(x[:, 0]).chunk(2, dim=-1)
        xs, conv_state = causal_conv1d_step(
            xs.contiguous(), conv_state, self.conv1d.weight[:, 0], self.conv1d.bias, True
        )
        delta, b, c = torch.split(
            self.x_proj(xs), [int(cfg.dt_rank), cfg.d_state, cfg.d_state], dim=-1
        )
        if self.dt_layernorm is not None:
            delta, b, c = self.dt_layernorm(delta), self.B_layernorm(b), self.C_layernorm(c)
        y, ssm_state = selective_scan_step(
            ssm_state,
            xs,
            delta @ self.dt_proj.weight.t(),
            -torch.exp(self.A_log.float()),
            b,
            c,
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        return self.out_proj(y)[:, None], conv_state, ssm_state

    def step(self, x: Tensor, cache: Cache) -> tuple[Tensor, Cache]:
        """One token. x: (B, D); cache: (h (B, ED, N) or None, inputs (B, ED, d_conv - 1))."""
        h, inputs = cache
        out, inputs, h = self.forward_with_state(x[:, None], inputs, h)
        return out[:, 0], (h, inputs)


class ResidualBlock(nn.Module):
    """``mixer(norm(x)) + x``."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.mixer = MambaBlock(config)
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps, config.mup)

    def forward(self, x: Tensor) -> Tensor:
        return self.mixer(self.norm(x)) + x

    def step(self, x: Tensor, cache: Cache) -> tuple[Tensor, Cache]:
        out, cache = self.mixer.step(self.norm(x), cache)
        return out + x, cache


class Mamba(nn.Module):
    """A stack of residual Mamba1 layers (no final norm). forward: (B, L, D) -> (B, L, D)."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([ResidualBlock(config) for _ in range(config.n_layers)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_with_state(
        self, x: Tensor, state: list[tuple[Tensor, Tensor]] | None = None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Runs x (B, L, D) from ``state`` (None = start of the sequence) and returns the output and
        the state after the last step: one (conv_state (B, ED, d_conv - 1), ssm_state (B, ED, N))
        per layer. Running a sequence in pieces, passing the state along, equals one full run."""
        new_state = []
        for i, layer in enumerate(self.layers):
            conv, ssm = state[i] if state is not None else (None, None)
            y, conv, ssm = layer.mixer.forward_with_state(layer.norm(x), conv, ssm)
            x = y + x
            new_state.append((conv, ssm))
        return x, new_state

    def step(self, x: Tensor, caches: list[Cache]) -> tuple[Tensor, list[Cache]]:
        """One token through every layer. x: (B, D); caches: one (h, inputs) per layer."""
        for i, layer in enumerate(self.layers):
            x, caches[i] = layer.step(x, caches[i])
        return x, caches

    def init_caches(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> list[Cache]:
        """Empty caches for ``step``: h None, inputs zeros (B, ED, d_conv - 1)."""
        weight = self.layers[0].mixer.in_proj.weight if len(self.layers) else None
        device = device if device is not None else (weight.device if weight is not None else None)
        dtype = dtype if dtype is not None else (weight.dtype if weight is not None else None)
        cfg = self.config
        return [
            (None, torch.zeros(batch_size, cfg.d_inner, cfg.d_conv - 1, device=device, dtype=dtype))
            for _ in self.layers
        ]
