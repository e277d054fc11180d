"""Training data: document sources, and packing into fixed-length sequences.

Sources: "builtin" (the synthetic pass-key / key-value mixture, one document per sequence, with the answer
and needle positions for retrieval statistics), local text / jsonl files (read here), json / parquet files or a
`datasets` hub name (through `datasets`, streamed). Documents of a corpus are tokenized, joined with an
end-of-sequence token and cut into sequences of seq_len tokens with per-token document ids, so that the model
keeps documents apart.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch

from ..data.synthetic import synthetic_examples
from ..data.tasks import TASKS, TaskError, check_haystack, draw
from ..tokenizer import Tokenizer
from .config import DataSection
from .retrieval import asked_spans

MAX_FACTS = 16  # answer-holding facts an example keeps (task_examples' fact_spans)
FILE_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _local_files(data: DataSection) -> tuple[list[Path], str]:
    """The files of a local data.source (a file or a folder searched recursively) and their one format."""
    path = Path(data.source)
    files = sorted(p for p in path.rglob("*") if p.suffix in FILE_FORMATS) if path.is_dir() else [path]
    formats = {FILE_FORMATS.get(p.suffix) for p in files}
    if not files or None in formats or len(formats) > 1:
        raise ValueError(f"data.source {data.source}: give .txt, .jsonl/.json or .parquet files of one kind, "
                         f"found {[p.name for p in files][:5] or 'none'}")
    return files, formats.pop()


def _read_lines(files: list[Path], fmt: str) -> Iterator[dict]:
    """The records of .txt files (one per line, as the field "text") or JSON-lines files (one object per line)."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if fmt == "text":
                    yield {"text": line.rstrip("\n")}
                elif line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{number} is not a JSON object per line ({err})") from None


def _shuffled(records: Iterator[dict], seed: int, buffer_size: int | None) -> Iterator[dict]:
    """records in an order fixed by seed: through a buffer of buffer_size records (streaming), or all at once."""
    rng = random.Random(seed)
    if buffer_size is None:
        everything = list(records)
        rng.shuffle(everything)
        yield from everything
        return
    buffer: list[dict] = []
    for record in records:
        if len(buffer) < buffer_size:
            buffer.append(record)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = record
    rng.shuffle(buffer)
    yield from buffer


def _load_dataset(data: DataSection, seed: int):
    """The shuffled records of data.source: local .txt and .jsonl files read here (no extra package), .json and
    .parquet files and hub names through `datasets`."""
    buffer_size = 10_000 if data.streaming else None
    local = Path(data.source).exists()
    if local:
        files, fmt = _local_files(data)
        if fmt == "text" or all(p.suffix == ".jsonl" for p in files):
            return _shuffled(_read_lines(files, fmt), seed, buffer_size)
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"data.source={data.source!r} needs the datasets package: pip install datasets (local "
                          ".txt and .jsonl files do not)") from err
    if local:
        dataset = datasets.load_dataset(fmt, data_files=[str(p) for p in files], split="train",
                                        streaming=data.streaming)
    else:
        dataset = datasets.load_dataset(data.source, data.hub_config, split=data.split, streaming=data.streaming)
    return dataset.shuffle(seed=seed, buffer_size=buffer_size) if data.streaming else dataset.shuffle(seed=seed)


def corpus_documents(data: DataSection, seed: int) -> Iterator[str]:
    """The texts of a local or hub dataset, in an order fixed by the seed (one pass)."""
    for example in _load_dataset(data, seed):
        if data.text_field not in example:
            raise KeyError(f"data.text_field={data.text_field!r} is not a field of {data.source}; "
                           f"fields: {sorted(example)}")
        yield example[data.text_field]


