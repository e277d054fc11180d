"""RambaByteTokenizer: ramba's ByteTokenizer (ids 0-255 bytes, 256 <pad>, 257 <bos>, 258 <eos>) as a transformers
tokenizer, so that AutoTokenizer.from_pretrained loads it from a model folder."""

from __future__ import annotations

from typing import Any

from transformers import AddedToken, PreTrainedTokenizer

from ...tokenizer import ByteTokenizer

BYTES = 256


class RambaByteTokenizer(PreTrainedTokenizer):
    """UTF-8 bytes, no vocabulary file; encodes without special tokens (as ramba's models were trained), and
    text that spells a special token (e.g. "<eos>") stays bytes. Decoding replaces invalid UTF-8 with U+FFFD."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, **kwargs: Any):
        names = ByteTokenizer.special_names
        specials = {i: AddedToken(name, special=True, normalized=False) for i, name in names.items()}
        self._added_tokens_decoder = dict(specials)
        for key, i in (("pad_token", ByteTokenizer.pad_id), ("bos_token", ByteTokenizer.bos_id),
                       ("eos_token", ByteTokenizer.eos_id)):
            kwargs.setdefault(key, specials[i])
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("padding_side", "left")  # generation continues the last column of each row
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return BYTES

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(i): i for i in range(BYTES)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int | None:
        return ord(token) if len(token) == 1 and ord(token) < BYTES else None

    def _convert_id_to_token(self, index: int) -> str:
        return chr(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = bytearray()
        for token in tokens:
            if len(token) == 1 and ord(token) < BYTES:
                data.append(ord(token))
            else:
                data.extend(token.encode("utf-8"))
        return data.decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()
