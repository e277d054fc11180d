"""HSAHybrid: lower stack -> chunk memory -> upper stack with HSA blocks -> LM head (DESIGN.md section 1)."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .cache import HSACache
from .config import HSAHybridConfig
from .documents import DocLayout, build_layout
from .generation import generate
from .layers.blocks import Block, HSABlock
from .layers.chunk_encoder import ChunkEncoder
from .layers.norm import RMSNorm
from .memory import Memory
from .ops import DocIndex
from .parallel.group import active
from .parallel.cache import check_cache_inputs
from .parallel.cache import forward_cached as forward_cached_sharded
from .parallel.model import check_inputs as check_context_parallel
from .parallel.model import check_lengths
from .parallel.documents import ShardedDocLayout, padding_as_documents, shard_documents, sharded_doc_memory
from .parallel.model import gather_memory, global_mean_loss, global_positions, next_token_targets

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
IGNORE_INDEX = -100


@dataclass
class HSAOutput:
    """logits [B, N, vocab] for the last N = logits_to_keep positions (all L by default); loss (mean next-token
    cross entropy) when labels were given; retrieval: with `return_retrieval=True`, for each HSA block the
    selected chunks [B, N, Hr, K] (chunk c of a document covers its tokens [c*S, (c+1)*S); -1 for empty slots
    and padding); retrieval_weights: with it too, the weights [B, N, Hr, K] that mix those chunks' outputs
    (0 for empty slots)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    retrieval: list[torch.Tensor] | None = None
    retrieval_weights: list[torch.Tensor] | None = None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(written: Path, target: Path) -> None:
    """Flush `written` to disk, rename it to `target` and flush the folder, so the rename survives a crash."""
    _fsync(written)
    os.replace(written, target)
    _fsync(target.parent)


Selections = list[tuple[torch.Tensor, torch.Tensor]]  # per HSA block: chunks [B, L, Hr, K], weights [B, L, Hr, K]


def _last(selections: Selections, n: int) -> Selections:
    """The selections of the last n positions."""
    return [(i[:, i.shape[1] - n:], w[:, w.shape[1] - n:]) for i, w in selections]


