r"""One training config on one process and on several (DDP, FSDP, context parallelism) at the same global batch:
do the loss curves agree? A second one-process run with another seed gives the size of run-to-run noise to
compare with.

python -m benchmarks.distributed [--config recipes/configs/tiny.yaml] [--modes single,seed,ddp,fsdp,cp]
    [--processes 2] [--batch-size 4] [--out benchmarks/results/distributed.md] [--cpu] [section.key=value ...]

`--batch-size` is per process: the one-process runs take processes x batch-size rows per step, so every run
sees the same global batch (and, for single, ddp and fsdp, the same sequences in the same order). The runs go
to runs/distributed/MODE; the table, with a plot of the curves beside it, to --out. DDP and FSDP start through
`accelerate launch` with recipes/accelerate/{ddp,fsdp}.yaml on GPUs; `--cpu` starts DDP on CPU processes
(torchrun, gloo) instead. accelerate has no FSDP on CPUs. `cp` runs DDP's launch with train.context_parallel set
to the number of processes: each process trains on its slice of every sequence of the whole batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import command_line

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "pretrain.py")
ACCELERATE = {mode: str(ROOT / "recipes" / "accelerate" / f"{mode}.yaml") for mode in ("ddp", "fsdp")}
MODES = ("single", "seed", "ddp", "fsdp", "cp")


def launch_command(mode: str, processes: int, cpu: bool) -> tuple[list[str], dict[str, str]]:
    """The command (and extra environment) that starts RECIPE in `mode`."""
    # every mode on the CPU, even where a GPU is present; the GPUs hidden too, as accelerate's barrier passes
    # gloo a GPU index per process, which fails where there are fewer GPUs than processes
    env = {"ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""} if cpu else {}
    if mode in ("single", "seed"):
        return [sys.executable, RECIPE], env
    if cpu:  # DDP only: accelerate has no FSDP on CPUs
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), RECIPE], env
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE[mode.replace("cp", "ddp")],
            "--num_processes", str(processes), RECIPE], {}


def run_overrides(mode: str, processes: int, batch_size: int, seed: int, output_dir: Path) -> list[str]:
    """Per-mode overrides: the one-process runs take the whole global batch; `seed` changes the seed; `cp`
    shares every sequence among all processes (context parallelism), which then all take the whole batch."""
    rows = batch_size * processes if mode in ("single", "seed", "cp") else batch_size
    sharing = [f"train.context_parallel={processes}"] if mode == "cp" else []
    return [f"train.batch_size={rows}", f"train.seed={seed + 1 if mode == 'seed' else seed}",
            f"train.output_dir={output_dir}"] + sharing


def read_metrics(run_dir: Path) -> tuple[dict[int, float], dict[int, float], list[float]]:
    """(training loss by step, held-out loss by step, tokens per second) from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    eval_loss = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    return loss, eval_loss, [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values."""
    return [statistics.fmean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]


def compare(runs: dict[str, Path], reference: str = "single", window: int = 10) -> list[dict]:
    """One row per run: its curve against the reference run's, over the steps both logged."""
    ref_loss, ref_eval, _ = read_metrics(runs[reference])
    rows = []
    for name, run_dir in runs.items():
        loss, eval_loss, speed = read_metrics(run_dir)
        steps = sorted(set(loss) & set(ref_loss))
        if not steps:
            raise ValueError(f"{run_dir} and {runs[reference]} have no logged step in common")
        mine, theirs = smooth([loss[s] for s in steps], window), smooth([ref_loss[s] for s in steps], window)
        gaps = [abs(a - b) for a, b in zip(mine, theirs)]
        last_eval = max(set(eval_loss) & set(ref_eval), default=None)
        rows.append({"run": name, "steps": steps[-1], "final_loss": mine[-1], "max_gap": max(gaps),
                     "mean_gap": statistics.fmean(gaps),
                     "eval_loss": eval_loss[last_eval] if last_eval is not None else float("nan"),
                     "eval_gap": abs(eval_loss[last_eval] - ref_eval[last_eval]) if last_eval is not None
                     else float("nan"),
                     "tokens_per_s": statistics.median(speed[1:] or speed)})
    return rows


def table(rows: list[dict], reference: str, window: int) -> str:
    head = (f"| run | steps | loss (mean of last {window}) | max gap to {reference} | mean gap | held-out loss | "
            f"its gap | tokens/s |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {r['run']} | {r['steps']} | {r['final_loss']:.4f} | {r['max_gap']:.4f} | {r['mean_gap']:.4f} | "
        f"{r['eval_loss']:.4f} | {r['eval_gap']:.4f} | {r['tokens_per_s']:,.0f} |\n" for r in rows)


def plot(runs: dict[str, Path], out: Path, window: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, run_dir in runs.items():
        loss = read_metrics(run_dir)[0]
        steps = sorted(loss)
        ax.plot(steps, smooth([loss[s] for s in steps], window), label=name, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (mean of last {window} logged)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="recipes/configs/tiny.yaml")
    p.add_argument("--modes", default="single,seed,ddp,fsdp", help=f"some of {','.join(MODES)}; single first")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4, help="rows per process and step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=10, help="logged steps averaged in the compared curves")
    p.add_argument("--runs", default="runs/distributed", help="folder of the runs")
    p.add_argument("--out", default="benchmarks/results/distributed.md")
    p.add_argument("--cpu", action="store_true", help="start DDP on CPU processes (no FSDP)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config values for every run")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if modes[0] != "single" or not set(modes) <= set(MODES):
        p.error(f"--modes: start with single, then any of {', '.join(MODES[1:])}; got {args.modes}")
    if args.processes < 2:
        p.error("--processes: at least 2")
    if args.cpu and "fsdp" in modes:
        p.error("accelerate runs FSDP on GPUs only: leave fsdp out of --modes with --cpu")
    runs, failed = {}, []
    for mode in modes:
        command, env = launch_command(mode, args.processes, args.cpu)
        run_dir = Path(args.runs) / mode
        overrides = args.overrides + ["train.log_every=1"]
        overrides += run_overrides(mode, args.processes, args.batch_size, args.seed, run_dir)
        print(f"=== {mode}: {' '.join(command + ['--config', args.config] + overrides)}", flush=True)
        done = subprocess.run(command + ["--overwrite", "--config", args.config] + overrides,  # a fresh run each time
                              env={**os.environ, **env})
        if done.returncode == 0:
            runs[mode] = run_dir
        elif mode == "single":
            sys.exit(f"the one-process run failed (exit code {done.returncode}): nothing to compare with")
        else:
            failed.append(f"{mode} failed with exit code {done.returncode} (its output is above)")
    rows = compare(runs, "single", args.window)
    text = table(rows, "single", args.window) + "".join(f"\n{line}\n" for line in failed)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, out.with_suffix(".png"), args.window)
    out.write_text(f"Command: `{command_line('distributed', argv)}`"
                   f"\n\n{text}\n![loss curves]({out.with_suffix('.png').name})\n")
    return rows


if __name__ == "__main__":
    main()
