"""Mamba2 stage with mamba_ssm 2.2.x's parameter tree, initialisation and RNG order.

The original mblm builds ``Mamba2Mixer`` (mamba_ssm's ``MixerModel`` without the embedding: a
stack of ``Block(norm=RMSNorm, mixer=Mamba2)`` and a final ``norm_f``) when mamba_ssm is
importable. This module builds the same tree::

    layers.<l>.norm.weight                 [D]
    layers.<l>.mixer.dt_bias               [H]
    layers.<l>.mixer.A_log                 [H]
    layers.<l>.mixer.D                     [H]
    layers.<l>.mixer.in_proj.weight        [2*Di + 2*G*N + H, D]
    layers.<l>.mixer.conv1d.weight         [Di + 2*G*N, 1, d_conv]
    layers.<l>.mixer.conv1d.bias           [Di + 2*G*N]
    layers.<l>.mixer.norm.weight           [Di]
    layers.<l>.mixer.out_proj.weight       [D, Di]
    norm_f.weight                          [D]

(``Di = expand * D``, ``H = Di / headdim``, ``G = ngroups``, ``N = d_state``), with the same
initialisation in the same RNG order, and computes the same function on every device through the
``mblm.ops`` primitives: causal depthwise conv over ``[x, B, C]``, the SSD scan (Dao & Gu,
"Transformers are SSMs", arXiv:2405.21060, §7), the gated RMSNorm and the residual stream
``x_{l+1} = x_l + Mamba2_l(RMSNorm_l(x_l))``, ``out = RMSNorm_f(x_L)``.

One deliberate difference: the final-norm dropout is applied in training mode only (the original
passes its dropout probability to mamba_ssm's fused norm unconditionally, so it also drops in eval).

Stepping: ``Mamba2.step(x, conv_state, ssm_state)`` takes conv_state (B, Di + 2*G*N, d_conv - 1),
the previous conv inputs, and ssm_state (B, H, headdim, N), and returns new states (it does not
mutate its arguments; mamba_ssm keeps a conv state of width d_conv and updates it in place).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mblm.ops.conv import causal_conv1d, causal_conv1d_step
from mblm.ops.ssd import ssd_scan, ssd_step

State = tuple[Tensor, Tensor]


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` in float32 (float64 for float64 x), cast back."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(cdt)
    out = xc * torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps) * weight.to(cdt)
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    """mamba_ssm's RMSNorm (weight only; ``bias`` is a registered None). ``dropout_p`` adds a
    ``drop`` module applied to the input of the final residual add (see ``Mamba2Mixer``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, dropout_p: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.drop = nn.Dropout(dropout_p) if dropout_p > 0.0 else None
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        return _rms_norm(x, self.weight, self.eps)


class RMSNormGated(nn.Module):
    """Gated RMSNorm: ``rmsnorm(x * silu(z))`` (or ``rmsnorm(x) * silu(z)`` when
    ``norm_before_gate``), normalising groups of ``group_size`` channels (all when None)."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        group_size: int | None = None,
        norm_before_gate: bool = True,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        xc = x.to(cdt)
        gate = F.silu(z.to(cdt)) if z is not None else None
        if gate is not None and not self.norm_before_gate:
            xc = xc * gate
        size = self.group_size or xc.shape[-1]
        grouped = xc.unflatten(-1, (-1, size))
        grouped = grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + self.eps)
        out = grouped.flatten(-2) * self.weight.to(cdt)
        if gate is not None and self.norm_before_gate:
            out = out * gate
        return out.to(x.dtype)


class GatedMLP(nn.Module):
    """SiLU-gated MLP of mamba_ssm (only built when ``intermediate_factor > 0``)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        bias: bool = False,
        multiple_of: int = 128,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden = hidden_features if hidden_features is not None else int(8 * in_features / 3)
        hidden = -(-hidden // multiple_of) * multiple_of
        self.fc1 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))


