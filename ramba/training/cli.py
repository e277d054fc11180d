"""The command line shared by the recipes:
`[--config FILE] [--resume [CHECKPOINT] | --overwrite] [section.key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import ConfigError
from .checkpoint import CheckpointError
from .config import RunConfigError, load_run_config
from .trainer import train


def _is_override(text: str) -> bool:
    return "=" in text and not text.startswith("-") and not Path(text).exists()


def _flag_last(argv: list[str]) -> list[str]:
    """`--resume section.key=value ...` is the bare flag followed by overrides, not a checkpoint named
    'section.key=value': such a bare --resume moves to the end, where it takes no value."""
    for i, arg in enumerate(argv):
        if arg == "--resume" and i + 1 < len(argv) and _is_override(argv[i + 1]):
            return argv[:i] + argv[i + 1:] + ["--resume"]
    return argv


def main(argv: list[str] | None, description: str, default_config: Path | None = None) -> Path:
    """Parse the recipe's arguments and train; returns the final model's folder."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=default_config, help="a YAML run configuration (see recipes/configs/)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in train.output_dir from its newest checkpoint, or from the one given; "
                        "the checkpoint's settings must match the ones asked for")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a train.output_dir that holds another run (deletes its checkpoints, "
                        "final model, metrics and config)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config values to change")
    args = p.parse_intermixed_args(_flag_last(list(sys.argv[1:] if argv is None else argv)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    return train(load_run_config(args.config, args.overrides), resume=args.resume, overwrite=args.overwrite)


def run(description: str, default_config: Path | None = None) -> None:
    """The recipe's entry point: errors a user can act on end the program with their message."""
    try:
        main(None, description, default_config)
    except (RunConfigError, ConfigError, CheckpointError) as err:
        sys.exit(f"error: {err}")
