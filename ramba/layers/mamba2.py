"""Mamba2 local mixer, with the parameter layout of `mamba_ssm.modules.mamba2.Mamba2` and document resets."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ramba.config import HSAHybridConfig
from ramba.ops import DocIndex, causal_conv1d, gated_rms_norm, ssd_scan
from ramba.ops.ssd import causal_conv1d_step, gated_rms_norm_ref, ssd_step
from ramba.ops.utils import as_doc_index
from ramba.parallel.context import context_parallel_conv1d, context_parallel_scan
from ramba.parallel.group import active

DT_MIN, DT_MAX, DT_INIT_FLOOR = 1e-3, 0.1, 1e-4
A_INIT_RANGE = (1.0, 16.0)


@dataclass
class Mamba2State:
    """The last d_conv-1 conv inputs [B, d_conv-1, conv_dim] and the SSM state [B, heads, head_dim, d_state]."""

    conv: Tensor
    ssm: Tensor


class GatedRMSNorm(nn.Module):
    """`rmsnorm(y * silu(z)) * weight` over groups of `group_size` channels, in float32 (float64 for
    float64 inputs); y, z: [..., dim] -> y's dtype."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        self.group_size = group_size
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        return gated_rms_norm(y, z, self.weight, self.group_size, self.eps, backend=self.backend)


def _no_weight_decay(param: nn.Parameter) -> nn.Parameter:
    """Tag a parameter that the optimizer should not decay (A, dt bias, D, as in mamba_ssm)."""
    param._no_weight_decay = True
    return param


