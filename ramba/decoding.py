"""Static decoding: one token per row per step in buffers of fixed shape, so that a step can be captured in a
CUDA graph and replayed, instead of paying a kernel launch and Python overhead per op at every token.

`StaticDecoder(model, cache, max_new_tokens)` takes an already prefilled HSACache: per SWA block a ring of its
last W keys and values with a validity mask, per Mamba2 block its conv and SSM states, the pending chunk and
its per-row fill, and the chunk memory with room reserved for every chunk that can complete within
max_new_tokens steps. Every row advances one token per step, so which rows complete a chunk at which step
follows from the fill read once at construction: a plain step, and a completing step that also encodes the
pending chunks and appends them to the rows that a mask names. Each step only does fixed-shape tensor work
(no device sync, no shape that depends on the data); on CUDA each of the two is captured in a CUDA graph after
a warm-up on a side stream and then replayed, elsewhere the same step runs eagerly. An offloaded cache (memory
keys/values in pinned CPU memory) decodes too: on the GPU the aggregation kernel reads the selected chunks and
the completed chunks are written there in place, inside the captured steps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ramba.ops.aggregate import aggregate_decode, host_kv_unsupported
from ramba.ops.retrieve import retrieve_decode
from ramba.ops.utils import write_chunks

from .cache import MAX_POSITION, HSACache
from .documents import DocLayout
from .layers.blocks import HSABlock
from .layers.hsa import HSA, retrieval_weights
from .layers.mamba2 import Mamba2State
from .layers.swa import SWARing, SWAState
from .memory import ChunkMemory
from .parallel.group import active

WARMUP_STEPS = 2  # eager steps of each variant on a side stream before it is captured


def unsupported(model: torch.nn.Module, cache: object) -> str | None:
    """Why a StaticDecoder cannot continue `cache` on `model` (what to do instead), or None when it can."""
    if not isinstance(cache, HSACache) or cache.owner is not model:
        return "static decoding needs a model's own HSACache: make it with model.new_cache(batch_size)"
    if model.training:
        return "the model is in training mode: call model.eval() before static decoding"
    if cache.offload and cache.device.type == "cuda" and model.encoder is not None:
        cfg = model.config
        why = "ops_backend is 'torch'" if cfg.ops_backend == "torch" else \
            host_kv_unsupported(cfg.head_dim, cfg.chunk_size, cache.dtype)
        if why is not None:
            return (f"the cache keeps its memory keys/values in CPU memory (offload=True), which only the Triton "
                    f"kernels read from the GPU, and {why}: make the cache with offload=False, or decode with "
                    "model(token, cache=cache) (generate(..., static_decode=False))")
    if cache.context_parallel is not None or active() is not None:
        return ("the cache is sharded across a context-parallel group: decode it under context_parallel(group) "
                "with model(token, cache=cache) or ramba.parallel.generate_sharded")
    if not cache.started:
        return "the cache holds no token yet: prefill it first with model(prompt_ids, cache=cache)"
    weight = model.embed.weight
    if weight.dtype != cache.dtype or weight.device != cache.device:
        return (f"the cache was made for a model in {cache.dtype} on {cache.device}, but the model is now in "
                f"{weight.dtype} on {weight.device}: make a new cache with model.new_cache(batch_size)")
    return None


class StaticDecoder:
    """Decode one token per row per step from a prefilled cache, in buffers of fixed shape (module docstring).

    `decoder = StaticDecoder(model, cache, max_new_tokens)`, then `logits = decoder.step(tokens)` up to
    max_new_tokens times: the same logits as `model(tokens[:, None], cache=cache).logits[:, -1]` would give.
    The decoder copies the mixer states and the pending chunk; it reserves room in the cache's chunk store and
    shares its buffers (writing past cache.store.count), so continue with the decoder or with the cache, not
    both. graphs: on CUDA, capture each step variant in a CUDA graph (False: run the same steps eagerly).
    Raises ValueError for what it cannot decode (`unsupported` says why and what to do).
    """

    def __init__(self, model: torch.nn.Module, cache: HSACache, max_new_tokens: int, graphs: bool = True):
        reason = unsupported(model, cache)
        if reason is not None:
            raise ValueError(f"StaticDecoder: {reason}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"StaticDecoder: max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        cfg = model.config
        self.model, self.max_new_tokens, self.steps = model, max_new_tokens, 0
        self.device, B = cache.device, cache.batch_size
        if int(cache.lengths.max()) + max_new_tokens > MAX_POSITION:
            raise ValueError(f"StaticDecoder: positions beyond {MAX_POSITION:,} tokens are not supported")
        self.positions = cache.lengths.clone()
        states = list(cache.states)
        if cache.upper_stale:
            states[cfg.n_lower_layers:] = _rebuilt_upper_states(model, cache)
        self.states = [SWARing(s, cfg.window) if isinstance(s, SWAState) else Mamba2State(s.conv.clone(), s.ssm.clone())
                       for s in states]
        self._slot = torch.zeros(1, dtype=torch.long, device=self.device)
        self._tokens = torch.zeros(B, dtype=torch.long, device=self.device)
        self._mask = torch.zeros(B, dtype=torch.bool, device=self.device)
        self._rows = torch.arange(B, device=self.device)
        self._completing = [False]
        if model.encoder is not None:
            self._memory_buffers(cache, max_new_tokens)
        self.graphs = graphs and self.device.type == "cuda"
        self._captured: dict[bool, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._warm = {False: 0, True: 0}

    def _memory_buffers(self, cache: HSACache, max_new_tokens: int) -> None:
        """The pending chunk, the chunk memory with room for every chunk completed within max_new_tokens steps,
        and which rows complete a chunk at each step of the period S."""
        S = self.model.config.chunk_size
        fill, count = cache.pending_len.tolist(), cache.store.count.tolist()
        capacity = max(1, max(c + (f + max_new_tokens) // S for c, f in zip(count, fill)))
        cache.store.reserve(capacity)
        store = cache.store
        self.pending, self.pending_len = cache.pending.clone(), cache.pending_len.clone()
        self.count = store.count.clone()
        self.landmarks = store.landmarks[:, :capacity]
        self.k, self.v = store.k[:, :capacity * S], store.v[:, :capacity * S]
        completes = [[(f + r + 1) % S == 0 for f in fill] for r in range(S)]  # step r (mod S) fills these rows
        self._masks = torch.tensor(completes, dtype=torch.bool, device=self.device)
        self._completing = [any(rows) for rows in completes]

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """Feed tokens [B] (the next token of every row) -> logits [B, vocab] for the token after it."""
        if self.steps >= self.max_new_tokens:
            raise ValueError(f"StaticDecoder: all {self.max_new_tokens} steps it was built for are used: make a "
                             "new one with a larger max_new_tokens")
        if tokens.shape != self._tokens.shape:
            raise ValueError(f"StaticDecoder.step: tokens must be [{self._tokens.shape[0]}], got {tuple(tokens.shape)}")
        self._tokens.copy_(tokens)
        phase = self.steps % len(self._completing)
        completing = self._completing[phase]
        if completing:
            self._mask.copy_(self._masks[phase])
        logits = self._run(completing)
        self.steps += 1
        return logits

    def _run(self, completing: bool) -> Tensor:
        """One step: eagerly, or by replaying its CUDA graph (captured after WARMUP_STEPS eager side-stream
        steps of the same variant)."""
        if not self.graphs:
            return self._step(completing)
        if completing in self._captured:
            graph, logits = self._captured[completing]
            graph.replay()
            return logits.clone()
        if self._warm[completing] < WARMUP_STEPS:
            self._warm[completing] += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                logits = self._step(completing)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return logits
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records the step without running it
            logits = self._step(completing)
        self._captured[completing] = (graph, logits)
        graph.replay()
        return logits.clone()

    def _step(self, completing: bool) -> Tensor:
        """The step on the buffers, in place: embed the tokens, run every block, update the memory -> logits."""
        m = self.model
        x = m.embed(self._tokens)
        n_lower = len(m.lower)
        for block, state in zip(m.lower, self.states):
            x = self._block(block, x, state)
        if m.encoder is not None:
            self._remember(m.memory_norm(x), completing)
        for block, state in zip(m.upper, self.states[n_lower:]):
            x = self._block(block, x, state)
        self.positions += 1
        self._slot.add_(1).remainder_(m.config.window)
        return m.lm_head(m.norm(x))

    def _block(self, block: torch.nn.Module, x: Tensor, state: SWARing | Mamba2State) -> Tensor:
        """A Block or HSABlock on x [B, d], as their forward does."""
        h = block.mixer_norm(x)
        if isinstance(state, SWARing):
            x = x + block.mixer.step(h, state, self.positions, self._slot)
        else:
            x = x + block.mixer.step(h, state, self.positions)
        if isinstance(block, HSABlock):
            mixed = x + self._hsa(block.hsa, block.hsa_norm(x))
            return (x if block.bypass else mixed) + block.mlp(block.mlp_norm(mixed))
        return x if block.mlp is None else x + block.mlp(block.mlp_norm(x))

    def _hsa(self, hsa: HSA, x: Tensor) -> Tensor:
        """HSA of x [B, d] (normalised) over the capacity buffers -> [B, d]."""
        cfg = hsa.config
        B = x.shape[0]
        qr = hsa.qr_proj(x).view(B, cfg.num_retrieval_heads, cfg.retrieval_dim)
        window = cfg.window if cfg.retrieve_beyond_window else None
        indices, scores = retrieve_decode(qr, self.landmarks, self.count, self.positions, cfg.topk,
                                          cfg.chunk_size, window, cfg.ops_backend)
        weights = retrieval_weights(scores, indices, cfg.retrieval_weights)
        if cfg.num_retrieval_heads != cfg.num_kv_heads:  # one shared retrieval head serves every kv head
            indices = indices.expand(-1, cfg.num_kv_heads, -1)
            weights = weights.expand(-1, cfg.num_kv_heads, -1)
        q = hsa.q_proj(x).view(B, cfg.num_heads, cfg.head_dim)
        o = aggregate_decode(q, self.k, self.v, indices, weights, cfg.chunk_size, 1.0 / math.sqrt(cfg.head_dim),
                             cfg.softmax_off_by_one, cfg.ops_backend)
        return hsa.o_proj(o.reshape(B, cfg.num_heads * cfg.head_dim))

    def _remember(self, h: Tensor, completing: bool) -> None:
        """Add the normalised lower-stack states h [B, d] to the pending chunks; in a completing step, encode
        the pending chunks and append those of the rows in the mask."""
        self.pending[self._rows, self.pending_len] = h.to(self.pending.dtype)
        self.pending_len += 1
        if completing:
            self._append(self.model.encoder(self.pending))
            self.pending_len.masked_fill_(self._mask, 0)

    def _append(self, memory: ChunkMemory) -> None:
        """Write chunk memory (landmarks [B, 1, Hr, dr], k, v [B, S, H, D]) at slot count[b] of the rows in the
        mask, and count them."""
        for buffer, new in ((self.landmarks, memory.landmarks), (self.k, memory.k), (self.v, memory.v)):
            write_chunks(buffer, new, self.count, self._mask)  # slots past the capacity clamp to the last
        self.count += self._mask


def _rebuilt_upper_states(model: torch.nn.Module, cache: HSACache) -> list:
    """The upper stack's states after the positions kept in cache.context, which an all-SWA upper stack's
    shortcut left stale (a prefill with logits_to_keep=0): the upper stack run over them from fresh states, as
    the next cached call would (each layer's last W-1 keys are exact over that receptive field)."""
    context, valid, positions = cache.context
    fresh = model.allocate_inference_cache(cache.batch_size, cache.device, cache.dtype, upper_only=True)
    with torch.no_grad():
        model._run_upper(context, cache.store, DocLayout(*context.shape[:2]), None, fresh, positions, valid)
    return fresh