class HSAHybrid(nn.Module):
    """The hybrid language model. `HSAHybrid(HSAHybridConfig.preset("tiny"))`."""

    def __init__(self, config: HSAHybridConfig):
        super().__init__()
        config.validate()
        self.config = config
        n_lower = config.n_lower_layers
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.lower = nn.ModuleList(Block(config, i) for i in range(n_lower))
        self.memory_norm = RMSNorm(config.d_model, config.norm_eps) if config.use_hsa else None
        self.encoder = ChunkEncoder(config) if config.use_hsa else None
        self.upper = nn.ModuleList(
            HSABlock(config, i) if config.is_hsa_layer(i) else Block(config, i)
            for i in range(n_lower, config.n_layers)
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in the backward pass to save memory
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for linear and embedding weights, output projections scaled down by
        sqrt(2 * n_layers); mixers keep their own initialisation of everything else (Mamba2's A, dt, D, conv)."""
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.config.n_layers) if name.endswith(("o_proj", "down_proj", "out_proj")) else 1.0
                nn.init.normal_(module.weight, std=std * scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def selection_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters that decide which chunks each token selects and their weights, and little else: the
        chunk encoder's CLS vector and landmark projection, and each HSA block's retrieval-query projection.
        What a token reads from the chunks it selects (memory keys/values, the reading queries) does not depend
        on them, except through the CLS position that the chunk's tokens also attend to. Needs HSA blocks."""
        if self.encoder is None:
            raise ValueError("selection_parameters: this model has no HSA blocks (use_hsa=False), so nothing selects")
        names = ("encoder.cls", "encoder.lmk_proj.weight")
        return {name: p for name, p in self.named_parameters()
                if name in names or name.endswith(".hsa.qr_proj.weight")}

    @property
    def upper_all_swa(self) -> bool:
        """Whether every upper block mixes with SWA: then the upper stack has a finite receptive field."""
        return all(m == "swa" for m in self.config.mixers[self.config.n_lower_layers:])

    @property
    def upper_receptive_field(self) -> int:
        """How many earlier positions the upper stack of an all-SWA model reads: n_upper * (window - 1)."""
        return self.config.n_upper_layers * (self.config.window - 1)

    generate = generate

    def compile_blocks(self, mode: str = "default") -> "HSAHybrid":
        """Compile each block (and the chunk encoder) in place with `torch.compile`, forward and backward: fewer,
        fused kernels, which matters where the host bounds the step (small batches, Mamba2's many small ops).
        mode: torch.compile's ("default", "reduce-overhead" for CUDA graphs, "max-autotune"). Weights,
        state_dict and results are unchanged; the first calls of each new input shape compile."""
        for module in (*self.lower, *self.upper, *([self.encoder] if self.encoder is not None else [])):
            module.compile(mode=None if mode == "default" else mode)
        return self

    def new_cache(self, batch_size: int, offload: bool = False, max_tokens: int | None = None) -> HSACache:
        """An empty inference cache for `model(input_ids, cache=cache)`; offload=True keeps the memory
        keys/values in (pinned) CPU memory and brings only the selected chunks to the device.

        max_tokens: allocate the chunk memory for this many tokens per row at once, so that a long prefill
        fails at the start (MemoryError) rather than midway, and never holds the old and the doubled buffers
        together; longer inputs still work (the memory grows by doubling past it)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        weight = self.embed.weight
        states = self.allocate_inference_cache(batch_size, weight.device, weight.dtype)
        return HSACache(self.config, self, states, batch_size, weight.device, weight.dtype, offload, max_tokens)

    def allocate_inference_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype,
                                 upper_only: bool = False) -> list:
        """The empty inference state of every block's mixer (of the upper blocks only with upper_only)."""
        blocks = list(self.upper) if upper_only else [*self.lower, *self.upper]
        return [block.allocate_inference_cache(batch_size, device, dtype) for block in blocks]

    # ------------------------------------------------------------------ forward
    def _check_ids(self, input_ids: torch.Tensor, labels: torch.Tensor | None) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D tensor [batch, length], got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"input_ids must be an integer tensor (token ids), got {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token per row")
        vocab = self.config.vocab_size
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"input_ids must lie in [0, vocab_size={vocab}), got values in [{low}, {high}]; "
                             "is the tokenizer the one this model was built for?")
        if labels is not None:
            if labels.shape != input_ids.shape or labels.is_floating_point():
                raise ValueError(f"labels must be an integer tensor shaped like input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(labels.shape)} {labels.dtype}")
            bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
            if bool(bad.any()):
                raise ValueError(f"labels must be token ids in [0, {vocab}) or {IGNORE_INDEX} (ignored)")

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        return_retrieval: bool = False,
        cache: HSACache | None = None,
        logits_to_keep: int | None = None,
    ) -> HSAOutput:
        """input_ids [B, L] -> HSAOutput.

        labels [B, L]: targets aligned with input_ids (the model shifts them: position t predicts labels[t+1]);
        -100 is ignored (a batch whose labels are all ignored gets loss 0 and a RuntimeWarning, not NaN).
        attention_mask [B, L]: 1 for tokens, 0 for padding (left or right). Packed documents:
        doc_ids [B, L] (each run of equal ids is a document) or cu_seqlens [num_docs + 1] (document offsets
        into the flattened batch): tokens never mix with, and never retrieve from, another document.

        cache: continue from an inference cache (`new_cache`) and update it; the input is the next segment
        (one token when decoding); attention_mask may mark left padding in the first call only. Under
        context_parallel the first call prefills this rank's slice of the prompt into a cache sharded across
        the ranks, and later calls give every rank the same tokens (ramba.parallel.cache).
        logits_to_keep: compute logits for the last N positions only (0: none). When every upper block is
        SWA, the upper stack then runs only on those positions and their receptive field (exact).
        """
        self._check_ids(input_ids, labels)
        length = input_ids.shape[1]
        if logits_to_keep is not None and (not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool)):
            raise TypeError(f"logits_to_keep must be an int (how many last positions get logits) or None, got "
                            f"{logits_to_keep!r}")
        keep = length if logits_to_keep is None else logits_to_keep
        if not 0 <= keep <= length:
            raise ValueError(f"logits_to_keep must be in [0, {length}] (the input length), got {logits_to_keep}")
        if labels is not None and keep != length:
            raise ValueError("labels need the logits of every position: leave logits_to_keep unset")
        cp = active()
        if cp is not None:
            check_context_parallel(cp, self.config.chunk_size, input_ids, cu_seqlens is not None, logits_to_keep,
                                   self.gradient_checkpointing and self.training)
            if cache is None:
                check_lengths(cp, self.config.chunk_size, input_ids)
            else:
                check_cache_inputs(cp, cache, self.config.chunk_size, input_ids, attention_mask is not None,
                                   labels is not None)
            doc_ids, labels, attention_mask = padding_as_documents(attention_mask, doc_ids, labels)
        elif cache is not None and cache.context_parallel is not None:
            raise ValueError("this cache is sharded across the ranks of a context-parallel group: continue it "
                             "under context_parallel(group), on every rank")
        if cache is not None:
            if doc_ids is not None or cu_seqlens is not None:
                raise ValueError("packed documents (doc_ids, cu_seqlens) are not supported with a cache: run one "
                                 "document per batch row")
            if cp is not None:
                x, retrieval = forward_cached_sharded(self, input_ids, cache, cp)
            else:
                x, retrieval = self._forward_cached(input_ids, attention_mask, cache, keep)
        else:
            x, retrieval = self._forward_full(input_ids, attention_mask, doc_ids, cu_seqlens, keep)
        logits = self.lm_head(self.norm(x))
        loss = None
        if labels is not None and cp is not None:
            loss = global_mean_loss(logits, next_token_targets(labels, cp), cp)
        elif labels is not None:
            targets = labels[:, 1:].long()
            if attention_mask is not None:
                targets = targets.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
            loss = self._loss(logits, targets)
        if not return_retrieval:
            return HSAOutput(logits=logits, loss=loss)
        return HSAOutput(logits=logits, loss=loss, retrieval=[i for i, _ in retrieval],
                         retrieval_weights=[w for _, w in retrieval])

    @staticmethod
    def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross entropy of logits [B, L, V] (all but the last position) against targets [B, L - 1].

        When every target is ignored (-100, or padding) there is nothing to average: the loss is 0 (still
        attached to the graph, so backward gives zero gradients) and a RuntimeWarning says so, rather than
        the NaN of an empty mean."""
        flat = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, logits.shape[-1])
        if not bool((targets != IGNORE_INDEX).any()):
            warnings.warn("every label is ignored (-100 or padding): the loss is 0 for this batch", RuntimeWarning,
                          stacklevel=3)
            return flat.sum() * 0.0
        return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX)

    def _block(self, block: nn.Module, *args):
        """Run a block, through activation checkpointing when gradient_checkpointing is on in training."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _run_upper(self, x: torch.Tensor, memory: Memory | None, layout: DocLayout, docs: DocIndex | None,
                   states: list | None, positions: torch.Tensor | None,
                   valid: torch.Tensor | None) -> tuple[torch.Tensor, Selections]:
        retrieval = []
        for i, block in enumerate(self.upper):
            state = None if states is None else states[i]
            if isinstance(block, HSABlock):
                x, indices, weights = self._block(block, x, docs, memory, layout, state, positions, valid)
                retrieval.append((indices, weights))
            else:
                x = self._block(block, x, docs, state, positions, valid)
        return x, retrieval

    def _forward_full(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, doc_ids: torch.Tensor | None,
                      cu_seqlens: torch.Tensor | None, keep: int) -> tuple[torch.Tensor, Selections]:
        """The whole input at once; returns the last `keep` final hidden states and the retrievals."""
        length = input_ids.shape[1]
        cp = active()  # under context parallelism: this rank's slice, at its global positions
        if cp is not None and doc_ids is not None:  # documents may continue across the slices
            layout = shard_documents(doc_ids.to(input_ids.device), cp, attention_mask)
        else:
            layout = build_layout(tuple(input_ids.shape), input_ids.device, attention_mask, doc_ids, cu_seqlens)
        positions = None if cp is None else global_positions(cp, length, input_ids.device)
        x = self.embed(input_ids.long())
        for block in self.lower:
            x = self._block(block, x, layout.docs, None, positions)
        memory = None
        if self.encoder is not None and isinstance(layout, ShardedDocLayout):
            memory = sharded_doc_memory(self.encoder, self.memory_norm(x), layout, cp)
        elif self.encoder is not None:
            memory = self.encoder(layout.unpack(self.memory_norm(x)))
            if cp is not None:
                memory = gather_memory(memory, cp)
        start = length - keep - self.upper_receptive_field
        if self.upper_all_swa and layout.trivial and start > 0:  # exact shortcut: only the receptive field
            positions = torch.arange(start, length, device=x.device)
            x, retrieval = self._run_upper(x[:, start:], memory, layout, None, None, positions, None)
            return x[:, x.shape[1] - keep:], _last(retrieval, keep)
        x, retrieval = self._run_upper(x, memory, layout, layout.docs, None, positions, None)
        return x[:, length - keep:], _last(retrieval, keep)

    def _forward_cached(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: HSACache,
                        keep: int) -> tuple[torch.Tensor, Selections]:
        """The next segment of every row, continuing from and updating `cache`."""
        cache.check(self, input_ids, attention_mask, self.embed.weight)
        B, L = input_ids.shape
        device = input_ids.device
        valid = None if attention_mask is None else attention_mask.to(device) != 0
        if valid is not None and bool((valid[:, :-1] & ~valid[:, 1:]).any()):
            raise ValueError("with a cache, attention_mask must be left padding (zeros before the tokens of a row)")
        pads = torch.zeros(B, dtype=torch.long, device=device) if valid is None else (~valid).sum(1)
        positions = cache.lengths[:, None] + torch.arange(L, device=device)[None] - pads[:, None]
        n_lower = self.config.n_lower_layers
        x = self.embed(input_ids.long())
        for i, block in enumerate(self.lower):
            x = block(x, None, cache.states[i], positions, valid)
        real = torch.ones(B, L, dtype=torch.bool, device=device) if valid is None else valid
        if self.encoder is not None:
            chunks, completed = cache.update_pending(self.memory_norm(x), real)
            if chunks.shape[1]:
                cache.store.append(self.encoder(chunks), completed)
        cache.lengths += real.sum(1)
        layout = DocLayout(B, L)
        upper_states = cache.states[n_lower:]
        if not self.upper_all_swa:
            x, retrieval = self._run_upper(x, cache.store, layout, None, upper_states, positions, valid)
            return x[:, L - keep:], _last(retrieval, keep)

        # all-SWA upper stack: keep the lower outputs of its receptive field, run it only where needed
        R = self.upper_receptive_field
        context, context_valid, context_positions = cache.extend_context(x, real, positions, R)
        if keep == 0:
            cache.upper_stale = True
            return x[:, L:], []
        if cache.upper_stale or keep + R < L:
            # fresh states: the window's first R positions rebuild every layer's last W-1 keys exactly
            start = max(0, context.shape[1] - keep - R)
            fresh = self.allocate_inference_cache(B, device, cache.dtype, upper_only=True)
            x, retrieval = self._run_upper(context[:, start:], cache.store, DocLayout(B, context.shape[1] - start),
                                           None, fresh, context_positions[:, start:], context_valid[:, start:])
            cache.states[n_lower:] = fresh
            cache.upper_stale = False
        else:
            x, retrieval = self._run_upper(x, cache.store, layout, None, upper_states, positions, valid)
        return x[:, x.shape[1] - keep:], _last(retrieval, keep)

    # ---------------------------------------------------------------- save/load
    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors (weights only, no pickle, in their current dtypes) into
        `directory`, creating it when needed. Each file is written under a temporary name, flushed to disk and
        renamed, the weights first: a kill at any moment leaves no truncated file under either name."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"save_pretrained: {directory} is a file; give a directory to write "
                                     f"{CONFIG_FILE} and {WEIGHTS_FILE} into")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:
            raise NotADirectoryError(f"save_pretrained: cannot create the directory {directory}: a part of that "
                                     f"path is a file ({e.strerror})") from None
        weights = directory / f".{WEIGHTS_FILE}.partial"
        safetensors.torch.save_model(self, str(weights))
        _replace_durably(weights, directory / WEIGHTS_FILE)
        config = directory / f".{CONFIG_FILE}.partial"
        self.config.to_json(config)
        _replace_durably(config, directory / CONFIG_FILE)  # last: a config.json means its weights are complete

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, **overrides: Any) -> "HSAHybrid":
        """Load a model written by save_pretrained; `overrides` replace fields of its config (those that keep
        every weight's shape, e.g. softmax_off_by_one or retrieval_weights).

        dtype: the floating dtype of the loaded model; None keeps the dtypes the weights were saved in (a model
        saved in bfloat16 comes back in bfloat16). Raises ValueError, naming the file, for a truncated or
        damaged weight file, and, naming the tensor, for weights that hold NaN or inf.
        """
        directory = Path(directory)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"from_pretrained: dtype must be a floating torch.dtype (e.g. torch.bfloat16) or None "
                            f"(keep the saved dtypes), got {dtype!r}")
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found: from_pretrained needs a directory written "
                                        "by HSAHybrid.save_pretrained (config.json and model.safetensors)")
        weights = directory / WEIGHTS_FILE
        config = HSAHybridConfig.from_json(directory / CONFIG_FILE)
        model = cls(HSAHybridConfig.from_dict({**config.to_dict(), **overrides}) if overrides else config)
        changed = f" with overrides {sorted(overrides)}" if overrides else ""
        try:
            saved = _saved_float_dtypes(weights)
            _set_dtypes(model, saved if dtype is None else dtype)
            missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False, device=str(device))
        except safetensors.SafetensorError as e:
            raise ValueError(f"{weights} is damaged or truncated ({e}); save the model again or restore the "
                             "file") from None
        except RuntimeError as e:  # a weight of another shape than the config gives it
            raise ValueError(f"{weights} does not fit its config{changed}: {e}") from None
        if missing or unexpected:
            raise ValueError(f"{weights} does not match its config{changed}: missing "
                             f"{sorted(missing)}, unexpected {sorted(unexpected)}")
        _check_finite(model, saved, weights)
        return model.to(device)