class Mamba2(nn.Module):
    """The Mamba2 mixer: in_proj -> [z, xBC, dt]; causal conv + SiLU on xBC; SSD scan over heads;
    gated RMSNorm with z; out_proj. Arguments as mamba_ssm's ``Mamba2`` (single process)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: float | None = None,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        layer_idx: int | None = None,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * d_model
        self.headdim = headdim
        if self.d_inner % headdim != 0:
            raise ValueError(
                f"headdim ({headdim}) must divide expand * d_model ({expand} * {d_model} = "
                f"{self.d_inner})"
            )
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups != 0:
            raise ValueError(f"ngroups ({ngroups}) must divide the number of heads ({self.nheads})")
        self.ngroups = ngroups
        self.D_has_hdim = D_has_hdim
        self.rmsnorm = rmsnorm
        self.norm_before_gate = norm_before_gate
        self.dt_limit = dt_limit
        self.chunk_size = chunk_size  # the chunked SSD's block size; no effect on the result
        self.layer_idx = layer_idx

        # Construction order = mamba_ssm's, so the default initialisers draw the same numbers.
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, kernel_size=d_conv, bias=conv_bias,
            groups=self.conv_dim, padding=d_conv - 1,
        )  # fmt: skip
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

        # dt log-uniform in [dt_min, dt_max], floored; dt_bias is its softplus inverse.
        log_lo, log_hi = math.log(dt_min), math.log(dt_max)
        dt = torch.exp(torch.rand(self.nheads) * (log_hi - log_lo) + log_lo)
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.dt_bias._no_weight_decay = True

        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range must satisfy 0 < lo <= hi, got {A_init_range}")
        a = torch.empty(self.nheads, dtype=torch.float32).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(a))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner if D_has_hdim else self.nheads))
        self.D._no_weight_decay = True

        if rmsnorm:
            self.norm = RMSNormGated(
                self.d_inner, eps=1e-5, norm_before_gate=norm_before_gate,
                group_size=self.d_inner // ngroups,
            )  # fmt: skip
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, u: Tensor) -> Tensor:
        """u: (B, L, D) -> (B, L, D)."""
        return self.forward_with_state(u, None, None)[0]

    def forward_with_state(
        self, u: Tensor, conv_state: Tensor | None, ssm_state: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Runs u (B, L, D) from the given states (None = start of the sequence).

        conv_state: (B, Di + 2*G*N, d_conv - 1); ssm_state: (B, H, headdim, N).
        Returns (out (B, L, D), conv_state, ssm_state) after the last step.
        """
        batch, length, _ = u.shape
        if length == 1 and conv_state is not None and ssm_state is not None:
            if not torch.is_grad_enabled():
                return self._decode_step(u, conv_state, ssm_state)
        gn = self.ngroups * self.d_state
        z, xbc, dt = torch.split(
            self.in_proj(u), [self.d_inner, self.conv_dim, self.nheads], dim=-1
        )
        xbc, conv_state = causal_conv1d(
            xbc.transpose(1, 2), self.conv1d.weight[:, 0], self.conv1d.bias, conv_state, True
        )
        x, b, c = torch.split(xbc.transpose(1, 2), [self.d_inner, gn, gn], dim=-1)
        dt, dt_bias, softplus, d = self._ssd_inputs(dt)
        y, ssm_state = ssd_scan(
            x.reshape(batch, length, self.nheads, self.headdim),
            dt,
            -torch.exp(self.A_log.float()),
            b.reshape(batch, length, self.ngroups, self.d_state),
            c.reshape(batch, length, self.ngroups, self.d_state),
            d,
            dt_bias=dt_bias,
            dt_softplus=softplus,
            initial_state=ssm_state,
        )
        return self._gate_out(y.reshape(batch, length, self.d_inner), z), conv_state, ssm_state

    def _ssd_inputs(self, dt: Tensor) -> tuple[Tensor, Tensor | None, bool, Tensor]:
        """(dt, dt_bias, dt_softplus, D) as the SSD ops take them (dt_limit applied here)."""
        dt_bias, softplus = self.dt_bias.float(), True
        if self.dt_limit != (0.0, float("inf")):
            dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)
            dt_bias, softplus = None, False
        d = self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D
        return dt, dt_bias, softplus, d.float()

    def _gate_out(self, y: Tensor, z: Tensor) -> Tensor:
        y = self.norm(y, z) if self.rmsnorm else y * F.silu(z)
        return self.out_proj(y)

    def _decode_step(
        self, u: Tensor, conv_state: Tensor, ssm_state: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``forward_with_state`` of one position (u (B, 1, D)) on the single-step ops
        (conv1d_update, ssd_update)."""
        batch = u.shape[0]
        gn = self.ngroups * self.d_state
        z, xbc, dt = torch.split(
            self.in_proj(u[:, 0]), [self.d_inner, self.conv_dim, self.nheads], dim=-1
        )
        xbc, conv_state = causal_conv1d_step(
            xbc.contiguous(), conv_state, self.conv1d.weight[:, 0], self.conv1d.bias, True
        )
        x, b, c = torch.split(xbc, [self.d_inner, gn, gn], dim=-1)
        dt, dt_bias, softplus, d = self._ssd_inputs(dt)
        y, ssm_state = ssd_step(
            ssm_state,
            x.reshape(batch, self.nheads, self.headdim),
            dt.contiguous(),
            -torch.exp(self.A_log.float()),
            b.reshape(batch, self.ngroups, self.d_state),
            c.reshape(batch, self.ngroups, self.d_state),
            d,
            dt_bias=dt_bias,
            dt_softplus=softplus,
        )
        return self._gate_out(y.reshape(batch, 1, self.d_inner), z[:, None]), conv_state, ssm_state

    def step(
        self, x: Tensor, conv_state: Tensor | None, ssm_state: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One token. x: (B, 1, D) or (B, D); returns (out shaped like x, conv_state, ssm_state)."""
        squeeze = x.dim() == 2
        out, conv_state, ssm_state = self.forward_with_state(
            x[:, None] if squeeze else x, conv_state, ssm_state
        )
        return (out[:, 0] if squeeze else out), conv_state, ssm_state

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int = 0, dtype: torch.dtype | None = None, **_: object
    ) -> State:
        """Zero states for ``step``: conv (B, Di + 2*G*N, d_conv - 1), ssm (B, H, headdim, N)."""
        w = self.in_proj.weight
        dtype = dtype or w.dtype
        conv = torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=w.device, dtype=dtype)
        ssm = torch.zeros(
            batch_size, self.nheads, self.headdim, self.d_state, device=w.device, dtype=dtype
        )
        return conv, ssm


