r"""Training curves of the generalization study: held-out answer accuracy against step, one line per run.

python -m benchmarks.curves --out curves.png [--metric NAME] NAME=FILE [NAME=FILE ...]

FILE is a recipe's metrics.jsonl (--metric, default `eval_answer_accuracy`: the held-out answers right,
teacher forcing; `eval_answer_accuracy_<task>` for one task) or a table written by
`benchmarks.learnability --out` (`keys right`). Several metrics.jsonl for one NAME, joined
by '+', are stages of one run: their steps add up.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_curve(spec: str, metric: str = "eval_answer_accuracy") -> list[tuple[int, float]]:
    """(step, held-out accuracy) pairs of one run; `spec` is FILE or FILE+FILE+... (stages, steps add up);
    `metric` is the key read from a metrics.jsonl. A stage that evaluated other metrics only (a task it did not
    train on) adds its steps; ValueError when no stage has the metric."""
    points: list[tuple[int, float]] = []
    offset = 0
    evaluated = False
    for name in spec.split("+"):
        path = Path(name)
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines()]
            stage = [(r["step"], r[metric]) for r in records if metric in r]
            evaluated = evaluated or any(key.startswith("eval_") for r in records for key in r)
            last = max((r["step"] for r in records), default=0)
        elif path.suffix == ".md":
            rows = [line.strip("|").split("|") for line in path.read_text().splitlines()
                    if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
            stage = [(int(r[0]), float(r[4])) for r in rows]
            last = max((s for s, _ in stage), default=0)
        else:
            raise ValueError(f"{name}: expected a metrics.jsonl or a benchmarks.learnability table (.md)")
        points += [(offset + step, value) for step, value in stage]
        offset += last
    if evaluated and not points:
        raise ValueError(f"{spec}: no {metric!r} in its evaluations")
    return points


def plot(curves: dict[str, list[tuple[int, float]]], out: Path, ylabel: str) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, points in curves.items():
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="NAME=FILE")
    p.add_argument("--out", required=True)
    p.add_argument("--ylabel", default="held-out answers right")
    p.add_argument("--metric", default="eval_answer_accuracy", help="the metrics.jsonl key to plot")
    args = p.parse_args(argv)
    curves = {}
    for item in args.runs:
        name, sep, spec = item.partition("=")
        if not sep:
            raise SystemExit(f"error: {item!r}: write NAME=FILE")
        try:
            curves[name] = read_curve(spec, args.metric)
        except (OSError, ValueError, KeyError) as err:
            raise SystemExit(f"error: {err}") from None
    plot(curves, Path(args.out), args.ylabel)


if __name__ == "__main__":
    main()
