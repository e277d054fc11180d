r"""RULER-style synthetic tasks, generated locally from a seed, and prepared RULER jsonl files (QA tasks).

python -m benchmarks.ruler --checkpoint DIR --lengths 4k,64k,1m [--tasks niah_single_1,vt,...] \
    [--depths 0,0.5,1] [--haystack text:PATH] [--data qa_1.jsonl[@4k] ...] [--samples N] [--out DIR] \
    [--segment 4096] [--device cuda] [--qa-data-dir DIR]

Tasks (ramba.data.tasks.ruler; prompts exactly the asked length in tokens): needles in a haystack
(niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery), vt (variable tracking), cwe and fwe
(common and frequent words), qa_1 and qa_2 (single- and multi-hop questions over documents: made-up
documents by default; with --qa-data-dir DIR, questions and paragraphs of the SQuAD v2 and HotpotQA dev files
dev-v2.0.json and hotpot_dev_distractor_v1.json in DIR; see ramba.data.tasks.ruler_qa).

Scoring as RULER: a sample scores the fraction of its references found in the output (case-insensitive),
except QA tasks, which score 1 if any reference is found. `--data` runs RULER-format jsonl files prepared
elsewhere (fields `input`, `outputs`, optional `answer_prefix` and `length`): the task is the file name (or
its folder's, for validation.jsonl), the length the next power of two of the records' `length`, or `@LENGTH`.
Without --tasks, all synthetic tasks run unless --data is given. `--haystack` replaces the noise or essay
haystack of the niah tasks (not the distractor-needle haystacks of niah_multikey_2/_3, nor vt, cwe, fwe):
`text:PATH` puts the needles in the sentences of a corpus file, such as a held-out validation.jsonl.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import BenchmarkError, parse_depths, parse_lengths
from benchmarks.runner import add_common_args, main_guard, run
from ramba.data.tasks import Key, Sample, check_haystack, encode_prompt, make_sample as task_sample, sample_rng
from ramba.data.tasks import ruler_qa
from ramba.data.tasks.ruler import NIAH, TASKS as SYNTHETIC, answer_budget, match_all, match_part
from ramba.tokenizer import Tokenizer

TASKS = {**SYNTHETIC, **ruler_qa.TASKS}
DEPTH_TASKS = {*NIAH, *ruler_qa.TASKS}  # tasks that place their asked fact at --depths


# ------------------------------------------------------------------------------------- RULER jsonl files
@dataclass
class FileTask:
    """Records of a RULER-format jsonl file: one task at one length."""

    name: str
    length: int
    records: list[dict]


def load_ruler_file(spec: str, limit: int | None = None) -> FileTask:
    """`PATH[@LENGTH]` -> its first `limit` records, checked for `input` and `outputs`."""
    text, _, length_text = spec.rpartition("@")
    if not text or not re.fullmatch(r"\d+(\.\d+)?[kmg]?", length_text.strip().lower()):
        text, length_text = spec, ""
    path = Path(text)
    if not path.is_file():
        raise BenchmarkError(f"--data {text}: no such file")
    records = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise BenchmarkError(f"{path}, line {n}, is not JSON: {err}") from None
            outputs = record.get("outputs") if isinstance(record, dict) else None
            if not isinstance(record.get("input"), str) or not isinstance(outputs, list) or not outputs:
                raise BenchmarkError(f"{path}, line {n}: a RULER record needs `input` (the prompt text) and "
                                     "`outputs` (a non-empty list of answers)")
            records.append(record)
    if not records:
        raise BenchmarkError(f"{path} holds no records")
    name = path.parent.name if path.stem in ("validation", "test") else path.stem
    if length_text:
        length = parse_lengths(length_text)[0]
    else:
        tokens = max(int(r.get("length", 0)) for r in records)
        if tokens < 1:
            raise BenchmarkError(f"{path}: the records carry no `length`; give the length as {text}@4k, say")
        length = 1 << (tokens - 1).bit_length()
    return FileTask(name, length, records)


def _file_sample(task: FileTask, index: int, tokenizer: Tokenizer) -> Sample:
    record = task.records[index]
    prefix = record.get("answer_prefix") or ""
    text = record["input"] if record["input"].endswith(prefix) else record["input"] + prefix
    references = [str(o) for o in record["outputs"]]
    target = " " + (references[0] if task.name.startswith("qa") else ", ".join(references))
    return Sample(encode_prompt(tokenizer, text), target, references, answer_budget(task.name, tokenizer, target))


# ----------------------------------------------------------------------------------------------- scoring
def score(task: str, output: str, references: list[str]) -> float:
    """RULER's rule: QA tasks (qa_*) score 1 if any reference is found, the others the fraction found."""
    return match_part(output, references) if task.startswith("qa") else match_all(output, references)