# safetensors' names of the floating dtypes
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _saved_float_dtypes(path: Path) -> dict[str, torch.dtype]:
    """name -> dtype of every floating tensor in a safetensors file (reads the header only)."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    return {name: FLOAT_DTYPES[d] for name, d in dtypes.items() if d in FLOAT_DTYPES}


def _set_dtypes(model: nn.Module, dtypes: torch.dtype | dict[str, torch.dtype]) -> None:
    """Cast the model to one dtype, or each saved tensor to its own dtype (when the file holds one floating
    dtype, the whole model, non-persistent buffers included, takes it, as the saved model had)."""
    if isinstance(dtypes, dict) and len(set(dtypes.values())) == 1:
        dtypes = next(iter(dtypes.values()))
    if isinstance(dtypes, torch.dtype):
        model.to(dtypes)
        return
    for name, tensor in model.state_dict(keep_vars=True).items():  # tied weights appear under both names
        if name in dtypes and tensor.is_floating_point():
            tensor.data = tensor.data.to(dtypes[name])


def _check_finite(model: nn.Module, names: Iterable[str], path: Path) -> None:
    """Raise ValueError naming the file and the tensors when a loaded weight holds NaN or inf."""
    state = model.state_dict()
    names = [n for n in names if n in state]
    if not names:
        return
    finite = torch.stack([torch.isfinite(state[n]).all() for n in names]).tolist()  # one device sync
    bad = [n for n, ok in zip(names, finite) if not ok]
    if bad:
        raise ValueError(f"{path}: tensor(s) {', '.join(bad)} hold NaN or inf values; the file is damaged or "
                         "was saved from a model whose training diverged, and would give NaN logits")
