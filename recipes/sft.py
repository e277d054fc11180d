"""Fine-tune on long-context tasks: `accelerate launch recipes/sft.py [--config FILE] [--resume] [key=value ...]`.

Tasks (data.tasks): pass key, RULER-style needles (single, multi-key, multi-value, multi-query), variable
tracking, common / frequent words, bAbI-style question answering over filler text; prompt lengths mixed
between data.min_len and data.seq_len; the loss is on the answer tokens only (on every token with
data.loss=all). With no arguments it runs recipes/configs/sft-tiny.yaml on a CPU with no downloads; start
from pre-trained weights with `model.checkpoint=runs/pretrain/final`.
"""

from __future__ import annotations

from pathlib import Path

from ramba.training import cli

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "sft-tiny.yaml"


def main(argv: list[str] | None = None) -> Path:
    return cli.main(argv, __doc__, DEFAULT_CONFIG)


if __name__ == "__main__":
    cli.run(__doc__, DEFAULT_CONFIG)
