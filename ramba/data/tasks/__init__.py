"""Long-context tasks: prompts of an exact token length with the answers to score them against.

Every task is a function of one signature, `TaskFn`:

    TASKS[name](rng: random.Random, tokenizer: Tokenizer, length: int, depth: float | None = None) -> Sample

- rng: the sample's only random source (`sample_rng(seed, key)` derives one from a seed and a `Key`);
- tokenizer: any `ramba.tokenizer.Tokenizer` (bos is prepended where it has one);
- length: the prompt length in tokens, met exactly (TaskError if the task does not fit);
- depth: where the asked fact goes, a fraction of the haystack in [0, 1] (None: random); tasks whose facts
  all lie at random depths (vt, cwe, fwe, qa1..qa5) do not use it; qa_1 and qa_2 put their answer document
  there.

`draw(task, rng, tokenizer, length, depth, haystack)` calls a task with another haystack where it takes one:
passkey and the niah tasks whose haystack is text (HAYSTACK_TASKS); "text:PATH" puts a corpus there.

A Sample holds prompt_ids (int32 [length]), target (the ideal continuation), references (what scoring looks
for), max_new_tokens and the token offset of each inserted fact. `score(task, output, references)` is in
[0, 1]; it is 1 for the target.

Tasks: passkey; niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery, vt, cwe, fwe
(RULER-style); qa1..qa5 (bAbI-style, as in BABILong); qa_1, qa_2 (RULER's single- and multi-hop QA over
documents, made up or read from SQuAD / HotpotQA dev files: ruler_qa). `kv` (key-value recall, outside the
registry) and `passkey` make the built-in pre-training mixture (ramba.data.synthetic); `filler` holds the essay text.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from ramba.tokenizer import Tokenizer

from . import babilong, filler, kv, passkey, ruler, ruler_qa
from .prompt import (HAYSTACKS, Key, Prompt, Sample, TaskError, TaskFn, build_prompt, check_haystack, encode_prompt,
                     sample_rng)

TASKS: dict[str, TaskFn] = {"passkey": passkey.sample, **ruler.TASKS, **babilong.TASKS, **ruler_qa.TASKS}
SCORES: dict[str, Callable[[str, list[str]], float]] = {
    "passkey": passkey.score,
    **dict.fromkeys(ruler.TASKS, ruler.match_all),
    **dict.fromkeys(babilong.TASKS, babilong.score),
    **dict.fromkeys(ruler_qa.TASKS, ruler.match_part),
}
# tasks whose haystack is text that another haystack can replace (niah_multikey_2/_3's are distractor needles)
HAYSTACK_TASKS = frozenset(["passkey", *(name for name, spec in ruler.NIAH.items() if spec.haystack != "needles")])


def _known(task: str) -> None:
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def draw(task: str, rng: random.Random, tokenizer: Tokenizer, length: int, depth: float | None = None,
         haystack: str | None = None) -> Sample:
    """TASKS[task](rng, tokenizer, length, depth); `haystack` (noise, essay or text:PATH: check_haystack) replaces
    the haystack of the HAYSTACK_TASKS, while the other tasks keep their own."""
    _known(task)
    if haystack is not None and task in HAYSTACK_TASKS:
        return TASKS[task](rng, tokenizer, length, depth, haystack=haystack)
    return TASKS[task](rng, tokenizer, length, depth)


def make_sample(key: Key, tokenizer: Tokenizer, seed: int = 0, haystack: str | None = None) -> Sample:
    """The sample of (seed, key): `draw` at key.length and key.depth, from sample_rng(seed, key)."""
    return draw(key.task, sample_rng(seed, key), tokenizer, key.length, key.depth, haystack)


def score(task: str, output: str, references: list[str]) -> float:
    """How right `output` is, in [0, 1], by the task's own rule (see each task module)."""
    _known(task)
    return SCORES[task](output, references)


__all__ = ["HAYSTACKS", "HAYSTACK_TASKS", "SCORES", "TASKS", "Key", "Prompt", "Sample", "TaskError", "TaskFn",
           "build_prompt", "check_haystack", "draw", "encode_prompt", "make_sample", "sample_rng", "score"]
