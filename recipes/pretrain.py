"""Pre-train an HSAHybrid model: `accelerate launch recipes/pretrain.py [--config FILE] [--resume] [key=value ...]`.

With no arguments it trains the `tiny` preset on the built-in synthetic mixture (pass-key and key-value
recall documents over filler text, byte-level tokens) on whatever device accelerate gives it, a CPU being
enough, and writes checkpoints and the final model under runs/pretrain. Overrides look like
`train.lr=1e-3 data.seq_len=4096 model.overrides.local_mixer=mamba2`; recipes/configs/ holds the presets.
"""

from __future__ import annotations

from pathlib import Path

from ramba.training import cli


def main(argv: list[str] | None = None) -> Path:
    return cli.main(argv, __doc__)


if __name__ == "__main__":
    cli.run(__doc__)
