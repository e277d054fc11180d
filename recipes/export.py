"""Write a run's checkpoint as a model folder: `python recipes/export.py RUN_DIR DEST [--checkpoint DIR]
[--dtype bfloat16]`.

For a run that stopped before its last step (a time limit, train.stop_after), which wrote no `final/`: the
newest checkpoint of RUN_DIR (or --checkpoint) becomes a folder that the benchmarks and model.checkpoint load.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ramba.config import ConfigError
from ramba.training.checkpoint import CheckpointError
from ramba.training.config import RunConfigError
from ramba.training.export import export_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the run's train.output_dir")
    p.add_argument("destination", help="the model folder to write")
    p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's newest)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: as trained, float32)")
    args = p.parse_args(argv)
    out = export_checkpoint(args.run_dir, args.destination, args.checkpoint, DTYPES.get(args.dtype))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, RunConfigError, ConfigError) as err:
        sys.exit(f"error: {err}")
