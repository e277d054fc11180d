"""Texts of a corpus file: a .jsonl (or .json) file with one JSON object per line, the text in a named field,
or any other file as one plain text."""

from __future__ import annotations

import json
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".json")


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """The texts of `path`: each line's `field` of a .jsonl file (blank lines skipped), else the whole file
    (invalid UTF-8 replaced). Raises ValueError naming the file and line of a line that is not a JSON object
    with a string `field`."""
    path = Path(path)
    if path.suffix not in JSONL_SUFFIXES:
        return [path.read_text(encoding="utf-8", errors="replace")]
    texts = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}, line {n}, is not JSON ({err})") from None
            if not isinstance(record, dict) or field not in record:
                fields = ", ".join(map(str, record)) if isinstance(record, dict) else "none: not a JSON object"
                raise ValueError(f"{path}, line {n}, has no field {field!r} (its fields: {fields})")
            if not isinstance(record[field], str):
                raise ValueError(f"{path}, line {n}: field {field!r} is not a string")
            texts.append(record[field])
    return texts
