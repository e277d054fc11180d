"""The command line shared by the recipes: `[--config FILE] [--resume [CHECKPOINT]] [section.key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import ConfigError
from .checkpoint import CheckpointError
from .config import RunConfigError, load_run_config
from .trainer import train


def main(argv: list[str] | None, description: str, default_config: Path | None = None) -> Path:
    """Parse the recipe's arguments and train; returns the final model's folder."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=default_config, help="a YAML run configuration (see recipes/configs/)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint of train.output_dir, or from the one given")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config values to change")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    return train(load_run_config(args.config, args.overrides), resume=args.resume)


def run(description: str, default_config: Path | None = None) -> None:
    """The recipe's entry point: errors a user can act on end the program with their message."""
    try:
        main(None, description, default_config)
    except (RunConfigError, ConfigError, CheckpointError) as err:
        sys.exit(f"error: {err}")
