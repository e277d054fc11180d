"""Pure-PyTorch Mamba2 ops: the chunked SSD scan and a depthwise causal conv, both document-aware.

Recurrence of the scan, per head (state `[p, n]`):
    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t ⊗ B_t,    y_t = state_t · C_t + D * x_t
with the state reset to zero before every token where `seq_start` is True.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64 (so gradcheck sees full precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_scan_inputs(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Tensor | None, seq_start: Tensor | None) -> None:
    if x.dim() != 4:
        raise ValueError(f"ssd_scan: x must be [b, l, h, p], got shape {tuple(x.shape)}")
    b, l, h, _ = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"ssd_scan: dt must be [b, l, h] = {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"ssd_scan: A must be [h] = {(h,)}, got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or C.shape != B.shape:
        raise ValueError(f"ssd_scan: B and C must both be [b, l, g, n] with b, l = {(b, l)}, "
                         f"got {tuple(B.shape)} and {tuple(C.shape)}")
    if B.shape[2] == 0 or h % B.shape[2] != 0:
        raise ValueError(f"ssd_scan: the head count {h} must be a multiple of the group count {B.shape[2]}")
    if D is not None and D.shape != (h,):
        raise ValueError(f"ssd_scan: D must be [h] = {(h,)}, got {tuple(D.shape)}")
    if seq_start is not None and seq_start.shape != (b, l):
        raise ValueError(f"ssd_scan: seq_start must be [b, l] = {(b, l)}, got {tuple(seq_start.shape)}")


def _pad_time(t: Tensor, pad: int) -> Tensor:
    """Append `pad` zero steps along dim 1."""
    if pad == 0:
        return t
    return torch.cat([t, t.new_zeros((t.shape[0], pad, *t.shape[2:]))], dim=1)


def _segsum(a: Tensor) -> Tensor:
    """a: [..., q] -> [..., q, q] with out[..., t, s] = sum(a[..., s+1 : t+1]) for s <= t, else -inf."""
    q = a.shape[-1]
    ones = torch.ones(q, q, dtype=torch.bool, device=a.device)
    rows = a.unsqueeze(-1).expand(*a.shape, q).masked_fill(~ones.tril(-1), 0.0)   # rows[t, s] = a[t] if t > s
    return rows.cumsum(dim=-2).masked_fill(~ones.tril(), float("-inf"))


def _pass_states(chunk_states: Tensor, log_decay: Tensor, carries: Tensor, state: Tensor,
                 group: int = 32) -> tuple[Tensor, Tensor]:
    """The state entering each chunk, [b, c, h, p, n], and the state after the last one.

    chunk_states: [b, c, h, p, n], what each chunk writes by its end; log_decay: [b, c, h], the log decay
    across each chunk; carries: bool [b, c], False where a document starts in the chunk (the state before it
    is dropped); state: [b, h, p, n], the state before the first chunk. The recurrence
    after[c] = carries[c] * exp(log_decay[c]) * after[c - 1] + chunk_states[c] runs in closed form within
    groups of `group` chunks and step by step across groups: c / group steps instead of c.
    """
    b, c, h = log_decay.shape
    ng = -(-c // group)
    pad = ng * group - c  # identity chunks: no decay, nothing written
    S = _pad_time(chunk_states, pad).view(b, ng, group, *chunk_states.shape[2:])
    ld = _pad_time(log_decay, pad).view(b, ng, group, h)
    cut = torch.cat([~carries, carries.new_zeros(b, pad)], dim=1).view(b, ng, group).long().cumsum(-1)
    clear = (cut.unsqueeze(-1) == cut.unsqueeze(-2)).unsqueeze(2)          # [b, g, 1, t, s]: no cut in (s, t]
    weights = _segsum(ld.transpose(2, 3)).exp() * clear                   # [b, g, h, t, s]
    within = torch.einsum("bghts,bgshpn->bgthpn", weights, S)              # after[t], zero state at group start
    from_start = ld.cumsum(2).exp() * (cut == 0).unsqueeze(-1)              # [b, g, t, h]
    entering = []
    for g in range(ng):
        entering.append(state)
        state = from_start[:, g, -1, :, None, None] * state + within[:, g, -1]
    after = within + from_start[..., None, None] * torch.stack(entering, dim=1)[:, :, None]
    after = after.flatten(1, 2)[:, :c]
    return torch.cat([entering[0].unsqueeze(1), after[:, :-1]], dim=1), state


def ssd_scan_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
             D: Tensor | None = None, seq_start: Tensor | None = None, initial_state: Tensor | None = None,
             return_final_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba2's chunked SSD scan; returns y `[b, l, h, p]` in x's dtype (and the final state).

    x: [b, l, h, p]; dt: [b, l, h] positive steps; A: [h] negative; B, C: [b, l, g, n], head i reads
    group i // (h // g); D: [h] skip; seq_start: bool [b, l], True where a new document starts;
    initial_state: [b, h, p, n], the state before the first token (zeros if None). With
    return_final_state, also returns the state after the last token, [b, h, p, n] in the compute dtype.
    Computed in float32 (float64 for float64 inputs) with O(l * chunk_size) memory.
    """
    check_scan_inputs(x, dt, A, B, C, D, seq_start)
    if chunk_size < 1:
        raise ValueError(f"ssd_scan: chunk_size must be positive, got {chunk_size}")
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    ct = _compute_dtype(x, dt, A, B, C)
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(f"ssd_scan: initial_state must be [b, h, p, n] = {(b, h, p, n)}, "
                         f"got {tuple(initial_state.shape)}")
    if l == 0:
        final = x.new_zeros(b, h, p, n, dtype=ct) if initial_state is None else initial_state.to(ct)
        return (x.clone(), final) if return_final_state else x.clone()
    q = chunk_size
    nc = -(-l // q)
    pad = nc * q - l

    # padded steps have dt = 0: they neither decay nor write the state, and their outputs are dropped.
    # Heads are split as (group, head within group): B and C stay per group, never copied to every head.
    k = h // g
    xs = _pad_time(x.to(ct), pad).view(b, nc, q, h, p)
    dts = _pad_time(dt.to(ct), pad).view(b, nc, q, h)
    Bs = _pad_time(B.to(ct), pad).view(b, nc, q, g, n)
    Cs = _pad_time(C.to(ct), pad).view(b, nc, q, g, n)
    starts = torch.zeros(b, l, dtype=torch.long, device=x.device) if seq_start is None else seq_start.long()
    # number of document starts at or before each position of its chunk
    nstart = _pad_time(starts, pad).view(b, nc, q).cumsum(dim=-1)

    a = (dts * A.to(ct)).permute(0, 1, 3, 2)                       # [b, c, h, q] log decays
    a_cum = a.cumsum(dim=-1)                                       # decay since the chunk start
    seg = _segsum(a)                                               # [b, c, h, q(t), q(s)]
    same_doc = (nstart.unsqueeze(-1) == nstart.unsqueeze(-2)).unsqueeze(2)
    decay = seg.masked_fill(~same_doc, float("-inf")).exp().view(b, nc, g, k, q, q)
    xdt = (xs * dts.unsqueeze(-1)).view(b, nc, q, g, k, p)

    # within each chunk: y_t += sum_{s <= t, same doc} (C_t · B_s) decay(s -> t) dt_s x_s
    scores = torch.einsum("bctgn,bcsgn->bcgts", Cs, Bs).unsqueeze(3) * decay   # [b, c, g, k, t, s]
    y = torch.einsum("bcgkts,bcsgkp->bctgkp", scores, xdt)

    # state written by each chunk at its end, from tokens in the document of its last token
    to_end = decay[..., -1, :].permute(0, 1, 4, 2, 3)              # [b, c, s, g, k]
    chunk_states = torch.einsum("bcsgn,bcsgkp->bcgkpn", Bs, xdt * to_end.unsqueeze(-1)).reshape(b, nc, h, p, n)
    carries = nstart[..., -1] == 0                                 # [b, c]: no document starts in the chunk
    state = chunk_states.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(ct)
    states_in, state = _pass_states(chunk_states, a_cum[..., -1], carries, state)

    # the state entering a chunk reaches token t if no document starts in the chunk up to t
    reach = (a_cum.exp() * (nstart == 0).unsqueeze(2)).permute(0, 1, 3, 2).reshape(b, nc, q, g, k, 1)
    y = y + torch.einsum("bctgn,bcgkpn->bctgkp", Cs, states_in.view(b, nc, g, k, p, n)) * reach
    y = y.reshape(b, nc, q, h, p)
    if D is not None:
        y = y + xs * D.to(ct)[:, None]
    y = y.reshape(b, nc * q, h, p)[:, :l].to(x.dtype)
    return (y, state) if return_final_state else y


def check_conv_inputs(x: Tensor, weight: Tensor, bias: Tensor | None, seq_start: Tensor | None) -> None:
    """Raise ValueError unless x [b, l, c], weight [c, k], bias [c] and seq_start [b, l]."""
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be [b, l, c], got shape {tuple(x.shape)}")
    b, l, c = x.shape
    if weight.dim() != 2 or weight.shape[0] != c:
        raise ValueError(f"causal_conv1d: weight must be [c, k] with c = {c}, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (c,):
        raise ValueError(f"causal_conv1d: bias must be [c] = {(c,)}, got {tuple(bias.shape)}")
    if seq_start is not None and seq_start.shape != (b, l):
        raise ValueError(f"causal_conv1d: seq_start must be [b, l] = {(b, l)}, got {tuple(seq_start.shape)}")


def causal_conv1d_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                      seq_start: Tensor | None = None) -> Tensor:
    """Depthwise causal conv over time, no activation; x: [b, l, c], weight: [c, k], bias: [c] -> [b, l, c].

    out_t = bias + sum_j weight[:, k-1-j] * x_{t-j}; with seq_start (bool [b, l]) taps stop at the
    first token of t's document. Computed in float32 (float64 for float64 inputs), returned in x's dtype.
    """
    check_conv_inputs(x, weight, bias, seq_start)
    b, l, c = x.shape
    k = weight.shape[1]
    ct = _compute_dtype(x, weight)
    xf, wf = x.to(ct), weight.to(ct)
    out = xf.new_zeros(b, l, c) if bias is None else bias.to(ct).expand(b, l, c)
    offset = None
    if seq_start is not None:
        pos = torch.arange(l, device=x.device).expand(b, l)
        doc_first = torch.where(seq_start.bool(), pos, torch.zeros_like(pos)).cummax(dim=1).values
        offset = (pos - doc_first).unsqueeze(-1)                    # [b, l, 1]: position inside the document
    for j in range(min(k, l)):
        tap = F.pad(xf, (0, 0, j, 0))[:, :l] * wf[:, k - 1 - j]
        if offset is not None:
            tap = tap * (offset >= j)
        out = out + tap
    return out.to(x.dtype)


def conv_with_history(conv: Callable[[Tensor], Tensor], x: Tensor, width: int, initial_state: Tensor | None,
                      return_final_state: bool) -> Tensor | tuple[Tensor, Tensor]:
    """The cached form of a causal conv of `width` taps, run as `conv` ([b, n, c] -> [b, n, c]) over the cached
    inputs initial_state [b, width-1, c] (if any) and x [b, l, c] together: the outputs of x's positions, and
    with return_final_state the last min(width-1, inputs seen) inputs for the next call."""
    history = x if initial_state is None else torch.cat([initial_state.to(x.dtype), x], dim=1)
    out = conv(history)[:, history.shape[1] - x.shape[1]:]
    return (out, history[:, max(0, history.shape[1] - (width - 1)):]) if return_final_state else out


def causal_conv1d_step(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of the depthwise causal conv: x [b, c] after the k-1 inputs of state [b, k-1, c]; weight [c, k],
    bias [c]. Returns the output [b, c] and the new state [b, k-1, c] (the last k-1 inputs), both in x's dtype:
    causal_conv1d_ref over the state and the token (fixed shapes, since the state always holds k-1 inputs)."""
    out, history = conv_with_history(lambda h: causal_conv1d_ref(h, weight, bias), x[:, None], weight.shape[1],
                                     state, return_final_state=True)
    return out[:, 0], history


def gated_rms_norm_ref(y: Tensor, z: Tensor, weight: Tensor, group_size: int, eps: float) -> Tensor:
    """Mamba2's output norm, `rmsnorm(y * silu(z)) * weight` over groups of `group_size` channels, in float32
    (float64 for float64 inputs); y, z: [..., dim], weight: [dim] -> y's dtype."""
    ct = torch.promote_types(y.dtype, torch.float32)
    h = (y.to(ct) * F.silu(z.to(ct))).unflatten(-1, (-1, group_size))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h.flatten(-2) * weight.to(ct)).to(y.dtype)


def ssd_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
             state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of the SSD recurrence: state = exp(dt*A) state + dt B ⊗ x; y = C · state + D x.

    x: [b, h, p]; dt: [b, h]; A: [h]; B, C: [b, g, n]; D: [h]; state: [b, h, p, n] in the compute dtype.
    Returns y [b, h, p] in x's dtype and the new state.
    """
    h = x.shape[1]
    ct = state.dtype
    Bh = B.to(ct).repeat_interleave(h // B.shape[1], dim=1)       # [b, h, n]
    Ch = C.to(ct).repeat_interleave(h // C.shape[1], dim=1)
    dtc = dt.to(ct)
    decay = torch.exp(dtc * A.to(ct))[:, :, None, None]
    state = decay * state + (dtc[:, :, None] * x.to(ct))[..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, Ch)
    if D is not None:
        y = y + x.to(ct) * D.to(ct)[:, None]
    return y.to(x.dtype), state
