"""Shared pieces of the long-context benchmarks (passkey, RULER, BABILong).

Models and tokenizers, greedy answering with a segment-wise prefill, prompts built to an exact token length,
a resumable results log, summaries (JSON and markdown) and plots.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, count, cycle, islice
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from benchmarks.long_context import parse_length
from ramba import HSAHybrid, HSAHybridConfig
from ramba.data.synthetic import filler
from ramba.tokenizer import ByteTokenizer

logger = logging.getLogger("ramba.benchmarks")
BUILTIN = {"builtin:tiny-random": "tiny"}
PROGRESS_SEGMENTS = 16  # prefill progress bar from this many segments on


class BenchmarkError(ValueError):
    """Bad benchmark input: an unknown task, a length too short for a task, a checkpoint that does not load."""


# ---------------------------------------------------------------------------------------------- lengths
def parse_lengths(text: str) -> list[int]:
    """'4k,64k,1m' -> [4096, 65536, 1048576] (sorted, without repeats)."""
    lengths = set()
    for item in text.split(","):
        try:
            value = parse_length(item)
        except ValueError:
            value = 0
        if value < 1:
            raise BenchmarkError(f"bad length {item.strip()!r}: give token counts such as 4096, 4k, 1m or 64m")
        lengths.add(value)
    return sorted(lengths)


def format_length(n: int) -> str:
    """4096 -> '4K', 2**20 -> '1M', 3000 -> '3000'."""
    if n % 2**20 == 0:
        return f"{n >> 20}M"
    return f"{n >> 10}K" if n % 2**10 == 0 else str(n)


def parse_depths(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; each a fraction of the haystack in [0, 1]."""
    try:
        depths = sorted({float(x) for x in text.split(",")})
    except ValueError:
        raise BenchmarkError(f"bad depths {text!r}: give fractions such as 0,0.25,0.5,0.75,1") from None
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise BenchmarkError(f"depths must lie in [0, 1], got {text!r}")
    return depths


# ------------------------------------------------------------------------------------------- tokenizers
class Tokenizer(Protocol):
    """What the benchmarks need of a tokenizer."""

    name: str
    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTextTokenizer:
    """ramba's ByteTokenizer: UTF-8 bytes, with bos and eos."""

    name = "byte"

    def __init__(self) -> None:
        self._tok = ByteTokenizer()
        self.bos_id, self.eos_id, self.vocab_size = self._tok.bos_id, self._tok.eos_id, self._tok.vocab_size

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids)


@dataclass
class HFTokenizer:
    """A Hugging Face tokenizer read from a local path (through `transformers`, else `tokenizers`)."""

    name: str
    bos_id: int | None
    eos_id: int | None
    vocab_size: int
    _encode: Callable[[list[str]], list[list[int]]]
    _decode: Callable[[list[int]], str]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._encode(list(texts))] if texts else []

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode([int(i) for i in ids])


def _special_id(tok, config: Path, key: str) -> int | None:
    """The id of tokenizer_config.json's `key` ("bos_token", "eos_token") in a `tokenizers.Tokenizer`."""
    if not config.is_file():
        return None
    token = json.loads(config.read_text()).get(key)
    token = token.get("content") if isinstance(token, dict) else token
    return tok.token_to_id(token) if token else None


