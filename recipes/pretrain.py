"""Pre-train an HSAHybrid model: `accelerate launch recipes/pretrain.py [--config FILE] [--resume] [key=value ...]`.

With no arguments it trains the `tiny` preset on the built-in synthetic mixture (pass-key and key-value
recall documents over filler text, byte-level tokens) on whatever device accelerate gives it, a CPU being
enough, and writes checkpoints and the final model under runs/pretrain. Overrides look like
`train.lr=1e-3 data.seq_len=4096 model.overrides.local_mixer=mamba2`; recipes/configs/ holds the presets.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ramba import ConfigError
from ramba.training.checkpoint import CheckpointError
from ramba.training.config import RunConfigError, load_run_config
from ramba.training.trainer import train


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a YAML run configuration (see recipes/configs/)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint of train.output_dir, or from the one given")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config values to change")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    return train(load_run_config(args.config, args.overrides), resume=args.resume)


if __name__ == "__main__":
    try:
        main()
    except (RunConfigError, ConfigError, CheckpointError) as err:
        sys.exit(f"error: {err}")
