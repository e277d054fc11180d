"""HSAHybrid: lower stack -> chunk memory -> upper stack with HSA blocks -> LM head (DESIGN.md section 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from .config import HSAHybridConfig
from .documents import build_layout
from .layers.blocks import Block, HSABlock
from .layers.chunk_encoder import ChunkEncoder
from .layers.norm import RMSNorm

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
IGNORE_INDEX = -100


@dataclass
class HSAOutput:
    """logits [B, L, vocab]; loss (mean next-token cross entropy) when labels were given; retrieval: with
    `return_retrieval=True`, for each HSA block the selected chunks [B, L, Hr, K] (chunk c of a document
    covers its tokens [c*S, (c+1)*S); -1 for empty slots and padding)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    retrieval: list[torch.Tensor] | None = None


class HSAHybrid(nn.Module):
    """The hybrid language model. `HSAHybrid(HSAHybridConfig.preset("tiny"))`."""

    def __init__(self, config: HSAHybridConfig):
        super().__init__()
        config.validate()
        self.config = config
        n_lower = config.n_lower_layers
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.lower = nn.ModuleList(Block(config, i) for i in range(n_lower))
        self.memory_norm = RMSNorm(config.d_model, config.norm_eps)
        self.encoder = ChunkEncoder(config)
        self.upper = nn.ModuleList(
            HSABlock(config, i) if config.is_hsa_layer(i) else Block(config, i)
            for i in range(n_lower, config.n_layers)
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
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
    ) -> HSAOutput:
        """input_ids [B, L] -> HSAOutput.

        labels [B, L]: targets aligned with input_ids (the model shifts them: position t predicts labels[t+1]);
        -100 is ignored. attention_mask [B, L]: 1 for tokens, 0 for padding (left or right). Packed documents:
        doc_ids [B, L] (each run of equal ids is a document) or cu_seqlens [num_docs + 1] (document offsets
        into the flattened batch): tokens never mix with, and never retrieve from, another document.
        """
        self._check_ids(input_ids, labels)
        layout = build_layout(tuple(input_ids.shape), input_ids.device, attention_mask, doc_ids, cu_seqlens)
        x = self.embed(input_ids.long())
        for block in self.lower:
            x = block(x, layout.doc_ids)
        memory = self.encoder(layout.unpack(self.memory_norm(x)))
        retrieval = []
        for block in self.upper:
            if isinstance(block, HSABlock):
                x, indices = block(x, layout.doc_ids, memory, layout)
                retrieval.append(indices)
            else:
                x = block(x, layout.doc_ids)
        logits = self.lm_head(self.norm(x))
        loss = None
        if labels is not None:
            targets = labels[:, 1:].long()
            if attention_mask is not None:
                targets = targets.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return HSAOutput(logits=logits, loss=loss, retrieval=retrieval if return_retrieval else None)

    # ---------------------------------------------------------------- save/load
    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors (weights only, no pickle) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.to_json(directory / CONFIG_FILE)
        safetensors.torch.save_model(self, str(directory / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "HSAHybrid":
        """Load a model written by save_pretrained."""
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found: from_pretrained needs a directory written "
                                        "by HSAHybrid.save_pretrained (config.json and model.safetensors)")
        model = cls(HSAHybridConfig.from_json(directory / CONFIG_FILE))
        missing, unexpected = safetensors.torch.load_model(model, str(directory / WEIGHTS_FILE), strict=False,
                                                           device=str(device))
        if missing or unexpected:
            raise ValueError(f"{directory / WEIGHTS_FILE} does not match its config: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
        return model.to(device)