# ---------------------------------------------------------------------------------------------- commands
def parse_tasks(text: str) -> list[str]:
    """'niah_single_1,vt' or 'all' -> task names, checked."""
    names = list(TASKS) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise BenchmarkError(f"unknown RULER task(s) {', '.join(map(repr, unknown)) or repr(text)}; known: "
                             f"{', '.join(TASKS)} (other tasks run from RULER jsonl files given with --data)")
    return names


def make_sample(key: Key, tokenizer: Tokenizer, seed: int = 0, files: dict[tuple[str, int], FileTask] | None = None,
                haystack: str | None = None, qa_data_dir: str | None = None) -> Sample:
    """A synthetic task's sample for (seed, key), or the key's record of a loaded file; `haystack` replaces the
    noise or essay haystack of niah tasks, `qa_data_dir` (holding the SQuAD / HotpotQA dev files) the made-up
    documents of qa_1 and qa_2."""
    if files and (key.task, key.length) in files:
        return _file_sample(files[key.task, key.length], key.index, tokenizer)
    if key.task not in TASKS:
        raise BenchmarkError(f"unknown RULER task {key.task!r}; known: {', '.join(TASKS)}")
    if qa_data_dir is not None and key.task in ruler_qa.TASKS:
        return ruler_qa.sample(key.task, sample_rng(seed, key), tokenizer, key.length, key.depth, qa_data_dir)
    return task_sample(key, tokenizer, seed, haystack)


def keys(tasks: list[str], lengths: list[int], depths: list[float] | None, samples: int,
         files: dict[tuple[str, int], FileTask]) -> list[Key]:
    """Shortest lengths first; needle and QA tasks at each depth when depths are given (else at random depths)."""
    out = [Key(t, n, d, i) for n in lengths for t in tasks
           for d in (depths if depths and t in DEPTH_TASKS else [None]) for i in range(samples)]
    out += [Key(name, n, None, i) for (name, n), task in files.items() for i in range(len(task.records))]
    return sorted(out, key=lambda k: (k.length, k.task, -1 if k.depth is None else k.depth, k.index))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, "ruler", "4k,8k,16k,32k,64k,128k", samples=10)
    parser.add_argument("--tasks", help=f"comma-separated, or 'all': {', '.join(TASKS)}")
    parser.add_argument("--depths", help="place the asked needle of niah tasks, the answer document of qa_1 and "
                                         "qa_2, at these depths (default: random)")
    parser.add_argument("--data", action="append", default=[], metavar="PATH[@LENGTH]",
                        help="a RULER-format jsonl file to run (repeatable)")
    parser.add_argument("--haystack", help="noise, essay or text:PATH (sentences of a corpus .jsonl or .txt): the "
                                           "haystack of the niah tasks (default: each task's own)")
    parser.add_argument("--qa-data-dir", metavar="DIR",
                        help="qa_1 and qa_2 from the official dev files in DIR (dev-v2.0.json of SQuAD v2, "
                             "hotpot_dev_distractor_v1.json of HotpotQA) instead of made-up documents")
    args = parser.parse_args(argv)

    def go() -> str:
        tasks = parse_tasks(args.tasks) if args.tasks else [] if args.data else list(TASKS)
        files: dict[tuple[str, int], FileTask] = {}
        for spec in args.data:
            task = load_ruler_file(spec, args.samples)
            if task.name in tasks or (task.name, task.length) in files:
                raise BenchmarkError(f"task {task.name!r} at length {task.length} is given twice")
            files[task.name, task.length] = task
        if args.haystack is not None:
            check_haystack(args.haystack)
        if args.qa_data_dir is not None:
            for task in sorted(set(tasks) & set(ruler_qa.TASKS)):
                ruler_qa.load(task, args.qa_data_dir)  # fail early on a missing or malformed file
        depths = parse_depths(args.depths) if args.depths else None
        todo = keys(tasks, parse_lengths(args.lengths), depths, args.samples, files)
        extra = {**({"haystack": args.haystack} if args.haystack else {}),
                 **({"qa_data_dir": args.qa_data_dir} if args.qa_data_dir else {})}
        return run(args, "RULER", todo,
                   lambda key, tok: make_sample(key, tok, args.seed, files, args.haystack, args.qa_data_dir),
                   score, extra)

    return main_guard(go)


if __name__ == "__main__":
    main()
