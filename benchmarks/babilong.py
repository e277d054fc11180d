r"""BABILong: bAbI reasoning questions whose facts are spread through long text.

python -m benchmarks.babilong --checkpoint DIR --lengths 4k,64k,1m [--tasks qa1,qa2,qa3,qa4,qa5] [--samples N] \
    [--hf-dataset RMT-team/babilong | --data-dir DIR] [--out DIR] [--segment 4096] [--device cuda]

Data, one of:
- the built-in generator (default; offline): bAbI-style stories for qa1..qa5 (one, two and three supporting
  facts, two- and three-argument relations) with their facts placed in order at random depths of essay-like
  filler text, the prompt exactly the asked length in tokens;
- `--hf-dataset NAME`: the official data through `datasets` (config = length such as "4k" or "1M", split = task;
  the other layout, config = task and split = length, is tried too); fields `input`, `question`, `target`;
- `--data-dir DIR`: the same records from local files, DIR/<length>/<task>.* or DIR/<task>/<length>.* (jsonl,
  json or parquet), lengths named as the official ones (4k, 128k, 1M).
A sample is right iff every comma-separated part of the answer appears as a word in the output (any case).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from functools import lru_cache, partial
from pathlib import Path

from benchmarks.common import BenchmarkError, parse_lengths
from benchmarks.runner import add_common_args, main_guard, run
from ramba.data.tasks import Key, Sample, babilong, encode_prompt, make_sample
from ramba.tokenizer import Tokenizer


def generated_sample(key: Key, tokenizer: Tokenizer, seed: int = 0) -> Sample:
    """A generated story (ramba.data.tasks.babilong) with its facts in order at random depths of filler text."""
    if key.task not in babilong.TASKS:
        raise BenchmarkError(f"unknown BABILong task {key.task!r} for the built-in generator; known: "
                             f"{', '.join(babilong.TASKS)} (the official data has qa1..qa10 and more)")
    return make_sample(key, tokenizer, seed)


def length_name(length: int) -> str:
    """The official data's name of a length: 4096 -> '4k', 2**20 -> '1M'."""
    return f"{length >> 20}M" if length % 2**20 == 0 else f"{length >> 10}k"


def _local_records(root: Path, task: str, name: str) -> Sequence[dict]:
    files = sorted(f for pattern in (f"{name}/{task}[.-]*", f"{task}/{name}[.-]*", f"data/{task}/{name}.*")
                   for f in root.glob(pattern) if f.suffix in (".jsonl", ".json", ".parquet"))
    if not files:
        raise BenchmarkError(f"no BABILong file for {task} at {name} in {root} (looked for {name}/{task}.jsonl, "
                             f"{task}/{name}.jsonl, .json or .parquet)")
    if all(f.suffix == ".jsonl" for f in files):
        return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    from datasets import load_dataset

    return load_dataset("parquet" if files[0].suffix == ".parquet" else "json", data_files=[str(f) for f in files],
                        split="train")


def _hub_records(source: str, task: str, name: str) -> Sequence[dict]:
    from datasets import load_dataset

    errors = []
    for config, split in ((name, task), (task, name)):  # both layouts of the official dataset
        try:
            return load_dataset(source, config, split=split)
        except Exception as err:  # unreachable hub, unknown config or split...
            errors.append(f"{config}/{split}: {err}")
    raise BenchmarkError(f"could not load {task} at {name} from {source}: {'; '.join(errors)}")


@lru_cache(maxsize=1)
def _records(source: str, task: str, length: int) -> Sequence[dict]:
    """The records of (task, length) from a Hugging Face dataset name or a local directory ('dir:PATH')."""
    if length % 1024:
        raise BenchmarkError(f"the official BABILong data has lengths such as 4k, 128k and 1M, not {length}")
    if source.startswith("dir:"):
        return _local_records(Path(source[4:]), task, length_name(length))
    return _hub_records(source, task, length_name(length))


def official_sample(key: Key, tokenizer: Tokenizer, source: str) -> Sample:
    """The key's record of the official data: instructions, its context, its question."""
    records = _records(source, key.task, key.length)
    if key.index >= len(records):
        raise BenchmarkError(f"{key.task} at {length_name(key.length)} has only {len(records)} samples")
    record = records[key.index]
    missing = [f for f in ("input", "question", "target") if f not in record]
    if missing:
        raise BenchmarkError(f"BABILong records need input, question and target; {key.task} lacks {missing}")
    text = babilong.HEAD + record["input"] + babilong.question_tail(record["question"])
    answer = str(record["target"])
    return Sample(encode_prompt(tokenizer, text), f" {answer}", [answer],
                  max(babilong.MAX_NEW_TOKENS, len(tokenizer.encode(answer)) + 8))


def score(task: str, output: str, references: list[str]) -> float:
    """BABILong's rule for every task, official ones included (see ramba.data.tasks.babilong.score)."""
    return babilong.score(output, references)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, "babilong", "4k,16k,64k,128k", samples=10)
    parser.add_argument("--tasks", default="qa1,qa2,qa3,qa4,qa5")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--hf-dataset", help="official data through `datasets`, e.g. RMT-team/babilong")
    source.add_argument("--data-dir", help="official data as local files")
    args = parser.parse_args(argv)

    def go() -> str:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        data = args.hf_dataset or (f"dir:{args.data_dir}" if args.data_dir else None)
        if data is None:
            unknown = [t for t in tasks if t not in babilong.TASKS]
            if unknown or not tasks:
                raise BenchmarkError(f"unknown BABILong task(s) {unknown or args.tasks!r} for the built-in generator;"
                                     f" known: {', '.join(babilong.TASKS)}")
            make = partial(generated_sample, seed=args.seed)
        else:
            make = partial(official_sample, source=data)
        todo = [Key(t, n, None, i) for n in parse_lengths(args.lengths) for t in tasks for i in range(args.samples)]
        return run(args, "BABILong", todo, make, score, {"data": data or "generated"})

    return main_guard(go)


if __name__ == "__main__":
    main()
