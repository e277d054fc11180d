"""Summaries of a benchmark's results: accuracy per model, task, length (and depth) as JSON, markdown and plots."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

from benchmarks.common import format_length

logger = logging.getLogger("ramba.benchmarks")


def _mean(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values)


def summarise(rows: list[dict], out_dir: Path, title: str) -> str:
    """Accuracy (%) per model, task and length (over samples and depths) and per depth where there are depths;
    writes OUT/summary.json, OUT/summary.md and the plots, and returns the markdown."""
    by_length: dict[tuple, list[float]] = defaultdict(list)
    by_depth: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        by_length[r["model"], r["task"], r["length"]].append(r["score"])
        if r["depth"] is not None:
            by_depth[r["model"], r["task"], r["length"], r["depth"]].append(r["score"])
    summary = {
        "title": title,
        "by_length": [{"model": m, "task": t, "length": n, "accuracy": _mean(v), "samples": len(v)}
                      for (m, t, n), v in sorted(by_length.items())],
        "by_depth": [{"model": m, "task": t, "length": n, "depth": d, "accuracy": _mean(v), "samples": len(v)}
                     for (m, t, n, d), v in sorted(by_depth.items())],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = _markdown(summary)
    (out_dir / "summary.md").write_text(table + "\n")
    _plots(summary, out_dir)
    return table


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _markdown(summary: dict) -> str:
    lengths = sorted({r["length"] for r in summary["by_length"]})
    acc = {(r["model"], r["task"], r["length"]): r["accuracy"] for r in summary["by_length"]}
    models = sorted({r["model"] for r in summary["by_length"]})
    tasks = sorted({r["task"] for r in summary["by_length"]})
    head = " | ".join(format_length(n) for n in lengths)
    lines = [f"# {summary['title']}", "", "Accuracy (%) by length", "", f"| model | task | {head} |",
             "| --- | --- |" + " ---: |" * len(lengths)]
    for m in models:
        for t in tasks + (["average"] if len(tasks) > 1 else []):
            if t == "average":
                found = [[acc[m, u, n] for u in tasks if (m, u, n) in acc] for n in lengths]
                cells = [sum(v) / len(v) if v else None for v in found]
            else:
                cells = [acc.get((m, t, n)) for n in lengths]
            if any(c is not None for c in cells):
                lines.append(f"| {m} | {t} | " + " | ".join(_cell(c) for c in cells) + " |")
    for m, t in sorted({(r["model"], r["task"]) for r in summary["by_depth"]}):
        grid = {(r["depth"], r["length"]): r["accuracy"]
                for r in summary["by_depth"] if (r["model"], r["task"]) == (m, t)}
        lines += ["", f"{t}, {m}: accuracy (%) by depth and length", "", f"| depth | {head} |",
                  "| ---: |" + " ---: |" * len(lengths)]
        for d in sorted({d for d, _ in grid}):
            lines.append(f"| {d:g} | " + " | ".join(_cell(grid.get((d, n))) for n in lengths) + " |")
    return "\n".join(lines)


def _filename(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _plots(summary: dict, out_dir: Path) -> list[Path]:
    """accuracy.png (accuracy against length, one panel per task, one line per model) and, for tasks swept over
    depths, heatmap_TASK_MODEL.png (depth by length)."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("plots skipped: they need matplotlib (pip install matplotlib)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    tasks = sorted({r["task"] for r in summary["by_length"]})
    if not tasks:
        return []
    cols = min(4, len(tasks))
    rows_ = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.4 * rows_), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        points = [r for r in summary["by_length"] if r["task"] == task]
        for model in sorted({r["model"] for r in points}):
            line = sorted((r["length"], r["accuracy"]) for r in points if r["model"] == model)
            ax.plot([x for x, _ in line], [y for _, y in line], marker="o", label=model)
        ax.set_xscale("log", base=2)
        lengths = sorted({r["length"] for r in points})
        ax.set_xticks(lengths, [format_length(n) for n in lengths])
        ax.set(title=task, xlabel="tokens", ylabel="accuracy (%)", ylim=(-3, 103))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    fig.suptitle(summary["title"])
    fig.tight_layout()
    written.append(out_dir / "accuracy.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    for model, task in sorted({(r["model"], r["task"]) for r in summary["by_depth"]}):
        cells = [r for r in summary["by_depth"] if (r["model"], r["task"]) == (model, task)]
        depths, lengths = sorted({r["depth"] for r in cells}), sorted({r["length"] for r in cells})
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for r in cells:
            grid[depths.index(r["depth"])][lengths.index(r["length"])] = r["accuracy"]
        fig, ax = plt.subplots(figsize=(2.5 + 0.8 * len(lengths), 1.5 + 0.45 * len(depths)))
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, "-" if value != value else f"{value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set(xlabel="tokens", ylabel="depth", title=f"{task}: {model}")
        fig.colorbar(image, ax=ax, label="accuracy (%)")
        fig.tight_layout()
        written.append(out_dir / f"heatmap_{_filename(task)}_{_filename(model)}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
