"""Mamba2 local mixer, with the parameter layout of `mamba_ssm.modules.mamba2.Mamba2` and document resets."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ramba.ops.backends import pick
from ramba.config import HSAHybridConfig
from ramba.cache import Mamba2State
from ramba.ops.ssd import causal_conv1d_ref, gated_rms_norm, ssd_scan, ssd_step
from ramba.ops.ssd.compiled import causal_conv1d_compiled, gated_rms_norm_compiled, ssd_scan_compiled
from ramba.ops.ssd.cuda import causal_conv1d_cuda, ssd_scan_cuda

DT_MIN, DT_MAX, DT_INIT_FLOOR = 1e-3, 0.1, 1e-4
A_INIT_RANGE = (1.0, 16.0)


def doc_starts(doc_ids: Tensor) -> Tensor:
    """doc_ids [B, L] -> bool [B, L]: True at position 0 and wherever the id differs from the previous one."""
    starts = torch.ones(doc_ids.shape, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


class GatedRMSNorm(nn.Module):
    """`rmsnorm(y * silu(z)) * weight` over groups of `group_size` channels, in float32 (float64 for
    float64 inputs); y, z: [..., dim] -> y's dtype."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor, compiled: bool = False) -> Tensor:
        norm = gated_rms_norm_compiled if compiled else gated_rms_norm
        return norm(y, z, self.weight, self.group_size, self.eps)


def _no_weight_decay(param: nn.Parameter) -> nn.Parameter:
    """Tag a parameter that the optimizer should not decay (A, dt bias, D, as in mamba_ssm)."""
    param._no_weight_decay = True
    return param


class Mamba2(nn.Module):
    """Mamba2 mixer: in_proj -> causal conv + silu -> SSD scan -> gated RMSNorm -> out_proj.

    x: [B, L, d_model], doc_ids: optional int [B, L] (contiguous runs of equal id are documents that
    never interact) -> [B, L, d_model].
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

        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.ngroups, eps=config.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=False)

    def _check_inputs(self, x: Tensor, doc_ids: Tensor | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2: x must be [B, L, d_model={self.d_model}], got shape {tuple(x.shape)}")
        if doc_ids is not None:
            if tuple(doc_ids.shape) != tuple(x.shape[:2]):
                raise ValueError(f"Mamba2: doc_ids must be [B, L] = {tuple(x.shape[:2])}, "
                                 f"got shape {tuple(doc_ids.shape)}")
            if doc_ids.is_floating_point() or doc_ids.is_complex():
                raise ValueError(f"Mamba2: doc_ids must be an integer tensor, got {doc_ids.dtype}")

    def forward(self, x: Tensor, doc_ids: Tensor | None = None, state: Mamba2State | None = None,
                positions: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
        """x: [B, L, d_model] -> [B, L, d_model]. With a state (inference), continue from it and update it;
        valid bool [B, L] marks real tokens (left padding is allowed before a row's first token)."""
        self._check_inputs(x, doc_ids)
        backend = pick("mamba", self.backend, x.device)
        if state is not None:
            return self._forward_cached(x, state, valid, compiled=backend != "torch")
        conv, scan = {"cuda": (causal_conv1d_cuda, ssd_scan_cuda), "torch": (causal_conv1d_ref, ssd_scan),
                      "compile": (causal_conv1d_compiled, ssd_scan_compiled)}[backend]
        b, l, _ = x.shape
        seq_start = None if doc_ids is None else doc_starts(doc_ids.to(x.device))

        z, xbc, dt = torch.split(self.in_proj(x), [self.d_inner, self.conv1d.in_channels, self.nheads], dim=-1)
        xbc = F.silu(conv(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, seq_start))
        xs, B, C = torch.split(xbc, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        ct = torch.promote_types(dt.dtype, torch.float32)  # float32, or float64 for float64 inputs
        y = scan(
            xs.reshape(b, l, self.nheads, self.headdim),
            F.softplus(dt.to(ct) + self.dt_bias.to(ct)),
            -torch.exp(self.A_log.to(ct)),
            B.reshape(b, l, self.ngroups, self.d_state),
            C.reshape(b, l, self.ngroups, self.d_state),
            self.chunk_size,
            self.D,
            seq_start,
        )
        return self.out_proj(self.norm(y.reshape(b, l, self.d_inner), z, compiled=backend == "compile"))

    def _forward_cached(self, x: Tensor, state: Mamba2State, valid: Tensor | None, compiled: bool) -> Tensor:
        """The segment x continues from `state` (updated in place); compiled: the torch.compile'd ops for
        segments of more than one token (the cached path never uses mamba_ssm)."""
        b, l, _ = x.shape
        z, xbc, dt = torch.split(self.in_proj(x), [self.d_inner, self.conv1d.in_channels, self.nheads], dim=-1)
        seq_start = None
        if valid is not None:  # padding feeds zeros to the conv and the state restarts at the first token
            xbc = xbc * valid[..., None].to(xbc.dtype)
            seq_start = valid & F.pad(~valid[:, :-1], (1, 0), value=False)
        compiled = compiled and l > 1
        history = torch.cat([state.conv, xbc], dim=1)
        conv1d = causal_conv1d_compiled if compiled else causal_conv1d_ref
        conv = conv1d(history, self.conv1d.weight.squeeze(1), self.conv1d.bias)[:, -l:]
        state.conv = history[:, history.shape[1] - state.conv.shape[1]:]
        xs, B, C = torch.split(F.silu(conv), [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state],
                               dim=-1)
        ct = state.ssm.dtype
        dt = F.softplus(dt.to(ct) + self.dt_bias.to(ct))
        A = -torch.exp(self.A_log.to(ct))
        xs, B, C = xs.reshape(b, l, self.nheads, self.headdim), B.reshape(b, l, self.ngroups, -1), C.reshape(b, l, self.ngroups, -1)
        if l == 1 and seq_start is None:
            y, state.ssm = ssd_step(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D, state.ssm)
            y = y[:, None]
        else:
            scan = ssd_scan_compiled if compiled else ssd_scan
            y, state.ssm = scan(xs, dt, A, B, C, self.chunk_size, self.D, seq_start, initial_state=state.ssm,
                                return_final_state=True)
        return self.out_proj(self.norm(y.reshape(b, l, self.d_inner), z, compiled=compiled))