def pack(documents: Iterator[list[int]], seq_len: int, eos_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Join token lists (each followed by eos) and cut them into sequences of seq_len tokens.

    Yields input_ids, labels and doc_ids [seq_len]; a document cut at a sequence edge continues as a new
    document at the start of the next sequence. labels are -100 on the first token of every document (it
    cannot be predicted from the previous document) and otherwise equal input_ids (the model shifts them).
    """
    ids: list[int] = []
    docs: list[int] = []
    doc = 0
    for tokens in documents:
        tokens = tokens + [eos_id]
        while tokens:
            take = tokens[:seq_len - len(ids)]
            tokens = tokens[len(take):]
            ids += take
            docs += [doc] * len(take)
            if len(ids) == seq_len:
                input_ids, doc_ids = torch.tensor(ids), torch.tensor(docs)
                labels = input_ids.clone()
                starts = torch.ones(seq_len, dtype=torch.bool)
                starts[1:] = doc_ids[1:] != doc_ids[:-1]
                labels[starts] = -100
                yield {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids - doc_ids[0]}
                ids, docs = [], []
        doc += 1


def task_examples(data: DataSection, tokenizer: Tokenizer, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Fine-tuning examples: a random task of data.tasks at a random prompt length in [min_len, seq_len),
    followed by its answer and eos, right-padded to seq_len; data.haystack replaces the haystack of the tasks
    that take one (`ramba.data.tasks.draw`). Only the answer and eos carry labels, or with
    data.loss == "all" every token but the padding.

    Yields input_ids, labels [seq_len], answer_mask (bool [seq_len], the answer tokens), task (a 0-d long:
    the task's first position in data.tasks) and fact_spans [MAX_FACTS, 2] (the token spans [start, end) of
    the inserted facts that hold the answer, rows of -1 after them: ramba.training.retrieval)."""
    unknown = [t for t in data.tasks if t not in TASKS]
    if unknown or not data.tasks:
        raise ValueError(f"data.tasks: unknown {unknown or 'empty list'}; known tasks: {', '.join(TASKS)}")
    if not 16 <= data.min_len < data.seq_len:
        raise ValueError(f"data.min_len must lie in [16, data.seq_len={data.seq_len}), got {data.min_len}")
    if data.haystack is not None:
        try:
            check_haystack(data.haystack)
        except TaskError as err:
            raise ValueError(f"data.haystack: {err}") from None
    rng = random.Random(seed)
    fits = {task: data.seq_len for task in data.tasks}  # the longest prompt that left room for the answer so far
    while True:
        task = rng.choice(data.tasks)
        length = rng.randint(data.min_len, max(data.min_len, fits[task] - 1))
        try:
            sample = draw(task, rng, tokenizer, length, haystack=data.haystack)
        except TaskError:  # too short for this task: draw again (lengths near seq_len will fit)
            continue
        answer = tokenizer.encode(sample.target) + [tokenizer.eos_id]
        if length + len(answer) > data.seq_len:
            fits[task] = min(fits[task], data.seq_len - len(answer))
            if fits[task] <= data.min_len:
                raise ValueError(f"task {task} does not fit data.seq_len={data.seq_len} with its answer")
            continue
        ids = torch.full((data.seq_len,), tokenizer.pad_id, dtype=torch.long)
        ids[:length] = sample.prompt_ids.long()
        ids[length:length + len(answer)] = torch.tensor(answer)
        labels = torch.full_like(ids, -100)
        first = 0 if data.loss == "all" else length
        labels[first:length + len(answer)] = ids[first:length + len(answer)]
        answer_mask = torch.zeros(data.seq_len, dtype=torch.bool)
        answer_mask[length:length + len(answer) - 1] = True
        spans = asked_spans(sample, tokenizer)
        if len(spans) > MAX_FACTS:
            raise ValueError(f"task {task} inserted {len(spans)} facts that hold its answer, more than the {MAX_FACTS} "
                             "an example keeps for the retrieval loss")
        fact_spans = torch.full((MAX_FACTS, 2), -1, dtype=torch.long)
        fact_spans[:len(spans)] = torch.tensor(spans, dtype=torch.long).view(-1, 2)
        yield {"input_ids": ids, "labels": labels, "answer_mask": answer_mask,
               "task": torch.tensor(data.tasks.index(task)), "fact_spans": fact_spans}


def sequences(data: DataSection, tokenizer: Tokenizer, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """The infinite training stream of one process: corpus passes repeat with a new shuffle each epoch."""
    if data.source == "builtin":
        yield from synthetic_examples(seed, data.seq_len, tokenizer)
        return
    if data.source == "tasks":
        yield from task_examples(data, tokenizer, seed)
        return
    for epoch in itertools.count():
        docs = (tokenizer.encode(text) for text in corpus_documents(data, seed + epoch))
        empty = True
        for example in pack(docs, data.seq_len, tokenizer.eos_id):
            empty = False
            yield example
        if empty:
            raise ValueError(f"data.source {data.source} holds fewer than data.seq_len={data.seq_len} tokens")


def batches(stream: Iterator[dict[str, torch.Tensor]], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Stack consecutive examples into batches of batch_size."""
    while True:
        rows = list(itertools.islice(stream, batch_size))
        yield {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
