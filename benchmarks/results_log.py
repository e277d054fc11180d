"""The results log of a benchmark run, OUT/results.jsonl: one JSON line per finished sample, kept so that a
kill at any moment loses no finished row.

Rows are only ever appended, each line with one write and an fsync; opening the log mends what a kill can
leave behind without rewriting it: a last line cut short is truncated away (its sample runs again), a
complete last row that lost its newline gets one. Rows of a sample already in the log (two runs into the
same folder) are ignored. OUT/settings.json is written whole and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from benchmarks.common import BenchmarkError

logger = logging.getLogger("ramba.benchmarks")
KEY_FIELDS = ("model", "task", "length", "depth", "index")  # one sample of one model
REQUIRED_FIELDS = KEY_FIELDS + ("score",)


def sample_key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY_FIELDS)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` all at once: written beside it, fsynced, renamed over it."""
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_line(path: Path, line: str) -> None:
    """Append one line (one write of the whole line, then fsync)."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _objects(line: str) -> list:
    """The JSON values of one line: usually one, several where a lost newline joined rows."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while at < len(line):
        value, at = decoder.raw_decode(line, at)
        found.append(value)
        while at < len(line) and line[at].isspace():
            at += 1
    return found


def _check(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise BenchmarkError(f"{where} is not a result row (a JSON object): fix or remove that line")
    missing = [k for k in REQUIRED_FIELDS if k not in row]
    if missing:
        raise BenchmarkError(f"{where} lacks the field(s) {', '.join(missing)} of a result row "
                             f"({', '.join(REQUIRED_FIELDS)}): fix or remove that line")
    score = row["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise BenchmarkError(f"{where}: score must be a number, got {score!r}: fix or remove that line")
    return row


def read_rows(path: Path) -> list[dict]:
    """The rows of a results log, first one of each sample only, after mending the end of the file."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    text, tail = data[:end].decode(errors="replace"), data[end:]
    if tail.strip():
        try:
            _check(json.loads(tail), "")
            text += tail.decode() + "\n"  # a finished row whose newline was lost
            append_line(path, "")
        except (ValueError, BenchmarkError):
            os.truncate(path, end)  # a write cut short: only the unfinished row goes
            logger.warning("%s: dropped an unfinished last line (a write cut short); its sample runs again", path)
    rows, seen, duplicates = [], set(), 0
    for n, line in enumerate(text.splitlines(), 1):
        try:
            values = _objects(line.strip())
        except ValueError as err:
            raise BenchmarkError(f"{path}, line {n}, is not JSON ({err}): fix or remove that line") from None
        for value in values:
            row = _check(value, f"{path}, line {n},")
            key = sample_key(row)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            rows.append(row)
    if duplicates:
        logger.warning("%s: %d row(s) repeat a sample already logged (two runs into one --out?): the first of "
                       "each is kept", path, duplicates)
    return rows


class ResultsLog:
    """OUT/results.jsonl and OUT/settings.json; reopening them skips the samples already there (same model,
    task, length, depth and sample index), and refuses a folder that holds results of other settings."""

    def __init__(self, out_dir: Path, settings: dict) -> None:
        self.path, self._settings_path, self._settings = out_dir / "results.jsonl", out_dir / "settings.json", settings
        if self._settings_path.exists():
            try:
                old = json.loads(self._settings_path.read_text())
            except ValueError as err:
                raise BenchmarkError(f"{self._settings_path} is not JSON ({err}): restore it or choose another "
                                     "--out") from None
            changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            if changed:
                raise BenchmarkError(f"{out_dir} holds results of a run with other settings "
                                     f"({', '.join(f'{k}: {a!r} then, {b!r} now' for k, (a, b) in changed.items())});"
                                     " resume with the same settings or choose another --out")
        self.rows = read_rows(self.path) if self.path.exists() else []
        self._done = {sample_key(r) for r in self.rows}

    def done(self, model: str, key) -> bool:
        """Whether `model` has a row for the sample `key` (a ramba.data.tasks.Key) already."""
        return (model, key.task, key.length, key.depth, key.index) in self._done

    def add(self, row: dict) -> None:
        """Append a finished sample's row (ignored if its sample is in the log already)."""
        key = sample_key(_check(row, "a new row"))
        if key in self._done:
            return
        if not self._settings_path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self._settings_path, json.dumps(self._settings, indent=1) + "\n")
        append_line(self.path, json.dumps(row))
        self.rows.append(row)
        self._done.add(key)
