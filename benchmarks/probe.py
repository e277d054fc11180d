r"""Where a model looks when it answers: for each prompt of a task, whether the chunks its HSA blocks select for
each answer token hold the asked fact, another inserted fact, or neither, and how much weight each gets,
beside the answer's score.
It tells a retrieval failure (the asked fact's chunk not read, or outweighed by others) from a reading
failure (read and weighted, answered wrong).

python -m benchmarks.probe --checkpoint DIR --task niah_multikey_1 --lengths 4k,64k [--samples 20] [--seed 1]
    [--segment 65536] [--device cpu] [--forced] [--out FILE.md]

An inserted fact is "asked" when it holds one of the references (see fact_chunks). A token's selection is the
union over HSA blocks and retrieval heads at the position that predicts it, and the weight on a fact is the
retrieval weight its chunks get there, averaged over blocks and heads (1 = all of it); answer tokens that are
only whitespace are not counted.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.common import command_line, parse_length
from ramba import HSAHybrid
from ramba.data.tasks import TASKS, Key, Sample, make_sample, score
from ramba.loading import load_model
from ramba.steering import forced_retrieval
from ramba.tokenizer import Tokenizer, load_tokenizer

MAX_FACT_TOKENS = 256


def fact_chunks(sample: Sample, tokenizer: Tokenizer, chunk_size: int) -> tuple[set[int], set[int]]:
    """(chunks holding part of an asked fact, chunks holding part of another inserted fact).

    A fact starts at its insert offset. One whose next MAX_FACT_TOKENS tokens hold a reference is asked and
    ends after the last of those mentions (a pass key is stated twice); any other ends at its first '.'."""
    ids = sample.prompt_ids.tolist()
    asked, other = set(), set()
    for start in sample.insert_offsets:
        window = ids[start:start + MAX_FACT_TOKENS]
        refs = [ref for ref in sample.references if ref in tokenizer.decode(window)]
        mentions = sum(tokenizer.decode(window).count(ref) for ref in refs)

        def complete(text: str) -> bool:
            return sum(text.count(ref) for ref in refs) == mentions if refs else "." in text.strip()

        end = next((n for n in range(1, len(window) + 1) if complete(tokenizer.decode(window[:n]))), len(window))
        chunks = set(range(start // chunk_size, (start + end - 1) // chunk_size + 1))
        (asked if refs else other).update(chunks)
    return asked, other - asked


def _mixing(out, token: int = -1) -> list[dict[int, float]]:
    """At one position (the last by default), for every HSA block and retrieval head: selected chunk -> its
    retrieval weight."""
    return [{c: w for c, w in zip(chunks.tolist(), weights.tolist()) if c >= 0}
            for indices, mixing in zip(out.retrieval, out.retrieval_weights)
            for chunks, weights in zip(indices[0, token], mixing[0, token].float())]


def _weight_on(chunks: set[int], mixing: list[dict[int, float]]) -> float:
    """The weight that the selections put on `chunks`, averaged over HSA blocks and retrieval heads."""
    return statistics.fmean(sum(w for c, w in head.items() if c in chunks) for head in mixing) if mixing else 0.0


def _answer(model: HSAHybrid, tokenizer: Tokenizer, sample: Sample, segment: int):
    """Greedy answer ids (without the stop token) after a segment-wise prefill, and generate's output."""
    stops = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    out = model.generate(sample.prompt_ids.long()[None], sample.max_new_tokens, stop_tokens=stops,
                         segment_size=segment, progress=False, return_retrieval=True)
    generated = out.sequences[0, sample.prompt_ids.numel():].tolist()
    return next((generated[:i] for i, token in enumerate(generated) if token in stops), generated), out


