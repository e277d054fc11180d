"""ByteTokenizer: UTF-8 bytes as ids 0..255, then pad, bos and eos."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class ByteTokenizer:
    """Byte-level tokenizer; needs no vocabulary file."""

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259
    special_names = {pad_id: "<pad>", bos_id: "<bos>", eos_id: "<eos>"}

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """UTF-8 bytes of `text`, optionally wrapped in bos / eos."""
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD, specials are dropped or shown as `<pad>` etc."""
        parts: list[str] = []
        run = bytearray()
        for raw in ids:
            i = int(raw)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside [0, {self.vocab_size})")
            if i < 256:
                run.append(i)
                continue
            if not skip_special:
                parts.append(run.decode("utf-8", errors="replace"))
                run.clear()
                parts.append(self.special_names[i])
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def batch_encode(self, texts: Sequence[str], length: int, pad: bool = True) -> torch.Tensor:
        """LongTensor [N, length] of the texts, right-padded with pad_id.

        With pad=False every text must encode to exactly `length` bytes.
        A text longer than `length` raises ValueError (nothing is truncated).
        """
        rows = []
        for n, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > length:
                raise ValueError(f"text {n} encodes to {len(ids)} tokens, longer than length={length}")
            if len(ids) < length and not pad:
                raise ValueError(f"text {n} encodes to {len(ids)} tokens, shorter than length={length} and pad=False")
            rows.append(ids + [self.pad_id] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)
