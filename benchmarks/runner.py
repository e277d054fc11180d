"""Running a benchmark: the options every command takes and the sweep (results go to a ResultsLog)."""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.answering import Answerer, load_answerer
from benchmarks.common import BenchmarkError
from benchmarks.report import summarise
from benchmarks.results_log import ResultsLog
from ramba.data.tasks import Key, Sample, TaskError
from ramba.tokenizer import Tokenizer


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


def add_common_args(parser: argparse.ArgumentParser, name: str, lengths: str, samples: int) -> None:
    """The options every benchmark command takes."""
    parser.add_argument("--checkpoint", action="append", required=True, metavar="[NAME=]DIR",
                        help="a directory written by HSAHybrid.save_pretrained, builtin:tiny-random or oracle; "
                             "repeat for several models (one line each in the plots)")
    parser.add_argument("--tokenizer", help="'byte', a Hugging Face tokenizer name or local path (default: the "
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
    """Run a benchmark command; a BenchmarkError or TaskError ends it with its message instead of a traceback."""
    try:
        table = fn()
    except (BenchmarkError, TaskError) as err:
        raise SystemExit(f"error: {err}") from err
    print(table)
    return table
