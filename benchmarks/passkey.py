r"""Pass-key retrieval: a 5-to-7-digit key hidden at a chosen depth of a long haystack, asked for at the end.

python -m benchmarks.passkey --checkpoint DIR --lengths 4k,64k,1m --depths 0,0.25,0.5,0.75,1 \
    [--samples N] [--haystack noise|essay|text:PATH] [--out DIR] [--segment 4096] [--device cuda]

Every prompt is exactly the asked number of tokens and a function of (seed, length, depth, sample index) only
(ramba.data.tasks.passkey). A sample is right iff the first digits the model generates are the key. Accuracy
per (length, depth) goes to OUT/summary.md, OUT/summary.json, OUT/accuracy.png and one depth-by-length heatmap
per model.
"""

from __future__ import annotations

import argparse

from benchmarks.common import parse_depths, parse_lengths
from benchmarks.runner import add_common_args, main_guard, run
from ramba.data.tasks import Key, Sample, check_haystack, passkey, sample_rng, score
from ramba.tokenizer import Tokenizer

TASK = "passkey"


def make_sample(key: Key, tokenizer: Tokenizer, seed: int = 0, haystack: str = "noise") -> Sample:
    """The prompt of one (length, depth, index): haystack, the needle at `key.depth`, then the question."""
    return passkey.sample(sample_rng(seed, key), tokenizer, key.length, key.depth, haystack)


def keys(lengths: list[int], depths: list[float], samples: int) -> list[Key]:
    return [Key(TASK, n, d, i) for n in lengths for d in depths for i in range(samples)]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, TASK, "4k,16k,64k,256k,1m", samples=5)
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths, fractions of the haystack")
    parser.add_argument("--haystack", default="noise",
                        help="noise: one short passage repeated; essay: varied filler sentences; text:PATH: "
                             "sentences of a corpus file (.jsonl with a \"text\" field, e.g. a held-out "
                             "validation.jsonl of recipes/data/debian_corpus.py, or .txt)")
    args = parser.parse_args(argv)

    def go() -> str:
        check_haystack(args.haystack)
        todo = keys(parse_lengths(args.lengths), parse_depths(args.depths), args.samples)
        return run(args, "Pass-key retrieval", todo,
                   lambda key, tok: make_sample(key, tok, args.seed, args.haystack), score,
                   {"haystack": args.haystack})

    return main_guard(go)


if __name__ == "__main__":
    main()