class Block(nn.Module):
    """mamba_ssm's ``Block``: add the residual, norm, mix (and optionally norm2 + MLP).

    ``forward(hidden, residual)`` returns ``(mixer(norm(hidden + residual)), hidden + residual)``
    (layer 0 gets residual None: the residual is the input itself).
    """

    def __init__(
        self,
        dim: int,
        mixer_cls,
        mlp_cls=None,
        norm_cls=RMSNorm,
        fused_add_norm: bool = True,
        residual_in_fp32: bool = False,
    ) -> None:
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.norm = norm_cls(dim)
        self.mixer = mixer_cls(dim)
        if mlp_cls is not None:
            self.norm2 = norm_cls(dim)
            self.mlp = mlp_cls(dim)
        else:
            self.mlp = None

    def _add_norm(self, norm: RMSNorm, hidden: Tensor, residual: Tensor | None):
        residual = hidden if residual is None else hidden + residual
        normed = norm(residual.to(norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        return normed, residual

    def forward(
        self, hidden_states: Tensor, residual: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        hidden, residual = self._add_norm(self.norm, hidden_states, residual)
        hidden = self.mixer(hidden)
        if self.mlp is not None:
            hidden, residual = self._add_norm(self.norm2, hidden, residual)
            hidden = self.mlp(hidden)
        return hidden, residual

    def step(
        self, hidden_states: Tensor, residual: Tensor | None, state: State
    ) -> tuple[Tensor, Tensor, State]:
        """Runs (B, L, D) (or one token (B, D)) through the block from ``state`` =
        (conv_state, ssm_state), either may be None; returns the new state too."""
        hidden, residual = self._add_norm(self.norm, hidden_states, residual)
        hidden, conv, ssm = self.mixer.step(hidden, *state)
        if self.mlp is not None:
            hidden, residual = self._add_norm(self.norm2, hidden, residual)
            hidden = self.mlp(hidden)
        return hidden, residual, (conv, ssm)


class Mamba2Mixer(nn.Module):
    """A stack of Mamba2 blocks with a final RMSNorm (mamba_ssm's ``MixerModel`` minus the
    embedding), constructed as the original mblm's ``Mamba2Mixer``. forward: (B, L, D) ->
    (B, L, D)."""

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        d_state: int,
        d_conv: int,
        headdim: int,
        expand: int,
        intermediate_factor: int = 0,
        norm_epsilon: float = 1e-5,
        dropout: float = 0.0,
        residual_in_fp32: bool = False,
        fused_add_norm: bool = True,
    ) -> None:
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.dropout = dropout
        norm_cls = partial(RMSNorm, eps=norm_epsilon)
        d_intermediate = intermediate_factor * d_model
        mlp_cls = (
            partial(GatedMLP, hidden_features=d_intermediate, out_features=d_model)
            if d_intermediate > 0
            else None
        )
        self.layers = nn.ModuleList(
            Block(
                d_model,
                partial(
                    Mamba2, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim,
                    layer_idx=i,
                ),
                mlp_cls,
                norm_cls=norm_cls,
                fused_add_norm=fused_add_norm,
                residual_in_fp32=residual_in_fp32,
            )
            for i in range(n_layers)
        )  # fmt: skip
        self.norm_f = RMSNorm(d_model, eps=norm_epsilon, dropout_p=dropout)
        self._rescale_residual_init(n_layers, 1 if d_intermediate == 0 else 2)

    @torch.no_grad()
    def _rescale_residual_init(self, n_layers: int, n_residuals_per_layer: int) -> None:
        """mamba_ssm's ``_init_weights`` as the original applies it (GPT-2 scheme): zero every
        Linear bias, then redraw each residual output projection (``out_proj``/``fc2``) with the
        default Linear initialiser and divide it by ``sqrt(n_residuals_per_layer * n_layers)``.
        ``nn.Module.apply`` visits children before parents, so the redraws happen in layer order
        after all construction draws, exactly as in the original."""
        scale = math.sqrt(n_residuals_per_layer * n_layers)

        def init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear) and module.bias is not None:
                if not getattr(module.bias, "_no_reinit", False):
                    nn.init.zeros_(module.bias)
            for name, p in module.named_parameters():
                if name in ("out_proj.weight", "fc2.weight"):
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                    p /= scale

        self.apply(init)

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int = 0, dtype: torch.dtype | None = None, **kw: object
    ) -> dict[int, State]:
        """Zero (conv_state, ssm_state) per layer index, for ``step``."""
        return {
            i: layer.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype)
            for i, layer in enumerate(self.layers)
        }

    def _final_norm(self, hidden: Tensor, residual: Tensor | None) -> Tensor:
        if self.norm_f.drop is not None:
            hidden = self.norm_f.drop(hidden)  # an nn.Dropout: identity in eval mode
        residual = hidden if residual is None else hidden + residual
        return self.norm_f(residual.to(self.norm_f.weight.dtype)).to(hidden.dtype)

    def forward(self, input_ids: Tensor, inference_params=None, **mixer_kwargs: object) -> Tensor:
        """input_ids: (B, L, D) hidden states (the name is the original's) -> (B, L, D)."""
        if inference_params is not None or mixer_kwargs:
            given = ["inference_params"] if inference_params is not None else []
            raise TypeError(
                "Mamba2Mixer.forward takes only the hidden states; unsupported mamba_ssm "
                f"arguments: {given + sorted(mixer_kwargs)}. For cached decoding use "
                "allocate_inference_cache() with step(), or forward_with_state()"
            )
        hidden, residual = input_ids, None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return self._final_norm(hidden, residual)

    def forward_with_state(
        self, x: Tensor, state: list[State] | None = None
    ) -> tuple[Tensor, list[State]]:
        """Runs x (B, L, D) from ``state`` (None = start of the sequence) and returns the output and
        the state after the last step: one (conv_state (B, Di + 2*G*N, d_conv - 1), ssm_state
        (B, H, headdim, N)) per layer. Running a sequence in pieces, passing the state along,
        equals one full run."""
        hidden, residual, new_state = x, None, []
        for i, layer in enumerate(self.layers):
            hidden, residual, layer_state = layer.step(
                hidden, residual, state[i] if state is not None else (None, None)
            )
            new_state.append(layer_state)
        return self._final_norm(hidden, residual), new_state

    def step(self, x: Tensor, cache: dict[int, State]) -> tuple[Tensor, dict[int, State]]:
        """One token through every layer. x: (B, 1, D) or (B, D); cache from
        ``allocate_inference_cache`` (returned updated, a new dict)."""
        hidden, residual, new_cache = x, None, {}
        for i, layer in enumerate(self.layers):
            hidden, residual, new_cache[i] = layer.step(hidden, residual, cache[i])
        return self._final_norm(hidden, residual), new_cache