def probe_one(model: HSAHybrid, tokenizer: Tokenizer, sample: Sample, segment: int, forced: bool = False) -> dict:
    """Prefill the prompt segment-wise and answer greedily, keeping the chunks read for every answer token;
    with `forced`, answer again with every HSA block reading only the asked fact's chunks (forced_output)."""
    answer, out = _answer(model, tokenizer, sample, segment)
    reads = [_mixing(out, t) for t in range(len(answer))]  # what was read, and how much, to predict each token
    asked, other = fact_chunks(sample, tokenizer, model.config.chunk_size)
    content = [mixing for token, mixing in zip(answer, reads) if tokenizer.decode([token]).strip()]
    selected = [set().union(*mixing) for mixing in content]

    def mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else 0.0

    row = {"output": tokenizer.decode(answer),
           "asked_read": mean([bool(asked & r) for r in selected]),
           "other_read": mean([len(other & r) for r in selected]),
           "other_facts": len(other),
           "asked_weight": mean([_weight_on(asked, m) for m in content]),
           "other_weight": mean([_weight_on(other, m) for m in content])}
    if forced:
        with forced_retrieval(model, sorted(asked)):
            row["forced_output"] = tokenizer.decode(_answer(model, tokenizer, sample, segment)[0])
    return row


def run(model: HSAHybrid, tokenizer: Tokenizer, task: str, lengths: list[int], samples: int, seed: int,
        segment: int, forced: bool = False) -> list[dict]:
    """One row per (length, sample index), with the answer's score under the task's rule (and with `forced`
    the score of the answer given while reading only the asked fact's chunks)."""
    rows = []
    for length in lengths:
        for index in tqdm(range(samples), desc=f"{task} {length:,}", leave=False):
            sample = make_sample(Key(task, length, None, index), tokenizer, seed)
            row = probe_one(model, tokenizer, sample, segment, forced)
            row.update(length=length, index=index, score=score(task, row["output"], sample.references))
            if forced:
                row["forced_score"] = score(task, row["forced_output"], sample.references)
            rows.append(row)
    return rows


def table(rows: list[dict], task: str) -> str:
    forced = all("forced_score" in r for r in rows)
    lines = [f"| {task} length | prompts | answers right | answer tokens that read the asked fact | other facts' "
             "chunks read per answer token (of) | retrieval weight on the asked fact | on the other facts |"
             + (" answers right, reading only the asked fact |" if forced else ""),
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if forced else "")]
    for length in sorted({r["length"] for r in rows}):
        cell = [r for r in rows if r["length"] == length]
        lines.append(f"| {length:,} | {len(cell)} | {statistics.fmean(r['score'] for r in cell):.0%} | "
                     f"{statistics.fmean(r['asked_read'] for r in cell):.0%} | "
                     f"{statistics.fmean(r['other_read'] for r in cell):.1f} of "
                     f"{statistics.fmean(r['other_facts'] for r in cell):.1f} | "
                     f"{statistics.fmean(r['asked_weight'] for r in cell):.2f} | "
                     f"{statistics.fmean(r['other_weight'] for r in cell):.2f} |"
                     + (f" {statistics.fmean(r['forced_score'] for r in cell):.0%} |" if forced else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a directory written by HSAHybrid.save_pretrained, or builtin:tiny-random")
    p.add_argument("--task", default="niah_multikey_1", help=f"one of {', '.join(TASKS)}")
    p.add_argument("--lengths", default="4k")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--segment", type=int, default=65536)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", default="byte")
    p.add_argument("--forced", action="store_true",
                   help="also answer each prompt with every HSA block reading only the asked fact's chunks "
                        "(ramba.steering.forced_retrieval): right then but wrong before is a selection failure")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    if args.task not in TASKS:
        p.error(f"--task: unknown {args.task!r}; known: {', '.join(TASKS)}")
    try:
        model = load_model(args.checkpoint, args.device, "float32")
    except ValueError as err:
        p.error(f"--checkpoint: {err}")
    tokenizer = load_tokenizer(args.tokenizer)
    rows = run(model, tokenizer, args.task, [parse_length(x) for x in args.lengths.split(",")], args.samples,
               args.seed, args.segment, args.forced)
    text = table(rows, args.task)
    print(text)
    if args.out:
        Path(args.out).write_text(f"`{command_line('probe', argv)}`\n\n{text}")
    return text


if __name__ == "__main__":
    main()