def load_hf_tokenizer(path: str) -> HFTokenizer:
    """A tokenizer directory (or tokenizer.json file) on disk; no downloads."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        AutoTokenizer = None
    try:
        if AutoTokenizer is not None:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            return HFTokenizer(path, tok.bos_token_id, tok.eos_token_id, len(tok),
                               lambda texts: tok(texts, add_special_tokens=False)["input_ids"],
                               lambda ids: tok.decode(ids, skip_special_tokens=True))
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:
            raise BenchmarkError(f"the tokenizer {path!r} needs the `transformers` or `tokenizers` package: "
                                 "pip install transformers (or use --tokenizer byte)") from None
        root = Path(path)
        file = root / "tokenizer.json" if root.is_dir() else root
        tok = RustTokenizer.from_file(str(file))
        config = file.parent / "tokenizer_config.json"
        return HFTokenizer(path, _special_id(tok, config, "bos_token"), _special_id(tok, config, "eos_token"),
                           tok.get_vocab_size(),
                           lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)],
                           lambda ids: tok.decode(ids, skip_special_tokens=True))
    except BenchmarkError:
        raise
    except Exception as err:  # the libraries raise OSError, ValueError, Exception...
        raise BenchmarkError(f"could not load a tokenizer from {path!r}: {err}") from err


def load_tokenizer(spec: str | None, checkpoint: str | None = None) -> Tokenizer:
    """'byte', a local Hugging Face tokenizer path, or None: the checkpoint's own tokenizer files if it has
    any, else the byte tokenizer."""
    if spec == "byte":
        return ByteTextTokenizer()
    if spec is not None:
        return load_hf_tokenizer(spec)
    if checkpoint and any((Path(checkpoint) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return load_hf_tokenizer(checkpoint)
    return ByteTextTokenizer()


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode_many([text])[0] if text else []


# ------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Key:
    """Identifies one sample of a sweep."""

    task: str
    length: int
    depth: float | None
    index: int


def sample_rng(seed: int, key: Key) -> random.Random:
    """The random source of one sample: the same for the same seed and key, whatever else runs."""
    return random.Random(f"{seed}:{key.task}:{key.length}:{key.depth}:{key.index}")


@dataclass
class Sample:
    """One question: prompt token ids (int32, CPU), the ideal continuation, and what scoring looks for."""

    prompt_ids: torch.Tensor
    target: str
    references: list[str]
    max_new_tokens: int
    insert_offsets: list[int] = field(default_factory=list)  # token offset of each inserted fact


@dataclass
class Prompt:
    """A prompt built by build_prompt."""

    ids: torch.Tensor  # int32 [length]
    insert_offsets: list[int]  # token offset of each insert, in the order given
    whole_units: int  # haystack units included whole (the next one may be cut)


def _haystack(tokenizer: Tokenizer, units: Iterator[str], budget: int) -> tuple[torch.Tensor, list[int], int]:
    """Token ids of the first `budget` tokens of the concatenated units, the unit boundaries (token offsets,
    0 and `budget` included) and the number of whole units."""
    pieces, bounds, total = [], [0], 0
    while total < budget:
        size = 64 if total == 0 else min(65536, max(64, int(1.05 * (budget - total) * (len(bounds) - 1) / total)))
        block = list(islice(units, size))
        if not block:
            raise BenchmarkError("the haystack ran out of text")
        encoded = tokenizer.encode_many(block)
        for ids in encoded:
            total += len(ids)
            bounds.append(total)
        pieces.append(torch.tensor(list(chain.from_iterable(encoded)), dtype=torch.int32))
    ids = torch.cat(pieces)[:budget]
    whole = bisect.bisect_right(bounds, budget) - 1
    bounds = bounds[:whole + 1]
    if bounds[-1] != budget:
        bounds.append(budget)
    return ids, bounds, whole


def _nearest(bounds: list[int], position: float) -> int:
    i = bisect.bisect_left(bounds, position)
    candidates = bounds[max(0, i - 1):i + 1]
    return min(candidates, key=lambda b: abs(b - position))


def build_prompt(tokenizer: Tokenizer, length: int, head: str, units: Iterator[str],
                 inserts: Sequence[tuple[float, str]], tail: str, task: str) -> Prompt:
    """bos + head + haystack + tail of exactly `length` tokens, with each (depth, text) insert placed at the unit
    boundary of the haystack nearest `depth` (0: its start, 1: its end; inserts at one place keep their order).

    The haystack is the token stream of `units` cut at the length that remains; units and inserts carry their
    own separators (a leading space, say).
    """
    head_ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + encode(tokenizer, head)
    tail_ids = encode(tokenizer, tail)
    insert_ids = tokenizer.encode_many([text for _, text in inserts])
    fixed = len(head_ids) + len(tail_ids) + sum(map(len, insert_ids))
    if fixed >= length:
        raise BenchmarkError(f"{task}: a length of {length} tokens is too short; its instructions, question and "
                             f"{len(inserts)} inserted fact(s) alone take {fixed} tokens")
    hay, bounds, whole = _haystack(tokenizer, units, length - fixed)
    slots = [_nearest(bounds, depth * len(hay)) for depth, _ in inserts]
    parts, offsets, cursor, offset = [torch.tensor(head_ids, dtype=torch.int32)], [0] * len(inserts), 0, len(head_ids)
    for k in sorted(range(len(inserts)), key=lambda k: (slots[k], k)):
        parts.append(hay[cursor:slots[k]])
        offset += slots[k] - cursor
        cursor = slots[k]
        offsets[k] = offset
        parts.append(torch.tensor(insert_ids[k], dtype=torch.int32))
        offset += len(insert_ids[k])
    parts += [hay[cursor:], torch.tensor(tail_ids, dtype=torch.int32)]
    return Prompt(torch.cat(parts), offsets, whole)


NOISE = ("The sky is clear and the sea is calm.", "The fields are green.", "A boat drifts past the old pier.",
         "Nothing much happens here.", "Then it all starts over.")
HAYSTACKS = ("noise", "essay")


def haystack_units(kind: str, rng: random.Random) -> Iterator[str]:
    """Haystack text, unit by unit (each with a leading space): `noise`, one short passage repeated, or `essay`,
    English-like filler sentences (ramba.data.synthetic.filler) drawn from a generator seeded by `rng`."""
    if kind == "noise":
        return (" " + sentence for sentence in cycle(NOISE))
    if kind == "essay":
        child = random.Random(rng.getrandbits(64))
        return (" " + filler(child, 120) for _ in count())
    raise BenchmarkError(f"unknown haystack {kind!r}; choose one of {', '.join(HAYSTACKS)}")


# --------------------------------------------------------------------------------------------- answering
class Answerer(Protocol):
    """Anything that answers samples: a model with its tokenizer, or the oracle."""

    name: str
    tokenizer: Tokenizer

    def answer(self, sample: Sample) -> str: ...


def _device(model: torch.nn.Module) -> torch.device:
    tensor = next(chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def answer_greedy(model: torch.nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, segment: int = 4096,
                  stop_ids: Sequence[int] = (), offload: bool = False, progress: bool | None = None) -> list[int]:
    """Greedy continuation (token ids, without the stop token) of a 1-D prompt.

    The prompt is prefilled in segments into a cache (`model.new_cache(1)`, then `model(segment, cache=cache,
    logits_to_keep=0)`, the last segment keeping one logit), so memory stays flat in the prompt length apart
    from the model's chunk memory; only one segment at a time goes to the model's device. `model` is an
    HSAHybrid or any module with the same `new_cache` / `forward(..., cache=, logits_to_keep=)` interface.
    """
    if prompt_ids.dim() != 1 or prompt_ids.numel() == 0:
        raise ValueError(f"prompt_ids must be a non-empty 1-D tensor, got shape {tuple(prompt_ids.shape)}")
    if segment < 1:
        raise ValueError(f"segment must be >= 1, got {segment}")
    model.eval()
    device = _device(model)
    cache = model.new_cache(1, offload=offload)
    starts = range(0, prompt_ids.numel(), segment)
    show = len(starts) >= PROGRESS_SEGMENTS if progress is None else progress
    for start in tqdm(starts, desc="prefill", unit="segment", leave=False, disable=not show):
        piece = prompt_ids[start:start + segment].to(device).long()[None]
        last = start + segment >= prompt_ids.numel()
        logits = model(piece, cache=cache, logits_to_keep=1 if last else 0).logits
    out: list[int] = []
    stops = set(stop_ids)
    while len(out) < max_new_tokens:
        token = int(logits[0, -1].argmax())
        if token in stops:
            break
        out.append(token)
        if len(out) < max_new_tokens:
            logits = model(torch.tensor([[token]], device=device), cache=cache).logits
    return out


@dataclass
class ModelAnswerer:
    """Greedy answers of a model (HSAHybrid or the same interface)."""

    name: str
    model: torch.nn.Module
    tokenizer: Tokenizer
    segment: int = 4096
    offload: bool = False

    def answer(self, sample: Sample) -> str:
        stops = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
        ids = answer_greedy(self.model, sample.prompt_ids, sample.max_new_tokens, self.segment, stops, self.offload)
        return self.tokenizer.decode(ids)


@dataclass
class OracleAnswerer:
    """Always answers the ideal continuation: checks the benchmark pipeline and its scoring end to end."""

    name: str
    tokenizer: Tokenizer

    def answer(self, sample: Sample) -> str:
        return sample.target


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_answerer(spec: str, tokenizer: str | None = None, device: str = "cpu", dtype: str = "auto",
                  segment: int = 4096, offload: bool = False) -> Answerer:
    """`--checkpoint` value -> Answerer: `[NAME=]DIR` (a directory written by HSAHybrid.save_pretrained),
    `builtin:tiny-random` (the tiny preset, randomly initialised, seed 0) or `oracle`."""
    name, sep, path = spec.partition("=")
    if not sep:
        name = path = spec
    if path == "oracle":
        return OracleAnswerer(name, load_tokenizer(tokenizer))
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    if path.startswith("builtin:"):
        if path not in BUILTIN:
            raise BenchmarkError(f"unknown built-in model {path!r}; known: {', '.join(BUILTIN)}")
        torch.manual_seed(0)
        model = HSAHybrid(HSAHybridConfig.preset(BUILTIN[path]))
        tok = load_tokenizer(tokenizer)
    else:
        try:
            model = HSAHybrid.from_pretrained(path)
        except Exception as err:  # missing files, bad JSON, a bad config, weights that do not match...
            raise BenchmarkError(f"could not load a model from {path!r}: {err}\n--checkpoint takes a directory "
                                 "written by HSAHybrid.save_pretrained (config.json and model.safetensors), "
                                 f"{', '.join(BUILTIN)} or oracle") from err
        tok = load_tokenizer(tokenizer, path)
    if tok.vocab_size > model.config.vocab_size:
        raise BenchmarkError(f"the tokenizer {tok.name!r} has {tok.vocab_size} ids but the model {name!r} only "
                             f"{model.config.vocab_size}: give the model's own tokenizer with --tokenizer")
    model = model.to(dev, _dtype(dtype, dev)).eval()
    return ModelAnswerer(name, model, tok, segment, offload)


# ------------------------------------------------------------------------------------------ results log
def _key_of(row: dict) -> tuple:
    return row["model"], row["task"], row["length"], row["depth"], row["index"]


class ResultsLog:
    """OUT/results.jsonl: one JSON line per finished sample, appended as it finishes; reopening it skips the
    samples already there (same model, task, length, depth and sample index)."""

    def __init__(self, out_dir: Path, settings: dict) -> None:
        self.path, self._settings_path, self._settings = out_dir / "results.jsonl", out_dir / "settings.json", settings
        if self._settings_path.exists():
            old = json.loads(self._settings_path.read_text())
            changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            if changed:
                raise BenchmarkError(f"{out_dir} holds results of a run with other settings "
                                     f"({', '.join(f'{k}: {a!r} then, {b!r} now' for k, (a, b) in changed.items())});"
                                     " resume with the same settings or choose another --out")
        self.rows: list[dict] = []
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            for n, line in enumerate(lines):
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:
                    if n != len(lines) - 1:
                        raise BenchmarkError(f"{self.path}, line {n + 1}, is not JSON: fix or remove it") from None
                    # a write cut short by a crash: drop it and run that sample again
                    self.path.write_text("".join(f"{json.dumps(r)}\n" for r in self.rows))
        self._done = {_key_of(r) for r in self.rows}

    def done(self, model: str, key: Key) -> bool:
        return (model, key.task, key.length, key.depth, key.index) in self._done

    def add(self, row: dict) -> None:
        if not self._settings_path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._settings_path.write_text(json.dumps(self._settings, indent=1) + "\n")
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        self._done.add(_key_of(row))


Scorer = Callable[[str, str, list[str]], float]  # (task, output, references) -> score in [0, 1]
SampleMaker = Callable[[Key, Tokenizer], Sample]


def sweep(answerer: Answerer, keys: Sequence[Key], make_sample: SampleMaker, score: Scorer, log: ResultsLog,
          progress: bool = True) -> int:
    """Answer and score every key not yet in the log, appending each result as it finishes; returns how many ran."""
    todo = [key for key in keys if not log.done(answerer.name, key)]
    for key in tqdm(todo, desc=answerer.name, unit="sample", disable=not progress or not todo):
        sample = make_sample(key, answerer.tokenizer)
        start = time.perf_counter()
        output = answerer.answer(sample)
        log.add({"model": answerer.name, "task": key.task, "length": key.length, "depth": key.depth,
                 "index": key.index, "score": score(key.task, output, sample.references), "output": output,
                 "references": sample.references, "prompt_tokens": int(sample.prompt_ids.numel()),
                 "seconds": round(time.perf_counter() - start, 3)})
    return len(todo)


# -------------------------------------------------------------------------------------------- summaries
def _mean(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values)


def summarise(rows: list[dict], out_dir: Path, title: str) -> str:
    """Accuracy (%) per model, task and length (over samples and depths) and per depth where there are depths;
    writes OUT/summary.json, OUT/summary.md and the plots, and returns the markdown."""
    by_length: dict[tuple, list[float]] = defaultdict(list)
    by_depth: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        by_length[r["model"], r["task"], r["length"]].append(r["score"])
        if r["depth"] is not None:
            by_depth[r["model"], r["task"], r["length"], r["depth"]].append(r["score"])
    summary = {
        "title": title,
        "by_length": [{"model": m, "task": t, "length": n, "accuracy": _mean(v), "samples": len(v)}
                      for (m, t, n), v in sorted(by_length.items())],
        "by_depth": [{"model": m, "task": t, "length": n, "depth": d, "accuracy": _mean(v), "samples": len(v)}
                     for (m, t, n, d), v in sorted(by_depth.items())],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = _markdown(summary)
    (out_dir / "summary.md").write_text(table + "\n")
    _plots(summary, out_dir)
    return table


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _markdown(summary: dict) -> str:
    lengths = sorted({r["length"] for r in summary["by_length"]})
    acc = {(r["model"], r["task"], r["length"]): r["accuracy"] for r in summary["by_length"]}
    models = sorted({r["model"] for r in summary["by_length"]})
    tasks = sorted({r["task"] for r in summary["by_length"]})
    head = " | ".join(format_length(n) for n in lengths)
    lines = [f"# {summary['title']}", "", "Accuracy (%) by length", "", f"| model | task | {head} |",
             "| --- | --- |" + " ---: |" * len(lengths)]
    for m in models:
        for t in tasks + (["average"] if len(tasks) > 1 else []):
            if t == "average":
                found = [[acc[m, u, n] for u in tasks if (m, u, n) in acc] for n in lengths]
                cells = [sum(v) / len(v) if v else None for v in found]
            else:
                cells = [acc.get((m, t, n)) for n in lengths]
            if any(c is not None for c in cells):
                lines.append(f"| {m} | {t} | " + " | ".join(_cell(c) for c in cells) + " |")
    for m, t in sorted({(r["model"], r["task"]) for r in summary["by_depth"]}):
        grid = {(r["depth"], r["length"]): r["accuracy"]
                for r in summary["by_depth"] if (r["model"], r["task"]) == (m, t)}
        lines += ["", f"{t}, {m}: accuracy (%) by depth and length", "", f"| depth | {head} |",
                  "| ---: |" + " ---: |" * len(lengths)]
        for d in sorted({d for d, _ in grid}):
            lines.append(f"| {d:g} | " + " | ".join(_cell(grid.get((d, n))) for n in lengths) + " |")
    return "\n".join(lines)


def _filename(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _plots(summary: dict, out_dir: Path) -> list[Path]:
    """accuracy.png (accuracy against length, one panel per task, one line per model) and, for tasks swept over
    depths, heatmap_TASK_MODEL.png (depth by length)."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("plots skipped: they need matplotlib (pip install matplotlib)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    tasks = sorted({r["task"] for r in summary["by_length"]})
    if not tasks:
        return []
    cols = min(4, len(tasks))
    rows_ = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.4 * rows_), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        points = [r for r in summary["by_length"] if r["task"] == task]
        for model in sorted({r["model"] for r in points}):
            line = sorted((r["length"], r["accuracy"]) for r in points if r["model"] == model)
            ax.plot([x for x, _ in line], [y for _, y in line], marker="o", label=model)
        ax.set_xscale("log", base=2)
        lengths = sorted({r["length"] for r in points})
        ax.set_xticks(lengths, [format_length(n) for n in lengths])
        ax.set(title=task, xlabel="tokens", ylabel="accuracy (%)", ylim=(-3, 103))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    fig.suptitle(summary["title"])
    fig.tight_layout()
    written.append(out_dir / "accuracy.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    for model, task in sorted({(r["model"], r["task"]) for r in summary["by_depth"]}):
        cells = [r for r in summary["by_depth"] if (r["model"], r["task"]) == (model, task)]
        depths, lengths = sorted({r["depth"] for r in cells}), sorted({r["length"] for r in cells})
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for r in cells:
            grid[depths.index(r["depth"])][lengths.index(r["length"])] = r["accuracy"]
        fig, ax = plt.subplots(figsize=(2.5 + 0.8 * len(lengths), 1.5 + 0.45 * len(depths)))
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, "-" if value != value else f"{value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set(xlabel="tokens", ylabel="depth", title=f"{task}: {model}")
        fig.colorbar(image, ax=ax, label="accuracy (%)")
        fig.tight_layout()
        written.append(out_dir / f"heatmap_{_filename(task)}_{_filename(model)}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


# --------------------------------------------------------------------------------------------------- CLI
def add_common_args(parser: argparse.ArgumentParser, name: str, lengths: str, samples: int) -> None:
    """The options every benchmark command takes."""
    parser.add_argument("--checkpoint", action="append", required=True, metavar="[NAME=]DIR",
                        help="a directory written by HSAHybrid.save_pretrained, builtin:tiny-random or oracle; "
                             "repeat for several models (one line each in the plots)")
    parser.add_argument("--tokenizer", help="'byte' or a local Hugging Face tokenizer path (default: the "
                                            "checkpoint's own tokenizer files if any, else byte)")
    parser.add_argument("--lengths", default=lengths, help="prompt lengths in tokens, e.g. 4k,64k,1m,64m")
    parser.add_argument("--samples", type=int, default=samples, help="samples per cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=f"runs/benchmarks/{name}",
                        help="results.jsonl (resumable), summary.json, summary.md and plots go here")
    parser.add_argument("--segment", type=int, default=4096, help="prefill segment in tokens")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--offload", action="store_true", help="keep the memory K/V in pinned CPU memory")


def run(args: argparse.Namespace, title: str, keys: Sequence[Key], make_sample: SampleMaker, score: Scorer,
        settings: dict) -> str:
    """Sweep every --checkpoint over `keys` (results appended to OUT/results.jsonl, finished samples skipped),
    then summarise everything in the log. A length too short for a task shows up before a model answers."""
    if args.samples < 1 or args.segment < 1:
        raise BenchmarkError("--samples and --segment must be at least 1")
    out = Path(args.out)
    log = ResultsLog(out, {"benchmark": title, "seed": args.seed, "tokenizer": args.tokenizer, **settings})
    for spec in args.checkpoint:
        answerer = load_answerer(spec, args.tokenizer, args.device, args.dtype, args.segment, args.offload)
        shortest: dict[str, Key] = {}
        for key in sorted(keys, key=lambda k: k.length):
            if not log.done(answerer.name, key):
                shortest.setdefault(key.task, key)
        for key in shortest.values():
            make_sample(key, answerer.tokenizer)
        sweep(answerer, keys, make_sample, score, log)
        del answerer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return summarise(log.rows, out, title)


def main_guard(fn: Callable[[], str]) -> str:
    """Run a benchmark command; a BenchmarkError ends it with its message instead of a traceback."""
    try:
        table = fn()
    except BenchmarkError as err:
        raise SystemExit(f"error: {err}") from err
    print(table)
    return table
