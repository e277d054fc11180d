"""Tokenizers behind one small interface: the built-in ByteTokenizer and Hugging Face tokenizers.

`load_tokenizer(spec, checkpoint)` picks one: "byte", a Hugging Face name or local path, or a checkpoint's
own tokenizer files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
BYTE_TOKENIZER_CLASS = "RambaByteTokenizer"  # tokenizer_config.json's class of ByteTokenizer (ramba.integrations.hf)


class Tokenizer(Protocol):
    """What the library needs of a tokenizer; special ids are None where the tokenizer has none."""

    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """Byte-level tokenizer; needs no vocabulary file."""

    name = "byte"
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

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """UTF-8 bytes of each text, without specials."""
        return [list(text.encode("utf-8")) for text in texts]

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


@dataclass(frozen=True)
class HFTokenizer:
    """A Hugging Face tokenizer (from `load_hf_tokenizer`); encodes without special tokens, decodes without
    them. pad_id falls back to eos_id."""

    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    _encode_many: Callable[[list[str]], list[list[int]]] = field(repr=False)
    _decode: Callable[[list[int]], str] = field(repr=False)

    def encode(self, text: str) -> list[int]:
        return self.encode_many([text])[0] if text else []

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._encode_many(list(texts))] if texts else []

    def decode(self, ids: Iterable[int]) -> str:
        return self._decode([int(i) for i in ids])


def _special_id(tok, config: Path, key: str) -> int | None:
    """The id of tokenizer_config.json's `key` ("bos_token", ...) in a `tokenizers.Tokenizer`."""
    if not config.is_file():
        return None
    token = json.loads(config.read_text()).get(key)
    token = token.get("content") if isinstance(token, dict) else token
    return tok.token_to_id(token) if token else None


def _from_transformers(spec: str) -> HFTokenizer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec)
    eos = tok.eos_token_id
    return HFTokenizer(spec, len(tok), tok.bos_token_id, eos, eos if tok.pad_token_id is None else tok.pad_token_id,
                       lambda texts: tok(texts, add_special_tokens=False)["input_ids"],
                       lambda ids: tok.decode(ids, skip_special_tokens=True))


def _from_tokenizers(spec: str) -> HFTokenizer:
    from tokenizers import Tokenizer as RustTokenizer

    root = Path(spec)
    file = root / "tokenizer.json" if root.is_dir() else root
    tok = RustTokenizer.from_file(str(file))
    config = file.parent / "tokenizer_config.json"
    eos, pad = _special_id(tok, config, "eos_token"), _special_id(tok, config, "pad_token")
    return HFTokenizer(spec, tok.get_vocab_size(), _special_id(tok, config, "bos_token"), eos,
                       eos if pad is None else pad,
                       lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)],
                       lambda ids: tok.decode(ids, skip_special_tokens=True))


def load_hf_tokenizer(spec: str) -> HFTokenizer:
    """A Hugging Face tokenizer: a hub name or local path through `transformers`, else a local directory (or
    tokenizer.json file) through `tokenizers`. ImportError without either package; ValueError if it does
    not load."""
    try:
        import transformers  # noqa: F401

        load = _from_transformers
    except ImportError:
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            raise ImportError(f"the tokenizer {spec!r} needs the `transformers` or `tokenizers` package: "
                              "pip install transformers (or use the byte tokenizer)") from None
        load = _from_tokenizers
    try:
        return load(spec)
    except Exception as err:  # the libraries raise OSError, ValueError, Exception...
        raise ValueError(f"could not load a tokenizer from {spec!r}: {err}") from err


def _tokenizer_class(folder: Path) -> str | None:
    """tokenizer_config.json's tokenizer_class in `folder`, if it names one."""
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("tokenizer_class")
    except (json.JSONDecodeError, AttributeError):
        return None


def load_tokenizer(spec: str | None = None, checkpoint: str | Path | None = None) -> Tokenizer:
    """"byte": ByteTokenizer; a Hugging Face name or local path: HFTokenizer; None: the checkpoint's own
    tokenizer files if it has any (ByteTokenizer for RambaByteTokenizer's files), else ByteTokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    if spec is not None:
        return load_hf_tokenizer(spec)
    if checkpoint is not None and any((Path(checkpoint) / f).is_file() for f in TOKENIZER_FILES):
        if _tokenizer_class(Path(checkpoint)) == BYTE_TOKENIZER_CLASS:
            return ByteTokenizer()
        return load_hf_tokenizer(str(checkpoint))
    return ByteTokenizer()