class Mamba2(nn.Module):
    """Mamba2 mixer: in_proj -> causal conv + silu -> SSD scan -> gated RMSNorm -> out_proj.

    x: [B, L, d_model], docs: optional documents (int ids [B, L], contiguous runs of equal id are documents
    that never interact, or a DocIndex) -> [B, L, d_model]. `config.mamba_reset` (below the memory) and
    `mamba_reset_upper` (above it) restart the SSM state every that many tokens of a document
    (`mamba_reset_stagger`: every second block half a period later). Its ops
    (`ramba.ops.causal_conv1d`, `ssd_scan`, `gated_rms_norm`) run on `config.mamba_backend`.
    """

    def __init__(self, config: HSAHybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.d_model = config.d_model
        self.d_state = config.d_state
        self.d_inner = config.d_inner
        self.headdim = config.mamba_head_dim
        self.nheads = self.d_inner // self.headdim
        self.ngroups = config.n_groups
        self.chunk_size = config.mamba_chunk_size
        self.horizon = config.mamba_horizon
        lower = layer_idx < config.n_lower_layers
        self.reset = config.mamba_reset if lower else config.mamba_reset_upper
        side_idx = layer_idx if lower else layer_idx - config.n_lower_layers  # the block's index on its side
        self.reset_phase = self.reset // 2 if config.mamba_reset_stagger and side_idx % 2 else 0
        self.backend = config.mamba_backend
        conv_dim = self.d_inner + 2 * self.ngroups * self.d_state

        self.in_proj = nn.Linear(self.d_model, self.d_inner + conv_dim + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, config.d_conv, groups=conv_dim, padding=config.d_conv - 1,
                                bias=True)

        dt = torch.exp(torch.rand(self.nheads) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
        dt = dt.clamp(min=DT_INIT_FLOOR)
        self.dt_bias = _no_weight_decay(nn.Parameter(dt + torch.log(-torch.expm1(-dt))))
        A = torch.empty(self.nheads).uniform_(*A_INIT_RANGE)
        self.A_log = _no_weight_decay(nn.Parameter(torch.log(A)))
        self.D = _no_weight_decay(nn.Parameter(torch.ones(self.nheads)))

        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.ngroups, config.norm_eps, self.backend)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=False)

    def allocate_inference_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Mamba2State:
        """An empty state: zero conv inputs, and a zero SSM state in float32 (float64 for float64 models)."""
        conv = torch.zeros(batch_size, self.conv1d.kernel_size[0] - 1, self.conv1d.in_channels, device=device,
                           dtype=dtype)
        ssm = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                          dtype=torch.promote_types(dtype, torch.float32))
        return Mamba2State(conv, ssm)

    def forward(self, x: Tensor, docs: DocIndex | Tensor | None = None, state: Mamba2State | None = None,
                positions: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
        """x: [B, L, d_model] -> [B, L, d_model]; docs: the documents (integer ids [B, L] or a DocIndex). With a
        state (inference), continue from it and update it; valid bool [B, L] marks real tokens (left padding
        is allowed before a row's first token). Under context parallelism (a round of a sharded prefill,
        ramba.parallel.prefill) every rank holds the same state, rank 0 continues from it, and it takes the conv
        inputs and the SSM state after this rank's slice."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2: x must be [B, L, d_model={self.d_model}], got shape {tuple(x.shape)}")
        cp = active()  # under context parallelism: this rank's slice of a sharded sequence, exactly
        if state is not None and cp is None:
            return self._forward_cached(x, state, positions, valid)
        docs = as_doc_index(docs)
        if docs is not None and docs.shape != x.shape[:2]:
            raise ValueError(f"Mamba2: doc_ids must be [B, L] = {tuple(x.shape[:2])}, got shape {tuple(docs.shape)}")
        b, l, _ = x.shape
        z, xbc, dt = torch.split(self.in_proj(x), [self.d_inner, self.conv1d.in_channels, self.nheads], dim=-1)
        history = None
        if state is not None:  # a sharded prefill: continue from the state, keep the slice's last conv inputs
            history, state.conv = state.conv, xbc[:, l - state.conv.shape[1]:]
        if cp is None:
            xbc = causal_conv1d(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, docs, backend=self.backend)
        else:
            xbc = context_parallel_conv1d(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, cp.group,
                                          backend=self.backend, docs=docs, history=history)
        xbc = F.silu(xbc)
        xs, B, C = torch.split(xbc, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        xs = xs.reshape(b, l, self.nheads, self.headdim)
        xin, dt, A, D = self._scan_inputs(xs, dt, torch.promote_types(dt.dtype, torch.float32))  # float32 (64)
        scan_args = (xin, dt, A, B.reshape(b, l, self.ngroups, self.d_state),
                     C.reshape(b, l, self.ngroups, self.d_state), self.chunk_size, D,
                     self._restarts(docs, b, l, positions, x.device))
        if cp is None:
            y = ssd_scan(*scan_args, backend=self.backend)
        elif state is None:
            y = context_parallel_scan(*scan_args, cp.group, backend=self.backend)
        else:  # from the state before the sequence, and the true SSM state after the slice
            y, state.ssm = context_parallel_scan(*scan_args, cp.group, backend=self.backend, return_final_state=True,
                                                 initial_state=state.ssm)
        return self.out_proj(self.norm(self._skip(y, xs).reshape(b, l, self.d_inner), z))

    def _restarts(self, docs: DocIndex | None, b: int, l: int, positions: Tensor | None,
                  device: torch.device) -> DocIndex | Tensor | None:
        """Where the scan's state restarts: the documents' starts, and with a reset R every token whose position
        in its document is the block's phase (0, or R // 2 when staggered) plus a multiple of R (bool [b, l]). positions [l]: the tokens' positions when there are no
        documents (a rank's slice of one sequence under context parallelism; default 0 .. l-1)."""
        if not self.reset:
            return docs
        if docs is not None:
            offsets = docs.offsets
        else:
            offsets = (torch.arange(l, device=device) if positions is None else positions).expand(b, l)
        restart = self.restarts_at(offsets)
        return restart if docs is None else restart | docs.starts

    def restarts_at(self, offsets: Tensor) -> Tensor:
        """Whether the state restarts at tokens of these positions in their document (any shape, int) -> bool:
        the block's phase (0, or reset // 2 when staggered) plus a multiple of mamba_reset(_upper)."""
        return offsets % self.reset == self.reset_phase

    def _scan_inputs(self, xs: Tensor, dt: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """xs [b, l, h, p] and in_proj's dt [b, l, h] -> (x, dt, A, D) for `ssd_scan`: dt = softplus(dt + dt_bias)
        in `dtype`, A = -exp(A_log) [h]. With a horizon H the decay uses dt + 1 / (H |A|), so that every head
        forgets at least a factor e^(-1/H) a token, and x is scaled by dt / (dt + 1 / (H |A|)) so that each token
        still enters the state with weight dt: a shorter memory, not a louder one. D is then None: `_skip` adds
        D * xs outside the scan (the skip reads the unscaled input)."""
        A = -torch.exp(self.A_log.to(dtype))
        dt = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype))
        if not self.horizon:
            return xs, dt, A, self.D
        decay_dt = dt + 1.0 / (self.horizon * -A)
        return xs * (dt / decay_dt).unsqueeze(-1).to(xs.dtype), decay_dt, A, None

    def _skip(self, y: Tensor, xs: Tensor) -> Tensor:
        """y [b, l, h, p] plus D * xs where the scan left the skip out (a horizon); y's dtype."""
        if not self.horizon:
            return y
        return (y + self.D.to(y.dtype)[:, None] * xs).to(y.dtype)

    def _forward_cached(self, x: Tensor, state: Mamba2State, positions: Tensor | None,
                        valid: Tensor | None) -> Tensor:
        """The segment x continues from `state` (updated in place); positions [B, L] (needed with a reset)."""
        b, l, _ = x.shape
        z, xbc, dt = torch.split(self.in_proj(x), [self.d_inner, self.conv1d.in_channels, self.nheads], dim=-1)
        seq_start = None
        if valid is not None:  # padding feeds zeros to the conv and the state restarts at the first token
            xbc = xbc * valid[..., None].to(xbc.dtype)
            seq_start = valid & F.pad(~valid[:, :-1], (1, 0), value=False)
        if self.reset:
            if positions is None:
                raise ValueError("Mamba2 with a state reset (mamba_reset, mamba_reset_upper) needs the tokens' "
                                 "positions [B, L] in the cached form")
            restart = self.restarts_at(positions)
            restart = restart if valid is None else restart & valid
            if l == 1:  # a decoded token: drop the state where it restarts (keeps the one-step recurrence)
                state.ssm = torch.where(restart[:, 0, None, None, None], 0.0, state.ssm)
            else:
                seq_start = restart if seq_start is None else seq_start | restart
        conv, state.conv = causal_conv1d(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                         initial_state=state.conv, return_final_state=True, backend=self.backend)
        xs, B, C = torch.split(F.silu(conv), [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state],
                               dim=-1)
        xs, B, C = xs.reshape(b, l, self.nheads, self.headdim), B.reshape(b, l, self.ngroups, -1), C.reshape(b, l, self.ngroups, -1)
        xin, dt, A, D = self._scan_inputs(xs, dt, state.ssm.dtype)
        y, state.ssm = ssd_scan(xin, dt, A, B, C, self.chunk_size, D, seq_start, initial_state=state.ssm,
                                return_final_state=True, backend=self.backend)
        return self.out_proj(self.norm(self._skip(y, xs).reshape(b, l, self.d_inner), z))

    def step(self, x: Tensor, state: Mamba2State, positions: Tensor) -> Tensor:
        """One token per row in fixed shapes (ramba.decoding): x [B, d_model] at positions [B] -> [B, d_model],
        the one-token recurrence (restarts of mamba_reset / mamba_reset_upper at the block's phase,
        mamba_horizon), updating `state` in place."""
        B = x.shape[0]
        z, xbc, dt = torch.split(self.in_proj(x), [self.d_inner, self.conv1d.in_channels, self.nheads], dim=-1)
        if self.reset:
            state.ssm.masked_fill_(self.restarts_at(positions)[:, None, None, None], 0.0)
        conv, history = causal_conv1d_step(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, state.conv)
        state.conv.copy_(history)
        n = self.ngroups * self.d_state
        xs, Bm, Cm = torch.split(F.silu(conv), [self.d_inner, n, n], dim=-1)
        xs = xs.view(B, self.nheads, self.headdim)
        xin, dt, A, D = self._scan_inputs(xs, dt, state.ssm.dtype)
        y, ssm = ssd_step(xin, dt, A, Bm.view(B, self.ngroups, -1), Cm.view(B, self.ngroups, -1), D, state.ssm)
        state.ssm.copy_(ssm)
        y = self._skip(y, xs).reshape(B, self.d_inner)
        return self.out_proj(gated_rms_norm_ref(y, z, self.norm.weight, self.norm.group_size, self.norm.eps))
